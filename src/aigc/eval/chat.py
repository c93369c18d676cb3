"""Evaluation of a chat model on held-out conversations: does it answer the task right, and stop when done?

For each held-out conversation the model answers the messages before the reference answer (greedy, through its
chat template, the ids training used). The report has, for the tuned model and beside it the model it started from:

- the task checker's scores, when the data came from a built-in task (data/tasks.py) or a checker is given as
  ``module:function`` (called as ``function(prompt_messages, answer) -> dict``): booleans and numbers are averaged,
  lists become the share of answers where they are non-empty (``invented_facts`` -> ``invented_facts_rate``), and
  ``correct`` is reported as ``accuracy``;
- BLEU and ROUGE against the reference answers (a character tokenizer for Chinese);
- ``eos_rate``: the share of answers that ended with the end-of-turn token before ``max_new_tokens``;
- length statistics (tokens and words).

Written as ``report.json`` and ``report.md`` (RUN/eval/chat, or RUN/eval/chat-NAME with ``--data``).
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Callable

import numpy as np

from aigc.errors import UserError
from aigc.eval.text import bleu, rouge

Checker = Callable[[list[dict], str], dict]


def load_checker(spec: str) -> Checker:
    """``module:function`` (importable from the working directory too) or the name of a built-in task."""
    from aigc.data import tasks

    if spec in tasks.TASKS:
        return lambda prompt, answer: tasks.check(spec, prompt, answer)
    if ":" not in spec:
        raise UserError(f"--checker {spec!r}: write MODULE:FUNCTION, or a built-in task ({', '.join(tasks.TASKS)})")
    module, _, name = spec.partition(":")
    import sys

    if "" not in sys.path:
        sys.path.insert(0, "")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"--checker {spec}: {e}") from None
    if not callable(fn):
        raise UserError(f"--checker {spec}: not a function")
    return fn


def held_out(records: list[dict]) -> list[tuple[list[dict], str]]:
    """(the messages before the answer, the reference answer) of each held-out chat or preference record."""
    out = []
    for r in records:
        if "messages" in r:
            msgs = r["messages"]
            last = max(k for k, m in enumerate(msgs) if m["role"] == "assistant")
            out.append((msgs[:last], msgs[last]["content"]))
        else:  # a preference pair: the chosen answer is the reference
            out.append((r["prompt"], r["chosen"][0]["content"]))
    return out


def aggregate(verdicts: list[dict]) -> dict:
    """Means of each checker field over the answers (see the module's docstring)."""
    out: dict = {}
    for key in verdicts[0] if verdicts else []:
        values = [v.get(key) for v in verdicts]
        if all(isinstance(x, bool) for x in values):
            out["accuracy" if key == "correct" else key] = float(np.mean(values))
        elif all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in values):
            out[key] = float(np.mean(values))
        elif all(isinstance(x, list) for x in values):
            out[f"{key}_rate"] = float(np.mean([bool(x) for x in values]))
    return out


def score(gen, pairs: list[tuple[list[dict], str]], checker: Checker | None, max_new_tokens: int, batch: int = 8,
          progress: Callable[[int, int], None] | None = None) -> tuple[dict, list[str]]:
    """One model's scores on the held-out pairs, and its answers."""
    from aigc.generate.text import SamplingParams

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, seed=0)
    outs = []
    for i in range(0, len(pairs), batch):
        outs += gen.chat([p for p, _ in pairs[i : i + batch]], params)
        if progress:
            progress(len(outs), len(pairs))
    answers = [o.text.strip() for o in outs]
    refs = [r for _, r in pairs]
    r = rouge(answers, refs)
    tokens = [o.completion_tokens for o in outs]
    result = {"examples": len(pairs), "eos_rate": float(np.mean([o.finish_reason == "stop" for o in outs])),
              "bleu": bleu(answers, refs), "rouge_l": r["rougeL"], "rouge1": r["rouge1"], "rouge2": r["rouge2"],
              "tokens_mean": float(np.mean(tokens)), "tokens_max": int(max(tokens)),
              "words_mean": float(np.mean([len(a.split()) for a in answers]))}
    if checker is not None:
        result.update(aggregate([checker(p, a) for (p, _), a in zip(pairs, answers)]))
    return result, answers


