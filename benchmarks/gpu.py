"""GPU benchmark: the engine's own paths on one device, beside plain transformers on the same shapes, in one run;
prints ONE JSON object last.

1. train: the text loop (``aigc.train.lm.train``, bf16 autocast, fused AdamW, ``torch.compile`` on CUDA) on a
   SmolLM2-135M-shaped model (576 wide, 30 layers, 9 heads / 3 KV heads, its real 49152-token tokenizer), random
   weights, on the built-in pydoc corpus: tokens/s (median of the logged rates, the compile step left out), MFU
   against the device's dense bf16 peak (6 N + 12 L C T FLOPs per token; the peak used is in the output) and peak
   memory. Reference: a plain transformers step (``model(input_ids, labels=...)``, torch's AdamW, the same autocast,
   batch and length).
2. decode: the engine's Llama decoder (``TextGenerator``), 128 new tokens for 1 and for 32 sequences, greedy,
   against ``model.generate`` on the same prompts.
3. ddpm: the diffusion loop's training steps/s on the built-in shapes (32x32), and sampling images/s.
4. fsdp2: on CUDA, the same model with ``fully_shard`` per decoder layer (bf16 mixed precision) for a few steps
   under torchrun, one process per GPU: whether it trains (finite, falling loss) and its tokens/s. Skipped off CUDA.

python benchmarks/gpu.py                      # on a GPU machine: under 5 minutes
python benchmarks/gpu.py --device cpu --smoke # a tiny shape on the CPU: checks the script end to end (the fast tier)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
# Dense bf16 tensor-core peaks (FLOP/s) by device name; MFU is reported only where the peak is known.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
             "A10G": 125e12, "A10": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12}


def log(msg: str) -> None:
    print(f"[gpu] {time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def shape(smoke: bool) -> dict:
    """SmolLM2-135M's shape (or a tiny one for the smoke run)."""
    if smoke:
        return dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3)


