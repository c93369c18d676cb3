import math

import numpy as np
import pytest
import torch

from aigc.errors import UserError
from aigc.eval import text as ev


def test_rouge_and_bleu_handle_chinese():
    zh = "床前明月光，疑是地上霜。"
    r = ev.rouge([zh], [zh])
    assert r["rouge1"] == pytest.approx(100) and r["rougeL"] == pytest.approx(100)
    assert ev.rouge(["床前明月"], [zh])["rouge1"] == pytest.approx(100 * 2 * (4 / 4 * 4 / 10) / (4 / 4 + 4 / 10))
    assert ev.bleu([zh], [zh]) == pytest.approx(100)
    assert ev.bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100)
    assert ev.bleu(["a b c d"], ["w x y z"]) == pytest.approx(0)


def test_distinct_and_self_bleu():
    assert ev.distinct(["a b a b"], 1) == 0.5 and ev.distinct(["a b a b"], 2) == pytest.approx(2 / 3)
    assert ev.self_bleu(["same words here today"] * 3) == pytest.approx(100)
    assert ev.self_bleu(["alpha beta gamma delta", "one two three four"]) < 1


class Uniform(torch.nn.Module):
    """Every token equally likely: exactly log(V) nats per token."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids):
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, self.vocab)})()


def test_likelihood_of_uniform_model_is_log_vocab():
    ids = np.random.default_rng(0).integers(0, 50, size=1000)
    res = ev.likelihood(Uniform(50), ids, n_chars=2000, block=64)
    assert res["tokens"] == 999  # every token but the first is scored exactly once
    assert res["nats_per_token"] == pytest.approx(math.log(50), rel=1e-5)
    assert res["bits_per_char"] == pytest.approx(999 * math.log(50) / 2000 / math.log(2), rel=1e-5)


def test_evaluate_run_writes_reports(tiny_run):
    report = ev.evaluate_run(tiny_run, n_pairs=3, n_samples=3, max_new_tokens=20, max_tokens=5000)
    assert report["likelihood"]["bits_per_char"] > 0 and report["reference"]["pairs"] == 3
    assert 0 <= report["diversity"]["distinct_1"] <= 1
    md = (tiny_run / "eval" / "report.md").read_text()
    assert "bits per character" in md and "ROUGE-L" in md


def test_any_run_scores_any_prepared_corpus_with_its_unknown_rate(tiny_run, pydoc_corpus, tmp_path):
    from aigc.data.text import prepare

    same = ev.evaluate_run(tiny_run, data=pydoc_corpus, n_pairs=2, n_samples=0, max_new_tokens=10, max_tokens=3000)
    assert same["data"]["path"] == str(pydoc_corpus) and same["data"]["unknown_token_rate"] < 0.01
    assert same["likelihood"]["tokens"] > 0 and same["reference"]["pairs"] == 2
    assert (tiny_run / "eval" / f"data-{pydoc_corpus.name}" / "report.json").is_file()
    prepare([], tmp_path / "tang", builtin=["tang"])
    other = ev.evaluate_run(tiny_run, data=tmp_path / "tang", n_pairs=0, n_samples=0, max_tokens=3000, out_dir=tmp_path / "rep")
    # an English character model has almost no Chinese characters: most tokens are unknown, and the report says so
    assert other["data"]["unknown_token_rate"] > 0.5
    assert "unknown to this model's tokenizer" in (tmp_path / "rep" / "report.md").read_text()
    with pytest.raises(UserError, match="not a prepared corpus"):
        ev.evaluate_run(tiny_run, data=tmp_path / "nothing", n_samples=0)
