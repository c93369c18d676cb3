"""benchmarks/gpu.py end to end on the CPU (--smoke: a tiny shape): every measurement runs and the JSON has the keys
the issue names. The figures themselves come from a GPU machine."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_the_gpu_benchmark_runs_on_the_cpu_in_smoke_mode():
    r = subprocess.run([sys.executable, "benchmarks/gpu.py", "--device", "cpu", "--smoke"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["benchmark"] == "gpu" and out["device"] == "cpu"
    assert out["train"]["model"] == "tiny-shape" and out["train"]["tokens_per_s"] > 0 and out["train"]["peak_memory_gb"] > 0
    assert "mfu" in out["train"] and out["train"]["mfu"] is None  # no known peak for a CPU
    assert out["train_hf_reference"]["tokens_per_s"] > 0
    for side in ("decode", "decode_hf_reference"):
        assert out[side]["single_tokens_per_s"] > 0 and out[side]["batch32_tokens_per_s"] > 0
    assert out["ddpm"]["train_steps_per_s"] > 0 and out["ddpm"]["images_per_s"] > 0
    assert out["fsdp2"]["ok"] is None and "CUDA" in out["fsdp2"]["skipped"]
