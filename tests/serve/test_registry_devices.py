"""Where served models compute: the server's device, per-model overrides, and a memory budget per device."""
import json
import shutil

import pytest

from aigc.errors import UserError
from aigc.serve.registry import Registry, entry_for, loaded_size


def test_models_go_on_the_servers_device_unless_placed_elsewhere(tiny_run, spread_model):
    reg = Registry.from_paths([f"a={tiny_run}", f"b={spread_model}"], device="auto", model_devices={"b": "cpu"})
    assert reg.device.type == "cpu"  # auto on a machine without a GPU
    assert reg.entries["a"].device == reg.entries["b"].device == "cpu" and reg.entries["a"].info["device"] == "cpu"
    with pytest.raises(UserError, match="--model-device nope=...: no model has that id"):
        Registry.from_paths([f"a={tiny_run}"], model_devices={"nope": "cpu"})
    with pytest.raises(UserError, match="--model-device a cuda:3: no CUDA device here"):
        Registry.from_paths([f"a={tiny_run}"], model_devices={"a": "cuda:3"})
    with pytest.raises(UserError, match=r"--device \(AIGC_DEVICE\) 'tpu': expected auto, cpu, cuda"):
        Registry.from_paths([f"a={tiny_run}"], device="tpu")


def test_the_budget_is_kept_per_device(tiny_run, spread_model):
    reg = Registry.from_paths([f"a={tiny_run}", f"b={spread_model}"], memory_budget_mb=0, max_batch=2, context=64)
    try:
        reg.acquire("a")
        reg.acquire("b")  # a CPU budget of 0: the older CPU model goes, the one just loaded stays
        assert list(reg.loaded) == ["b"] and reg.resident_bytes("cpu") == reg.resident_bytes() > 0
        assert reg.resident_bytes("cuda:0") == 0 and reg.budget_bytes("cpu") == 0
    finally:
        reg.close()


def test_a_lora_run_counts_at_the_size_of_its_merged_base(tmp_path, chat_model):
    run = tmp_path / "lora"
    (run / "model").mkdir(parents=True)
    (run / "model" / "adapter_config.json").write_text("{}")
    (run / "model" / "adapter_model.safetensors").write_bytes(b"\0" * 1000)
    (run / "model" / "aigc_base.json").write_text(json.dumps({"init_path": str(chat_model)}))
    base = sum(f.stat().st_size for f in chat_model.glob("*.safetensors"))
    assert loaded_size(run, 1000) == 1000 + base
    # a full fine-tune (no adapter) counts at its own files
    shutil.copytree(chat_model, tmp_path / "full" / "model")
    (tmp_path / "full" / "model" / "aigc_run.json").write_text("{}")
    assert loaded_size(tmp_path / "full", 123) == 123
    assert entry_for(tmp_path / "full").size_bytes > base
