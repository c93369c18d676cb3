import os
import uuid

import pytest

from aigc.db import crud
from tests.serve.helpers import db, start, tenant

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


@pytest.fixture(scope="module")
def long_server(tmp_path_factory, long_models):
    """A server with a 2048-token context (prompts that list tools): "long-plain" and "long-chat" (see long_models)."""
    from aigc.serve.registry import Registry
    from aigc.settings import Settings

    settings = Settings(home=tmp_path_factory.mktemp("home"), admin_token="operator-secret", log_json=True)
    sessions = db(settings)
    seed_billing(sessions)
    registry = Registry.from_paths([f"long-{k}={v}" for k, v in long_models.items()], echo=["echo"], max_batch=8, context=2048)
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
