"""Device choice: auto falls back to the CPU here, a device the machine lacks is one clear error before any work,
and checkpoints hold CPU tensors only (a GPU run resumes on a CPU)."""
import pytest
import torch

from aigc import devices
from aigc.config import load_config
from aigc.errors import UserError
from aigc.train.lm import TextTrainConfig, prepare_run, train

TINY = "src/aigc/configs/text/tiny.yaml"


def test_auto_picks_what_the_machine_has_and_precision_follows():
    want = "cuda" if torch.cuda.is_available() else ("mps" if devices._mps_available() else "cpu")
    assert devices.resolve("auto").type == want
    assert devices.resolve("cpu") == torch.device("cpu")
    cpu = torch.device("cpu")
    assert devices.resolve_precision("auto", cpu) == ("bf16" if devices.cpu_has_bf16() else "fp32")
    assert devices.resolve_precision("fp32", cpu) == "fp32"
    with pytest.raises(UserError, match="fp16 needs a GPU"):
        devices.resolve_precision("fp16", cpu)
    assert not devices.grad_scaler(cpu, "bf16").is_enabled()
    with devices.autocast(cpu, "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("name, match", [("cuda", "no CUDA device here"), ("cuda:1", "no CUDA device here"),
                                         ("tpu", "expected auto, cpu, cuda, cuda:N or mps")])
def test_a_device_the_machine_lacks_is_refused_before_any_work(tmp_path, pydoc_corpus, name, match):
    with pytest.raises(UserError, match=match):
        cfg = load_config(TextTrainConfig, TINY, {"data": {"path": str(pydoc_corpus)}, "train": {"device": name}})
        prepare_run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_music_takes_the_device_choice_too(tmp_path, music_data):
    from aigc.train.music import MusicTrainConfig, prepare_run as prep, train as fit

    cfg = load_config(MusicTrainConfig, "src/aigc/configs/music/tiny.yaml",
                      {"data": {"path": str(music_data)}, "train": {"max_steps": 2, "samples": 0, "device": "cpu"}})
    prep(cfg, tmp_path / "m")
    assert fit(cfg, tmp_path / "m")["device"] == "cpu"
    cfg.train.device = "mps"  # set after validation, as a resume on another machine would
    with pytest.raises(UserError, match="mps: Apple's Metal backend is not available"):
        fit(cfg, tmp_path / "m", resume=True)


def test_checkpoints_hold_cpu_tensors_and_the_summary_names_the_device(tmp_path, pydoc_corpus):
    cfg = load_config(TextTrainConfig, TINY, {"data": {"path": str(pydoc_corpus)},
                                              "train": {"max_steps": 4, "checkpoint_interval": 2, "samples": 0, "device": "cpu"}})
    prepare_run(cfg, tmp_path / "run")
    summary = train(cfg, tmp_path / "run")
    assert summary["device"] == "cpu"
    def devices_in(obj):
        if isinstance(obj, torch.Tensor):
            return {obj.device.type}
        if isinstance(obj, dict):
            return set().union(*(devices_in(v) for v in obj.values())) if obj else set()
        if isinstance(obj, (list, tuple)):
            return set().union(*(devices_in(v) for v in obj)) if obj else set()
        return set()

    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    assert devices_in(saved) == {"cpu"} and "scaler" in saved


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cli_device_flag_is_checked_and_a_resume_may_change_it(tmp_path, pydoc_corpus):
    from conftest import run_cli

    res = run_cli("train", "text", "tiny", "--data", pydoc_corpus, "--run", tmp_path / "gpu", "--device", "cuda", ok=False)
    assert res.returncode != 0 and "no CUDA device here" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "gpu").exists()
    run_cli("train", "text", "tiny", "--data", pydoc_corpus, "--run", tmp_path / "r", "--device", "cpu",
            "--train.max_steps=2", "--train.samples=0")
    res = run_cli("train", "text", "--resume", "--run", tmp_path / "r", "--device", "auto", "--train.max_steps=4", "--json")
    import json

    assert json.loads(res.stdout)["steps"] == 4
