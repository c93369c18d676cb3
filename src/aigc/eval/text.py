"""Text evaluation: likelihood on held-out text, reference overlap and diversity of samples.

- perplexity and bits per character (nats summed over tokens / characters / ln 2; comparable across
  tokenizers), scored with overlapping windows so every token but the first sees context;
- BLEU (sacrebleu; its ``zh`` tokenizer when the references are Chinese) and ROUGE-1/2/L F1
  (rouge-score with a tokenizer that keeps CJK characters: its default deletes them);
- distinct-1/2 (unique n-grams / all n-grams over the samples) and self-BLEU (each sample against
  the others: lower is more diverse).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

_TOKEN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[^\W_]+", re.UNICODE)


def tokenize_mixed(text: str) -> list[str]:
    """Words for alphabetic scripts, single characters for CJK (lower-cased)."""
    return _TOKEN.findall(text.lower())


class MixedTokenizer:
    """rouge-score's tokenizer interface (``tokenize``) over ``tokenize_mixed``."""

    def tokenize(self, text: str) -> list[str]:
        return tokenize_mixed(text)


def is_chinese(texts: list[str]) -> bool:
    from aigc.data.text import cjk_fraction

    joined = "".join(texts)
    return bool(joined) and cjk_fraction(joined) > 0.3