def base_model(folder: Path, smoke: bool) -> Path:
    """A random model of the shape, with SmolLM2's tokenizer, saved as a Hugging Face folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from aigc.models.lm import load_pretrained_tokenizer

    tok = load_pretrained_tokenizer("smollm2")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=2048, rope_theta=100000.0, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **shape(smoke))
    LlamaForCausalLM(cfg).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def flops_per_token(model, block: int) -> float:
    c = model.config
    n = sum(p.numel() for p in model.parameters())
    return 6 * n + 12 * c.num_hidden_layers * c.hidden_size * block


def peak_flops(device: torch.device) -> tuple[float | None, str]:
    if device.type != "cuda":
        return None, ""
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16.items():
        if key in name:
            return value, name
    return None, name


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # the process' peak RSS (KiB -> GiB)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- 1. training

def train_ours(work: Path, base: Path, corpus: Path, device: torch.device, batch: int, block: int, steps: int) -> dict:
    from aigc.config import load_config
    from aigc.train.lm import TextTrainConfig, prepare_run, train

    cfg = load_config(TextTrainConfig, None, {
        "data": {"path": str(corpus)}, "init": {"path": str(base)}, "model": {"block_size": block},
        "train": {"batch_size": batch, "max_steps": steps, "lr": 3e-4, "min_lr": 3e-5, "warmup_steps": 5,
                  "eval_interval": 10**6, "eval_batches": 1, "checkpoint_interval": 10**6, "samples": 0,
                  "device": str(device), "compile": device.type == "cuda", "precision": "auto"}})
    prepare_run(cfg, work / "run")
    reset_peak(device)
    summary = train(cfg, work / "run")
    # Per-step times from the log, leaving out the first two steps (compilation) and any step after an evaluation
    # (the loop evaluates at each tenth of a short run and saves the best model: not training throughput).
    records = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    durations = [b["time_s"] - a["time_s"] for a, b in zip(records, records[1:]) if b["step"] > 2 and "val_loss" not in a]
    durations.sort()
    return {"tokens_per_s": round(batch * block / durations[len(durations) // 2]) if durations else None,
            "precision": summary["precision"], "steps": summary["steps"], "peak_memory_gb": peak_gb(device)}


def train_reference(base: Path, corpus_ids, device: torch.device, batch: int, block: int, steps: int, precision: str) -> dict:
    """A plain transformers training step on the same shapes: forward with labels, backward, AdamW."""
    from transformers import AutoModelForCausalLM

    from aigc import devices
    from aigc.train.lm import get_batch

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    warm, times = 3, []
    for step in range(warm + steps):
        x, _ = get_batch(corpus_ids, block, batch, 0, step)
        x = x.to(device)
        sync(device)
        t0 = time.perf_counter()
        with devices.autocast(device, precision):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if step >= warm:
            times.append(time.perf_counter() - t0)
    times.sort()
    del model, opt
    return {"tokens_per_s": round(batch * block / times[len(times) // 2])}


# ---------------------------------------------------------------- 2. decoding

def decode(base: Path, device: torch.device, new_tokens: int) -> tuple[dict, dict]:
    from transformers import AutoModelForCausalLM

    from aigc.generate.text import SamplingParams, TextGenerator

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16 if device.type == "cuda" else torch.float32).to(device)
    gen = TextGenerator(model, _tokenizer(base))
    prompt = gen.encode("The product page says that the lamp is made of brass and")[:16]
    ours, ref = {}, {}
    for key, rows in (("single_tokens_per_s", 1), ("batch32_tokens_per_s", 32)):
        params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        gen.generate([prompt] * rows, params)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        outs = gen.generate([prompt] * rows, params)
        sync(device)
        ours[key] = round(sum(o.completion_tokens for o in outs) / (time.perf_counter() - t0))
        ids = torch.tensor([prompt] * rows, device=device)
        kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=gen.tokenizer.eos_token_id)
        model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        sync(device)
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        sync(device)
        ref[key] = round((out.shape[1] - ids.shape[1]) * rows / (time.perf_counter() - t0))
    return ours, ref


def _tokenizer(base: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base))


# ---------------------------------------------------------------- 3. diffusion

def ddpm(work: Path, device: torch.device, smoke: bool, steps: int) -> dict:
    from aigc.config import load_config
    from aigc.data.images import ImagePrepareOptions, prepare
    from aigc.generate.image import ImagePipeline
    from aigc.train.image import ImageTrainConfig, prepare_run, train

    configs = HERE.parent / "src/aigc/configs/image"
    prepare([], work / "shapes", ImagePrepareOptions(size=8 if smoke else 32, count=64 if smoke else 2000), builtin=["shapes"])
    cfg = load_config(ImageTrainConfig, configs / ("tiny.yaml" if smoke else "ddpm-shapes.yaml"), {
        "data": {"path": str(work / "shapes")}, "model": {"kind": "ddpm"},
        "train": {"max_steps": steps, "device": str(device), "precision": "auto", "sample_interval": 10**6, "eval_interval": 10**6,
                  "checkpoint_interval": 10**6}})
    prepare_run(cfg, work / "ddpm")
    summary = train(cfg, work / "ddpm")
    pipe = ImagePipeline.from_run(work / "ddpm", device=device)
    n = 4 if smoke else 64
    pipe.generate(n=n, seed=0)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    pipe.generate(n=n, seed=1)
    sync(device)
    return {"train_steps_per_s": round(summary["steps"] / summary["elapsed_s"], 2), "train_images_per_s": summary["images_per_s"],
            "images_per_s": round(n / (time.perf_counter() - t0), 1), "sample_steps": pipe.meta.config.get("sample_steps")}


# ---------------------------------------------------------------- 4. FSDP2

def fsdp2(base: Path, corpus: Path, device: torch.device, batch: int, block: int, steps: int) -> dict:
    if device.type != "cuda" or not torch.distributed.is_nccl_available():
        return {"ok": None, "tokens_per_s": None, "skipped": "FSDP2 is checked on CUDA (NCCL) only"}
    nproc = torch.cuda.device_count()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(Path(__file__).resolve()),
           "--fsdp2-worker", "--base", str(base), "--corpus", str(corpus), "--batch", str(batch), "--block", str(block),
           "--steps", str(steps)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    if r.returncode or not lines:
        return {"ok": False, "tokens_per_s": None, "error": (r.stderr or r.stdout)[-1500:]}
    return {**json.loads(lines[-1]), "processes": nproc}


def fsdp2_worker(args) -> None:
    """One rank of the FSDP2 check: fully_shard per decoder layer and at the root, bf16 compute, fp32 master weights."""
    import numpy as np
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import AutoModelForCausalLM

    from aigc import distributed
    from aigc.train.lm import get_batch

    world = distributed.start()
    device = distributed.place(torch.device("cuda"), world)
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32).to(device)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    ids = np.fromfile(args.corpus, dtype=np.uint16)  # the run's encoded corpus (SmolLM2's 49152 ids fit 16 bits)
    local = args.batch // world.world_size
    losses, times = [], []
    for step in range(3 + args.steps):
        x, _ = get_batch(ids, args.block, args.batch, 0, step)
        x = distributed.shard(x, world).to(device)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step >= 3:
            times.append(time.perf_counter() - t0)
        losses.append(distributed.mean([loss.item()])[0])
    times.sort()
    if world.main:
        ok = all(np.isfinite(losses)) and losses[-1] < losses[0]
        print(json.dumps({"ok": bool(ok), "tokens_per_s": round(local * world.world_size * args.block / times[len(times) // 2]),
                          "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4)}), flush=True)
    distributed.stop()


# ---------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    ap.add_argument("--smoke", action="store_true", help="a tiny shape and a few steps: checks the script, measures nothing")
    ap.add_argument("--batch", type=int, default=0, help="training batch (default: 16 on CUDA, 2 smoke)")
    ap.add_argument("--block", type=int, default=0, help="training sequence length (default: 1024, 32 smoke)")
    ap.add_argument("--steps", type=int, default=0, help="training steps per measurement (default: 40, 3 smoke)")
    ap.add_argument("--new-tokens", type=int, default=0, help="decoded tokens per sequence (default: 128, 8 smoke)")
    ap.add_argument("--fsdp2-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.fsdp2_worker:
        return fsdp2_worker(args)

    import numpy as np

    from aigc import devices, threads
    from aigc.data.text import prepare as prepare_text

    threads.configure()
    device = devices.resolve(args.device)
    smoke = args.smoke
    batch = args.batch or (2 if smoke else 16)
    block = args.block or (32 if smoke else 1024)
    steps = args.steps or (3 if smoke else 40)
    new_tokens = args.new_tokens or (8 if smoke else 128)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="aigc-gpu-") as tmp:
        work = Path(tmp)
        log(f"device {device}; preparing the corpus and a {'tiny' if smoke else 'SmolLM2-135M'}-shaped model")
        prepare_text([], work / "corpus", builtin=["pydoc"])
        base = base_model(work / "base", smoke)
        log("training: ours")
        ours = train_ours(work, base, work / "corpus", device, batch, block, max(steps, 11))  # tokens/s are logged every 10 steps
        corpus_ids = np.fromfile(work / "run" / "data" / "train.bin", dtype=json.loads((work / "run" / "data" / "train.json").read_text())["dtype"])
        log("training: transformers reference")
        ref = train_reference(base, corpus_ids, device, batch, block, steps, ours["precision"])
        from transformers import AutoConfig, LlamaForCausalLM

        with torch.device("meta"):
            shaped = LlamaForCausalLM(AutoConfig.from_pretrained(str(base)))
        peak, name = peak_flops(device)
        mfu = round(ours["tokens_per_s"] * flops_per_token(shaped, block) / peak, 4) if peak and ours["tokens_per_s"] else None
        log("decoding")
        dec, dec_ref = decode(base, device, new_tokens)
        log("ddpm")
        diff = ddpm(work, device, smoke, 10 if smoke else 200)
        log("fsdp2")
        shard = fsdp2(base, work / "run" / "data" / "train.bin", device, batch, block, steps)
    result = {
        "benchmark": "gpu", "device": name or str(device), "smoke": smoke,
        "train": {"model": "tiny-shape" if smoke else "smollm2-135m-shape", "batch": batch, "block": block,
                  "tokens_per_s": ours["tokens_per_s"], "mfu": mfu, "peak_tflops_bf16": peak and peak / 1e12,
                  "peak_memory_gb": ours["peak_memory_gb"], "precision": ours["precision"]},
        "train_hf_reference": ref,
        "train_vs_reference": round(ours["tokens_per_s"] / ref["tokens_per_s"], 3) if ours["tokens_per_s"] else None,
        "decode": dec, "decode_hf_reference": dec_ref,
        "decode_vs_reference": {k: round(dec[k] / dec_ref[k], 3) for k in dec},
        "ddpm": diff, "fsdp2": shard, "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
