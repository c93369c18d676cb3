"""Stable Diffusion-family pipelines from a local path: tiny random components (UNet2DConditionModel,
AutoencoderKL, CLIPTextModel and a character-level CLIP tokenizer) are built, saved as a diffusers folder and loaded
through the real loading path; text-to-image, image-to-image and inpainting with every named scheduler."""
import json

import numpy as np
import pytest
from PIL import Image

from aigc.errors import UserError
from aigc.generate.sd import SCHEDULERS, SDParams, SDPipeline, inspect


def tiny_tokenizer(folder):
    from transformers import CLIPTokenizer

    chars = [chr(c) for c in range(33, 127)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=32), len(vocab)


def build_tiny_pipeline(folder):
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tokenizer, vocab = tiny_tokenizer(folder / "tok-src")
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32)
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
    text = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
                                        num_attention_heads=4, num_hidden_layers=2, vocab_size=vocab, max_position_embeddings=32))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder / "pipe")
    return folder / "pipe"


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("sd"))


def test_a_local_pipeline_loads_and_draws_reproducibly_with_every_scheduler(tiny_sd):
    assert inspect(tiny_sd) == {"format": "diffusers", "family": "sd", "class": "StableDiffusionPipeline"}
    sd = SDPipeline.load(tiny_sd)
    p = SDParams(prompt="a red lamp", negative_prompt="blurry", width=32, height=32, steps=2, seed=3, n=2)
    for name in SCHEDULERS:
        p.scheduler = name
        a, b = sd.generate(p)
        assert not np.array_equal(np.asarray(a), np.asarray(b))  # n=2: two different images
        assert a.size == (32, 32) and a.mode == "RGB"
        again = sd.generate(p)[0]
        assert np.array_equal(np.asarray(a), np.asarray(again)), name  # the same seed: the same image
    other = sd.generate(SDParams(prompt="a red lamp", width=32, height=32, steps=2, seed=4))[0]
    assert not np.array_equal(np.asarray(other), np.asarray(a))


def test_image_to_image_and_inpainting_share_the_weights(tiny_sd):
    sd = SDPipeline.load(tiny_sd)
    init = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    p = SDParams(prompt="brass", width=32, height=32, steps=4, seed=1, strength=0.5, scheduler="ddim")
    out = sd.generate(p, init_image=init)[0]
    assert out.size == (32, 32)
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))  # repaint the centre only
    painted = sd.generate(p, init_image=init, mask=mask)[0]
    assert painted.size == (32, 32)
    assert sd._task("inpaint").unet is sd.pipe.unet and sd._task("image2image").vae is sd.pipe.vae  # one copy
    with pytest.raises(UserError, match="a mask needs the image"):
        sd.generate(p, mask=mask)


def test_missing_parts_and_bad_parameters_are_named(tiny_sd, tmp_path):
    with pytest.raises(UserError, match="model_index.json is missing"):
        SDPipeline.load(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text((tiny_sd / "model_index.json").read_text())
    with pytest.raises(UserError, match="unet, vae, text_encoder, tokenizer, scheduler folders are missing"):
        SDPipeline.load(broken)
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"0")
    with pytest.raises(UserError, match="needs its architecture's config offline"):
        SDPipeline.load(ckpt)
    with pytest.raises(UserError, match="unknown scheduler 'k_lms'"):
        SDParams(scheduler="k_lms").validate()
    with pytest.raises(UserError, match="multiples of 8"):
        SDParams(width=30).validate()