@torch.no_grad()
def likelihood(model, ids: np.ndarray, n_chars: int, block: int, max_tokens: int = 0, batch: int = 8,
               progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Perplexity and bits/char of a token stream, scoring the second half of half-overlapping windows."""
    if max_tokens and len(ids) > max_tokens:
        n_chars = int(n_chars * max_tokens / len(ids))
        ids = ids[:max_tokens]
    ids_t = torch.from_numpy(ids.astype(np.int64))
    n = len(ids_t)
    stride = max(1, block // 2)
    windows = []  # (start, first scored target index within window)
    start = 0
    while True:
        windows.append((start, 0 if start == 0 else block - stride))
        if start + block >= n - 1:
            break
        start += stride
    total, count = 0.0, 0
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    for i in range(0, len(windows), batch):
        if progress:
            progress("held-out likelihood (windows)", i, len(windows))
        rows = [(s, skip) for s, skip in windows[i : i + batch] if s + 1 < n]
        lens = [min(block, n - 1 - s) for s, _ in rows]
        length = max(lens)
        x = torch.zeros(len(rows), length, dtype=torch.long)
        y = torch.full((len(rows), length), -100, dtype=torch.long)
        for r, ((s, skip), ln) in enumerate(zip(rows, lens)):
            x[r, :ln] = ids_t[s : s + ln]
            y[r, skip:ln] = ids_t[s + 1 + skip : s + 1 + ln]
        x, y = x.to(device), y.to(device)  # built on the CPU row by row, moved once
        logits = model(input_ids=x).logits.float()
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=-100, reduction="sum")
        total += loss.item()
        count += int((y != -100).sum())
    if progress:
        progress("held-out likelihood (windows)", len(windows), len(windows))
    nats = total / max(1, count)
    return {"tokens": count, "characters": n_chars, "nats_per_token": nats, "perplexity": math.exp(min(nats, 50)),
            "bits_per_char": total / max(1, n_chars) / math.log(2)}


def bleu(hyps: list[str], refs: list[str]) -> float:
    import sacrebleu

    return sacrebleu.corpus_bleu(hyps, [refs], tokenize="zh" if is_chinese(refs) else "13a").score


def rouge(hyps: list[str], refs: list[str]) -> dict:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=MixedTokenizer())
    sums = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for h, r in zip(hyps, refs):
        for k, v in scorer.score(r, h).items():
            sums[k] += v.fmeasure
    return {k: 100 * v / max(1, len(hyps)) for k, v in sums.items()}


def distinct(texts: list[str], n: int) -> float:
    grams = [tuple(toks[i : i + n]) for toks in map(tokenize_mixed, texts) for i in range(len(toks) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def self_bleu(texts: list[str]) -> float:
    import sacrebleu

    if len(texts) < 2:
        return 0.0
    tok = "zh" if is_chinese(texts) else "13a"
    scores = [sacrebleu.sentence_bleu(t, texts[:i] + texts[i + 1 :], tokenize=tok).score for i, t in enumerate(texts)]
    return float(np.mean(scores))


def write_report(report: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    lines = [f"# Text evaluation: {report.get('run', '')}", ""]
    if "data" in report:
        d = report["data"]
        lines += [f"Scored on `{d['path']}`: {d['documents']} documents, {d['tokens']} tokens, "
                  f"{d['unknown_token_rate']:.2%} of them unknown to this model's tokenizer.", ""]
    lik = report.get("likelihood")
    if lik:
        lines += ["## Held-out likelihood", "", "| metric | value |", "| --- | --- |",
                  f"| perplexity (per token) | {lik['perplexity']:.3f} |", f"| nats per token | {lik['nats_per_token']:.4f} |",
                  f"| bits per character | {lik['bits_per_char']:.4f} |", f"| tokens scored | {lik['tokens']} |", ""]
    ref = report.get("reference")
    if ref:
        lines += ["## Against references", "", f"{ref['pairs']} prompt/reference pairs ({ref['source']}).", "",
                  "| metric | value |", "| --- | --- |", f"| BLEU ({ref['bleu_tokenizer']}) | {ref['bleu']:.2f} |",
                  f"| ROUGE-1 F1 | {ref['rouge1']:.2f} |", f"| ROUGE-2 F1 | {ref['rouge2']:.2f} |", f"| ROUGE-L F1 | {ref['rougeL']:.2f} |", ""]
    div = report.get("diversity")
    if div:
        lines += ["## Diversity of samples", "", "| metric | value |", "| --- | --- |",
                  f"| distinct-1 | {div['distinct_1']:.4f} |", f"| distinct-2 | {div['distinct_2']:.4f} |",
                  f"| self-BLEU | {div['self_bleu']:.2f} |", ""]
    samples = report.get("samples") or []
    if samples:
        lines += ["## Samples", ""]
        for s in samples[:5]:
            lines += ["```text", s, "```", ""]
    (out_dir / "report.md").write_text("\n".join(lines), encoding="utf-8")


def _stage(progress: Callable[[str, int, int], None] | None, stage: str) -> Callable[[int, int], None] | None:
    return (lambda done, total: progress(stage, done, total)) if progress else None


def evaluate_run(run_dir: str | Path, references: str | None = None, n_pairs: int = 20, n_samples: int = 8,
                 max_new_tokens: int = 100, max_tokens: int = 200_000, seed: int = 0, prompt: str = "",
                 progress: Callable[[str, int, int], None] | None = None, data: str | Path | None = None,
                 out_dir: str | Path | None = None, device: str = "cpu") -> dict:
    """Evaluate a run's best model (or any model folder); writes report.json and report.md to ``out_dir`` (default:
    RUN/eval, or RUN/eval/data-NAME with ``data``). ``data`` is a prepared text corpus scored instead of the run's own
    held-out text, so two models compare on the same text; ``progress(stage, done, total)`` hears each stage."""
    from aigc.errors import UserError
    from aigc.generate.text import SamplingParams, TextGenerator

    run_dir = Path(run_dir)
    gen = TextGenerator.from_path(run_dir, device=device)
    model = gen.model
    report: dict = {"run": str(run_dir)}
    block = gen.context

    val_bin = run_dir / "data" / "val.bin"
    held_out: list[str] = []
    if data is not None:
        from aigc.data.text import load_prepared

        train_texts, val_texts, _ = load_prepared(data)
        held_out = val_texts or train_texts
        ids, unknown = _encode_texts(gen.tokenizer, held_out)
        report["data"] = {"path": str(data), "documents": len(held_out), "tokens": int(len(ids)),
                          "unknown_token_rate": round(unknown, 6)}
        report["likelihood"] = likelihood(model, ids, sum(len(t) for t in held_out), block, max_tokens, progress=progress)
    elif val_bin.is_file():
        meta = json.loads((run_dir / "data" / "val.json").read_text())
        ids = np.fromfile(val_bin, dtype=meta["dtype"])
        report["likelihood"] = likelihood(model, ids, meta["characters"], block, max_tokens, progress=progress)

    pairs: list[tuple[str, str]] = []
    source = ""
    if references:
        path = Path(references)
        if not path.is_file():
            raise UserError(f"references file not found: {path}")
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                pairs.append((str(obj["prompt"]), str(obj["reference"])))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{path}:{i}: expected a JSON object with 'prompt' and 'reference'") from None
        source = str(path)
    elif held_out or ((run_dir / "dataset").is_dir() and val_bin.is_file()):
        # Continuations of held-out documents: the first third of each is the prompt.
        texts = held_out or _val_texts(run_dir, gen.tokenizer)
        for t in texts[:n_pairs]:
            cut = max(1, min(len(t) // 3, 200))
            if len(t) - cut >= 10:  # the reference is as long as the model may write: max_new_tokens tokens
                cont = gen.tokenizer(t[cut:], add_special_tokens=False)["input_ids"][:max_new_tokens]
                pairs.append((t[:cut], gen.tokenizer.decode(cont)))
        source = "held-out document continuations"
    if pairs:
        outs = gen.generate([p for p, _ in pairs], SamplingParams(max_new_tokens=max_new_tokens, temperature=0, seed=seed),
                            progress=_stage(progress, "continuing held-out prompts"))
        hyps = [o.text for o in outs]
        refs = [r for _, r in pairs]
        r = rouge(hyps, refs)
        report["reference"] = {"pairs": len(pairs), "source": source, "bleu": bleu(hyps, refs),
                               "bleu_tokenizer": "zh" if is_chinese(refs) else "13a", **r}
    if n_samples:
        outs = gen.generate([prompt], SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, top_p=0.95, seed=seed, n=n_samples),
                            progress=_stage(progress, "samples for diversity"))
        samples = [o.text for o in outs]
        report["diversity"] = {"samples": len(samples), "distinct_1": distinct(samples, 1), "distinct_2": distinct(samples, 2),
                               "self_bleu": self_bleu(samples)}
        report["samples"] = samples
    write_report(report, Path(out_dir) if out_dir else run_dir / "eval" / (f"data-{Path(data).name}" if data else ""))
    return report


def _encode_texts(tok, texts: list[str]) -> tuple[np.ndarray, float]:
    """The documents as one id stream (each ended by the end-of-text token) and the share of unknown tokens in it."""
    ids: list[int] = []
    for t in texts:
        ids += tok(t, add_special_tokens=False)["input_ids"]
        if tok.eos_token_id is not None:
            ids.append(tok.eos_token_id)
    unk = tok.unk_token_id
    unknown = sum(1 for i in ids if i == unk) / max(1, len(ids)) if unk is not None else 0.0
    return np.asarray(ids, dtype=np.int64), unknown


def _val_texts(run_dir: Path, tok) -> list[str]:
    """Held-out documents, decoded back from the run's cached validation ids."""
    meta = json.loads((run_dir / "data" / "val.json").read_text())
    ids = np.fromfile(run_dir / "data" / "val.bin", dtype=meta["dtype"]).tolist()
    eos = tok.eos_token_id
    docs, cur = [], []
    for t in ids:
        if t == eos:
            if cur:
                docs.append(cur)
            cur = []
        else:
            cur.append(t)
    return [tok.decode(d) for d in docs]
