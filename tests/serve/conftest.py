import os
import uuid
from pathlib import Path

import pytest
import torch

from aigc.db import crud
from tests.serve.helpers import db, start, tenant

TINY_IMAGE = Path(__file__).parents[2] / "src/aigc/configs/image/tiny.yaml"


@pytest.fixture(scope="session")
def text_model(tmp_path_factory, tiny_run) -> Path:
    """A random 2-layer Llama (its outputs are diverse, unlike a 40-step model) with the tiny run's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("models") / "rand"
    tok = AutoTokenizer.from_pretrained(str(tiny_run / "model"))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8)  # sharper logits: greedy outputs differ from prompt to prompt
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def image_model(tmp_path_factory) -> Path:
    from aigc.config import load_config
    from aigc.data.images import ImagePrepareOptions, prepare
    from aigc.train.image import ImageTrainConfig, prepare_run, train

    root = tmp_path_factory.mktemp("imagemodel")
    prepare([], root / "shapes", ImagePrepareOptions(size=8, count=120), builtin=["shapes"])
    cfg = load_config(ImageTrainConfig, TINY_IMAGE, {"data": {"path": str(root / "shapes")}, "model": {"kind": "vae"}})
    run = root / "shapes-vae"
    prepare_run(cfg, run)
    train(cfg, run)
    return run


def seed_billing(sessions) -> None:
    with sessions.begin() as s:
        crud.create_plan(s, "payg", "payg")
        crud.create_plan(s, "prepaid", "prepaid")
        crud.create_plan(s, "starter", "subscription", monthly_fee=20, included=0.01)  # hard quota
        crud.create_plan(s, "pro", "subscription", monthly_fee=100, included=0.01, overage_rate=2.0)
        crud.create_plan(s, "tight", "payg", rpm=3, tpm=1000)
        # $0.01 per 1K input and $0.02 per 1K output tokens, $0.04 per image, for every model
        crud.set_price(s, "*", input_per_1k=0.01, output_per_1k=0.02, per_image=0.04)


@pytest.fixture(scope="module")
def server(tmp_path_factory, text_model, image_model):
    from aigc.serve.registry import Registry
    from aigc.settings import Settings

    home = tmp_path_factory.mktemp("home")
    settings = Settings(home=home, admin_token="operator-secret", log_json=True)
    sessions = db(settings)
    seed_billing(sessions)
    registry = Registry.from_paths([f"rand={text_model}", f"shapes={image_model}"], echo=["echo"], max_batch=8, context=128)
    live = start(settings, registry)
    live.sessions = sessions
    yield live
    live.stop()


@pytest.fixture()
def acme(server):
    """A fresh pay-as-you-go tenant per test: (org id, developer key)."""
    return tenant(server.sessions, f"acme-{uuid.uuid4().hex[:8]}", "payg")


def postgres_url() -> str | None:
    url = os.environ.get("AIGC_TEST_POSTGRES_URL")
    if not url:
        if os.environ.get("AIGC_REQUIRE_POSTGRES"):
            pytest.fail("AIGC_REQUIRE_POSTGRES is set but AIGC_TEST_POSTGRES_URL is not")
        pytest.skip("no PostgreSQL server (set AIGC_TEST_POSTGRES_URL)")
    return url


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request, tmp_path):
    """An empty database: a SQLite file, or a fresh database on the PostgreSQL server (dropped after)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'aigc.db'}"
        return
    import psycopg

    base = postgres_url()
    name = "aigc_test_" + uuid.uuid4().hex[:10]
    plain = base.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield base.rsplit("/", 1)[0] + "/" + name

    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