def base_generator(run_dir: Path, own, device=None):
    """The model a chat run started from (its ``init.path``), with the chat template of the run's tokenizer ``own``."""
    from aigc.config import load_yaml
    from aigc.data.chat_tokens import ensure_chat_template
    from aigc.generate.text import TextGenerator
    from aigc.models.lm import load_pretrained

    init = load_yaml(run_dir / "config.yaml").get("init", {}).get("path", "")
    if not init:
        return None, ""
    model, tok = load_pretrained(init)
    if not getattr(tok, "chat_template", None) and own.chat_template:
        tok.chat_template = own.chat_template
    ensure_chat_template(tok)
    if len(tok) < len(own):  # the run extended the tokenizer: the base cannot read the new tokens, give it the run's
        from aigc.models.lm import fit_vocabulary

        fit_vocabulary(model, len(own))
        tok = own
    return TextGenerator(model.to(device) if device is not None else model, tok), init


def evaluate_chat(run_dir: str | Path, data: str | Path | None = None, checker: str | None = None, limit: int = 100,
                  max_new_tokens: int = 256, base: bool = True, out_dir: str | Path | None = None,
                  progress: Callable[[str, int, int], None] | None = None, device: str = "cpu") -> dict:
    """Score a chat run (and its starting model) on held-out conversations; write report.json and report.md."""
    from aigc.data import chat as chat_data
    from aigc.generate.text import TextGenerator

    run_dir = Path(run_dir)
    if data is not None:
        path = Path(data)
        kind = json.loads((path / "manifest.json").read_text()).get("kind") if (path / "manifest.json").is_file() else None
        train, val, manifest = chat_data.load_prepared(path, kind if kind in ("chat", "preference") else "chat")
        records, task = val or train, manifest.get("task")
    else:
        f = run_dir / "data" / "val.records.jsonl"
        if not f.is_file():
            raise UserError(f"{run_dir}: not a chat run (no held-out conversations); pass --data PREPARED_CHAT_DIR")
        records = [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
        manifest_path = run_dir / "dataset" / "manifest.json"
        task = json.loads(manifest_path.read_text(encoding="utf-8")).get("task") if manifest_path.is_file() else None
    if limit < 1:
        raise UserError(f"--limit must be >= 1, got {limit}")
    pairs = held_out(records)[:limit]
    if not pairs:
        raise UserError("no held-out conversations to answer")
    check = load_checker(checker or task) if (checker or task) else None
    report: dict = {"run": str(run_dir), "data": str(data) if data else "held-out split", "task": task, "checker": checker or task,
                    "examples": len(pairs), "max_new_tokens": max_new_tokens}

    def stage(name):
        return (lambda done, total: progress(name, done, total)) if progress else None

    tuned_gen = TextGenerator.from_path(run_dir, device=device)
    report["tuned"], answers = score(tuned_gen, pairs, check, max_new_tokens, progress=stage("answering (tuned)"))
    if base:
        gen, init = base_generator(run_dir, tuned_gen.tokenizer, tuned_gen.device)
        if gen is not None:
            report["base"], _ = score(gen, pairs, check, max_new_tokens, progress=stage("answering (base)"))
            report["base_model"] = init
    report["samples"] = [{"prompt": p[-1]["content"], "reference": ref, "answer": a} for (p, ref), a in list(zip(pairs, answers))[:5]]
    out = Path(out_dir) if out_dir else run_dir / "eval" / ("chat" if data is None else f"chat-{Path(data).name}")
    write_report(report, out)
    return report


def write_report(report: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    cols = ["tuned"] + (["base"] if "base" in report else [])
    lines = [f"# Chat evaluation: {report['run']}", "",
             f"{report['examples']} held-out conversations ({report['data']}); task checker: {report['checker'] or 'none'}; "
             f"greedy answers of at most {report['max_new_tokens']} tokens.", ""]
    if "base" in report:
        lines += [f"Base model: `{report['base_model']}`.", ""]
    lines += ["| metric | " + " | ".join(cols) + " |", "| --- |" + " --- |" * len(cols)]
    for key in report["tuned"]:
        cells = []
        for c in cols:
            v = report[c].get(key)
            cells.append("" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v)))
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines.append("")
    for s in report.get("samples", []):
        lines += ["```text", s["prompt"], ">>>", s["answer"], "```", ""]
    (out_dir / "report.md").write_text("\n".join(lines), encoding="utf-8")