def test_cli_makes_a_run_of_the_pipeline_and_draws_from_it(tiny_sd, tmp_path):
    import subprocess
    import sys

    def aigc(*args):
        r = subprocess.run([sys.executable, "-m", "aigc.cli", *args], capture_output=True, text=True, check=False,
                           env={**__import__("os").environ, "AIGC_HOME": str(tmp_path / "home")})
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout) if "--json" in args else r.stdout

    run = tmp_path / "brand"
    made = aigc("train", "image", "--init.path", str(tiny_sd), "--run", str(run), "--sd.width=32", "--sd.height=32",
                "--sd.steps=2", "--sd.scheduler=euler a", "--json")
    assert made["kind"] == "sd" and made["pipeline"] == "StableDiffusionPipeline" and made["width"] == 32
    from aigc.run import SD, SDMeta, detect_kind, fingerprint

    assert detect_kind(run) == SD and SDMeta.load(run).scheduler == "euler a" and len(fingerprint(run).version) == 12
    t2i = aigc("generate", "image", str(run), "--prompt", "a brass lamp", "--n", "2", "--seed", "7", "--json")["images"]
    assert [w["task"] for w in t2i] == ["txt2img", "txt2img"]
    first = Image.open(t2i[0]["file"])
    assert first.size == (32, 32) and "Sampler: euler a" in first.text["parameters"] and first.text["parameters"].startswith("a brass lamp")
    Image.new("L", (32, 32), 255).save(tmp_path / "mask.png")
    inpaint = aigc("generate", "image", str(run), "--prompt", "a lamp", "--n", "1", "--init-image", t2i[0]["file"],
                   "--mask", str(tmp_path / "mask.png"), "--strength", "0.9", "--json")["images"]
    assert inpaint[0]["task"] == "inpaint" and Image.open(inpaint[0]["file"]).size == (32, 32)
    bad = subprocess.run([sys.executable, "-m", "aigc.cli", "train", "image", "--init.path", str(tmp_path / "nowhere"),
                          "--run", str(tmp_path / "r2")], capture_output=True, text=True, check=False)
    assert bad.returncode != 0 and "pipeline not found" in bad.stderr and not (tmp_path / "r2").exists()


def brand_images(folder, n=4):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        w, h = (96, 64) if i % 2 else (64, 64)  # two aspect ratios: two buckets
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(folder / f"lamp-{i}.png")
        if i < n - 1:
            (folder / f"lamp-{i}.txt").write_text(f"a brass lamp, view {i}")
    return folder  # the last image has no caption: the trigger word captions it


def test_lora_trains_resumes_exactly_and_the_adapter_loads_on_the_base(tiny_sd, tmp_path):
    import torch
    from safetensors.torch import load_file

    from aigc.generate.sd import SDParams, SDRun
    from aigc.run import SDMeta
    from aigc.train.sd_lora import ADAPTER, LoraConfig, bucket_for, load_examples, train

    data = brand_images(tmp_path / "brand")
    examples = load_examples(data, "sks")
    assert examples[0][1] == "sks, a brass lamp, view 0" and examples[-1][1] == "a photo of sks"
    assert bucket_for(96, 64, 64) != bucket_for(64, 64, 64)
    cfg = LoraConfig(rank=4, alpha=4, trigger="sks", lr=1e-3, max_steps=6, resolution=64, checkpoint_every=3, samples=1)
    full = train(tiny_sd, data, tmp_path / "full", cfg)
    assert full["steps"] == 6 and len(full["buckets"]) == 2 and (tmp_path / "full" / "sample-0.png").is_file()
    layers = load_file(tmp_path / "full" / "model" / ADAPTER)
    assert layers and all(k.startswith("unet.") and (".lora.down." in k or ".lora.up." in k) for k in layers)  # diffusers layout
    # 3 steps, stop, resume to 6: the same adapter as 6 in one go
    train(tiny_sd, data, tmp_path / "half", LoraConfig(**{**cfg.__dict__, "max_steps": 3}))
    resumed = train(tiny_sd, data, tmp_path / "half", LoraConfig(max_steps=6), resume=True)
    assert resumed["steps"] == 6
    again = load_file(tmp_path / "half" / "model" / ADAPTER)
    assert all(torch.allclose(layers[k], again[k], atol=1e-6) for k in layers)
    losses = [json.loads(x)["loss"] for x in (tmp_path / "half" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6
    # the run draws with the adapter on top of the base pipeline, and differently from the base alone
    meta = SDMeta.load(tmp_path / "full")
    assert meta.lora == ADAPTER and meta.trigger == "sks"
    tuned = SDRun.from_run(tmp_path / "full")
    p = SDParams(prompt="sks lamp", width=64, height=64, steps=2, seed=0)
    from aigc.generate.sd import SDPipeline

    base = SDPipeline.load(tiny_sd).generate(p)[0]
    assert not np.array_equal(np.asarray(tuned.generate(p)[0]), np.asarray(base))
    with pytest.raises(UserError, match="has no caption"):
        load_examples(data, "")
