import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aigc.config import load_config
from aigc.train.lm import TextTrainConfig, prepare_run, train

TINY = Path(__file__).parents[1] / "src/aigc/configs/text/tiny.yaml"


def run_tiny(tmp_path, corpus, name, **sections):
    overrides = {"data": {"path": str(corpus)}, **sections}
    cfg = load_config(TextTrainConfig, TINY, overrides)
    run = tmp_path / name
    prepare_run(cfg, run)
    return run, train(cfg, run)


def losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_run_directory_has_standard_checkpoint_and_logs(tiny_run):
    for name in ("config.yaml", "dataset/manifest.json", "metrics.jsonl", "loss.png", "samples.txt", "summary.json",
                 "model/config.json", "model/model.safetensors", "model/tokenizer.json", "checkpoints/last.pt"):
        assert (tiny_run / name).is_file(), name
    assert list((tiny_run / "tb").glob("events.out.tfevents.*"))
    records = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 41))
    assert records[-1]["loss"] < records[0]["loss"] - 0.5  # it learns
    # every eval_interval (10) steps, and at a tenth of the run left without one while evaluations (2/3 of a step
    # each here) cost at most a tenth of the steps run
    assert [r["step"] for r in records if "val_loss" in r] == [8, 10, 20, 28, 30, 40]
    # Plain transformers loads it, with no project code imported.
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tiny_run / 'model')!r})\n"
        f"t = AutoTokenizer.from_pretrained({str(tiny_run / 'model')!r})\n"
        "ids = t('The ', return_tensors='pt').input_ids\n"
        "out = m.generate(ids, max_new_tokens=5, do_sample=False)\n"
        "assert 'aigc' not in sys.modules and out.shape[1] == ids.shape[1] + 5\n"
        "print(type(m).__name__)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "LlamaForCausalLM"


def test_fgm_adversarial_training_changes_updates(tmp_path, pydoc_corpus):
    base, _ = run_tiny(tmp_path, pydoc_corpus, "plain", train={"max_steps": 8, "samples": 0})
    adv, _ = run_tiny(tmp_path, pydoc_corpus, "fgm", train={"max_steps": 8, "samples": 0}, adversarial={"enabled": True, "epsilon": 5.0})
    a, b = losses(base), losses(adv)
    assert a[0] == b[0]  # the logged loss is the clean loss: same first batch, same weights
    assert a[1:] != b[1:]  # the adversarial term changed the updates


def test_early_stopping(tmp_path, pydoc_corpus):
    _, summary = run_tiny(tmp_path, pydoc_corpus, "es", train={"max_steps": 200, "eval_interval": 5, "patience": 2,
                                                               "min_delta": 100.0, "samples": 0})
    assert summary["stopped"] == "early_stop" and summary["steps"] == 15


def test_lora_and_full_finetune_from_local_hf_folder_and_export(tmp_path, tiny_run, pydoc_corpus):
    from transformers import AutoModelForCausalLM

    from aigc.generate.text import load_model

    run, summary = run_tiny(tmp_path, pydoc_corpus, "lora", init={"path": str(tiny_run)},
                            lora={"enabled": True, "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                            train={"max_steps": 6, "lr": 0.05, "samples": 0})
    assert (run / "model" / "adapter_config.json").is_file()
    assert 0 < summary["trainable_parameters"] < summary["parameters"] / 2
    out = tmp_path / "export"
    res = subprocess.run([sys.executable, "-m", "aigc.cli", "export", str(run), str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    merged = AutoModelForCausalLM.from_pretrained(str(out))
    assert not any("lora" in n for n, _ in merged.named_parameters())
    served, _ = load_model(run)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_run / "model"))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, served(ids).logits)
        assert not torch.allclose(merged(ids).logits, base(ids).logits)  # the adapter did learn something
    # Full fine-tuning continues from the pretrained weights: its first loss is the base model's level.
    full, _ = run_tiny(tmp_path, pydoc_corpus, "full", init={"path": str(tiny_run)}, train={"max_steps": 3, "samples": 0})
    scratch_first = losses(tiny_run)[0]
    assert losses(full)[0] < scratch_first - 0.5


def test_lora_needs_a_pretrained_model():
    from aigc.errors import UserError

    with pytest.raises(UserError, match="lora.enabled needs a pretrained starting point"):
        load_config(TextTrainConfig, overrides={"lora": {"enabled": True}})


def test_failed_overwrite_keeps_the_old_run(tiny_run, tmp_path):
    from aigc.errors import UserError

    before = (tiny_run / "config.yaml").read_text()
    cfg = load_config(TextTrainConfig, TINY, {"data": {"path": str(tmp_path / "no-such-corpus")}})
    with pytest.raises(UserError, match="not a prepared corpus"):
        prepare_run(cfg, tiny_run, overwrite=True)
    assert (tiny_run / "config.yaml").read_text() == before and (tiny_run / "model" / "model.safetensors").is_file()
    assert not [p for p in tiny_run.parent.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_continued_pretraining_on_text_the_tokenizer_cannot_read_is_refused_or_extended(tmp_path, tiny_run):
    """The measured failure: a character model fine-tuned on text in another script learns to predict <unk>."""
    from aigc.data.text import prepare
    from aigc.errors import UserError

    src = tmp_path / "ci.txt"
    import random

    rng, chars = random.Random(0), "床前明月光疑是地上霜举头望低思故乡春眠不觉晓处闻啼鸟夜来风雨声花落知多少"
    src.write_text("\n\n".join("".join(rng.choice(chars) for _ in range(120)) for _ in range(40)), encoding="utf-8")
    corpus = tmp_path / "ci"
    prepare([src], corpus)
    with pytest.raises(UserError, match=r"% of the training tokens are unknown .*--tokenizer.extend=true"):
        run_tiny(tmp_path, corpus, "refused", init={"path": str(tiny_run)})
    run, summary = run_tiny(tmp_path, corpus, "extended", init={"path": str(tiny_run)}, tokenizer={"extend": True},
                            train={"max_steps": 3, "samples": 0})
    cov = summary["tokenizer_coverage"]
    assert cov["unknown_token_rate"] > 0.5 and cov["unknown_token_rate_after"] == 0.0 and cov["added_tokens"] >= 15
    manifest = json.loads((run / "dataset" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["tokenizer_coverage"] == cov
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(run / "model"))
    model = AutoModelForCausalLM.from_pretrained(str(run / "model"))
    assert tok.unk_token_id not in tok("明月")["input_ids"] and model.get_input_embeddings().weight.shape[0] == len(tok)
