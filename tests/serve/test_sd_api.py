"""A Stable Diffusion run behind /v1/images/generations and OpenAI's /v1/images/edits (image + optional mask), through
the official openai client: drawn, delivered, logged and charged like every image."""
import base64
import io

import numpy as np
import openai
import pytest
from PIL import Image
from sqlalchemy import select

from aigc.db import crud
from aigc.db.models import Generation, UsageRecord
from tests.serve.helpers import db, start, tenant
from tests.test_sd import brand_images, build_tiny_pipeline


@pytest.fixture(scope="module")
def sd_server(tmp_path_factory):
    from aigc.serve.registry import Registry
    from aigc.settings import Settings
    from aigc.train.sd import import_pipeline

    work = tmp_path_factory.mktemp("sdserve")
    from aigc.train.sd_lora import LoraConfig, train

    base = build_tiny_pipeline(work)
    import_pipeline(base, work / "brand", defaults={"steps": 2, "width": 64, "height": 64})
    train(base, brand_images(work / "data"), work / "lamp-lora",
          LoraConfig(rank=4, trigger="sks", lr=5e-2, max_steps=3, resolution=64, samples=0))
    settings = Settings(home=work / "home", admin_token="op", log_json=True)
    sessions = db(settings)
    with sessions.begin() as s:
        crud.create_plan(s, "payg", "payg")
        crud.set_price(s, "*", per_image=0.02)
    live = start(settings, Registry.from_paths([f"brand={work / 'brand'}", f"lamp-lora={work / 'lamp-lora'}"]))
    live.sessions = sessions
    yield live
    live.stop()


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_generations_and_edits_with_the_official_client(sd_server):
    org, key = tenant(sd_server.sessions, "brandco", "payg")
    client = openai.OpenAI(base_url=sd_server.url + "/v1", api_key=key, max_retries=0, timeout=120)
    got = client.images.generate(model="brand", prompt="a brass lamp", n=2, size="64x64", response_format="b64_json",
                                 extra_body={"seed": 5, "negative_prompt": "blurry", "scheduler": "euler a"})
    first = Image.open(io.BytesIO(base64.b64decode(got.data[0].b64_json)))
    assert len(got.data) == 2 and first.size == (64, 64)
    assert "Negative prompt: blurry" in first.text["parameters"] and "Sampler: euler a" in first.text["parameters"]
    again = client.images.generate(model="brand", prompt="a brass lamp", n=1, size="64x64", response_format="b64_json",
                                   extra_body={"seed": 5, "negative_prompt": "blurry", "scheduler": "euler a"})
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(again.data[0].b64_json)))), np.asarray(first))
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (16, 16, 48, 48))  # OpenAI's convention: the transparent square is repainted
    edited = client.images.edit(model="brand", image=("lamp.png", png(first), "image/png"),
                                mask=("mask.png", png(mask), "image/png"), prompt="a green lamp", n=1, size="64x64",
                                response_format="b64_json", extra_body={"seed": 1})
    out = np.asarray(Image.open(io.BytesIO(base64.b64decode(edited.data[0].b64_json))).convert("RGB"), dtype=float)
    assert out.shape == (64, 64, 3)
    i2i = client.images.edit(model="brand", image=("lamp.png", png(first), "image/png"), prompt="a lamp", size="64x64")
    assert i2i.data[0].url.startswith(sd_server.url + "/v1/images/files/")
    with sd_server.sessions() as s:
        gens = s.scalars(select(Generation).where(Generation.org_id == org).order_by(Generation.created_at)).all()
        assert [g.endpoint for g in gens] == ["images.generations"] * 3 + ["images.edits"] * 2
        assert [g.params.get("task") for g in gens] == ["txt2img"] * 3 + ["inpaint", "img2img"]
        charged = s.scalars(select(UsageRecord.list_price).where(UsageRecord.org_id == org)).all()
        assert sorted(charged) == [20_000] * 3 + [40_000]  # $0.02 an image


def test_bad_edits_are_refused_clearly(sd_server):
    _, key = tenant(sd_server.sessions, "brandco2", "payg")
    client = openai.OpenAI(base_url=sd_server.url + "/v1", api_key=key, max_retries=0, timeout=60)
    img = png(Image.new("RGB", (64, 64), "white"))
    with pytest.raises(openai.BadRequestError, match="not a readable image"):
        client.images.edit(model="brand", image=("x.png", b"not an image", "image/png"), prompt="x", size="64x64")
    with pytest.raises(openai.BadRequestError, match="must be the same size"):
        client.images.edit(model="brand", image=("x.png", img, "image/png"), prompt="x", size="64x64",
                           mask=("m.png", png(Image.new("L", (32, 32))), "image/png"))
    with pytest.raises(openai.BadRequestError, match="unknown scheduler"):
        client.images.generate(model="brand", prompt="x", size="64x64", extra_body={"scheduler": "k_lms"})
    with pytest.raises(openai.BadRequestError, match="content policy"):
        client.images.generate(model="brand", prompt="I will kill you", size="64x64")


def test_a_lora_run_is_its_own_model_on_the_shared_base(sd_server):
    _, key = tenant(sd_server.sessions, "brandco3", "payg")
    client = openai.OpenAI(base_url=sd_server.url + "/v1", api_key=key, max_retries=0, timeout=120)
    assert {"brand", "lamp-lora"} <= {m.id for m in client.models.list().data}

    def draw(model):
        r = client.images.generate(model=model, prompt="sks lamp", size="64x64", response_format="b64_json",
                                   extra_body={"seed": 9, "steps": 2})
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json))).convert("RGB"))

    before = draw("brand")
    tuned = draw("lamp-lora")
    after = draw("brand")
    assert not np.array_equal(tuned, before)  # the adapter changes what is drawn
    assert np.array_equal(after, before)  # and is switched off again for the base's own requests
    reg = sd_server.service.registry
    assert reg.acquire("brand").pipeline.sd is reg.acquire("lamp-lora").pipeline.sd  # one copy of the base weights
