"""Instruction tuning benchmark (SFT and DPO of SmolLM2-135M-Instruct with LoRA); prints ONE JSON object last.

1. SFT: LoRA on product descriptions and exercises together (the built-in tasks, --count records each) for
   --seconds of training (config sft-smollm2-lora); then the held-out answers of the base and the tuned model,
   scored by each task's checker (products: attribute coverage, style compliance, invented facts, EOS before the
   token limit, ROUGE-L against the reference; exercises: the answer's accuracy).
2. DPO: LoRA DPO of the base model on product preference pairs for --dpo-seconds; the held-out preference
   accuracy (the share of pairs whose chosen answer has the higher mean per-token log-probability) before and after.
   (From the SFT model it starts at 1.0: SFT on the same house style already prefers every chosen answer.)
3. Reference: the same LoRA SFT for one pass over the same --ref-examples conversations with TRL's SFTTrainer
   (packing, completion-only loss, bf16, same sequence length, batch and LoRA settings) and with ours, in this
   run; tokens/s over the same examples' tokens. TRL is installed here if missing (a benchmark-only dependency,
   with torch pinned), never by the product.

python benchmarks/sft.py --seconds 900      # the issue's targets
python benchmarks/sft.py --seconds 60 --eval-limit 8 --ref-examples 16   # a quick look
"""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LORA = {"enabled": True, "r": 16, "alpha": 32, "dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def log(msg: str) -> None:
    print(f"[sft] {time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def prepare(out: Path, task: str, kind: str, count: int, seed: int) -> Path:
    from aigc.data.chat import ChatPrepareOptions, prepare as prep

    prep([], out, ChatPrepareOptions(kind=kind, seed=seed), builtin=[task], count=count, overwrite=True)
    return out


def combine(out: Path, parts: list[Path]) -> Path:
    """One training set from the train splits of several prepared folders (their val splits stay held out)."""
    from aigc.data.chat import ChatPrepareOptions, prepare as prep

    prep([p / "train.jsonl" for p in parts], out, ChatPrepareOptions(kind="chat", val_fraction=0.05), overwrite=True)
    return out


def train(task: str, data: Path, run: Path, init: str, seconds: float, extra: dict | None = None) -> dict:
    from aigc.config import load_config
    from aigc.train.text import TextTrainConfig, prepare_run, train as fit

    name = "sft-smollm2-lora" if task == "sft" else "dpo-smollm2"
    overrides = {"data": {"path": str(data)}, "init": {"path": init},
                 "train": {"max_seconds": seconds, "max_steps": 100_000, "patience": 0, "samples": 0, **(extra or {})}}
    cfg = load_config(TextTrainConfig, ROOT / "src/aigc/configs/text" / f"{name}.yaml", overrides)
    prepare_run(cfg, run, overwrite=True)
    return fit(cfg, run)


def chat_scores(run: Path, data: Path, limit: int, keys: tuple[str, ...], out: Path) -> dict:
    from aigc.eval.chat import evaluate_chat

    report = evaluate_chat(run, data, limit=limit, max_new_tokens=256, out_dir=out)
    return {side: {k: round(report[side][k], 4) for k in keys} for side in ("base", "tuned")}


# ---------------------------------------------------------------- the TRL reference

def ensure_trl() -> None:
    try:
        import trl  # noqa: F401
    except ImportError:
        log("installing trl for the reference (benchmark only)")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints.txt"), "trl"], check=True)


def reference(data: Path, examples: int, block: int, batch: int, tmp: Path) -> dict:
    """Tokens/s of one pass over the same conversations: TRL's SFTTrainer, then ours."""
    import torch

    from aigc.data.chat import load_prepared
    from aigc.data.chat_tokens import encode_chat
    from aigc.models.lm import load_pretrained

    train_records, _, _ = load_prepared(data, "chat")
    records = train_records[:examples]
    model, tok = load_pretrained("smollm2")
    tokens = sum(len(encode_chat(tok, r["messages"]).input_ids) for r in records)

    ensure_trl()
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    ds = Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in records])
    args = SFTConfig(output_dir=str(tmp / "trl"), max_length=block, packing=True, per_device_train_batch_size=batch,
                     gradient_accumulation_steps=1, num_train_epochs=1, learning_rate=1e-3, lr_scheduler_type="cosine",
                     warmup_steps=2, bf16=True, use_cpu=True, report_to="none", save_strategy="no", logging_steps=1,
                     dataloader_num_workers=0, seed=0, completion_only_loss=True)
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             target_modules=LORA["target_modules"], task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft_config)
    t0 = time.perf_counter()
    trainer.train()
    trl_s = time.perf_counter() - t0
    del trainer, model
    torch.manual_seed(0)

    # ours: one pass over the same examples (their packed rows), same block, batch and LoRA
    sub = tmp / "ref-data"
    sub.mkdir(parents=True, exist_ok=True)
    for split, recs in (("train", records), ("val", records[:batch])):
        (sub / f"{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    (sub / "manifest.json").write_text(json.dumps({"kind": "chat", "note": "the reference's examples"}))
    rows = len(_packed_rows(records, tok, block))
    summary = train("sft", sub, tmp / "ours", "smollm2", 0,
                    {"max_steps": -(-rows // batch), "batch_size": batch, "eval_interval": 10**6, "eval_batches": 1})
    ours_s = summary["elapsed_s"]
    return {"examples": len(records), "tokens": tokens, "rows": rows, "trl_s": round(trl_s, 2), "ours_s": ours_s,
            "trl_tokens_per_s": round(tokens / trl_s, 1), "ours_tokens_per_s": round(tokens / ours_s, 1),
            "ratio": round(trl_s / ours_s, 3)}


def _packed_rows(records: list[dict], tok, block: int) -> list:
    from aigc.data.chat_tokens import encode_chat, pack

    return pack([encode_chat(tok, r["messages"]) for r in records], block, tok.pad_token_id or 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=900, help="SFT training budget")
    ap.add_argument("--dpo-seconds", type=float, default=0, help="DPO budget (default: a third of --seconds)")
    ap.add_argument("--count", type=int, default=1000, help="records generated per built-in task")
    ap.add_argument("--eval-limit", type=int, default=50, help="held-out conversations answered per task and model")
    ap.add_argument("--ref-examples", type=int, default=48, help="conversations in the TRL comparison (0: skip it)")
    ap.add_argument("--work", type=Path, default=None, help="keep the runs here (default: a temp folder)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from aigc import threads

    threads.configure()
    work = args.work or Path(tempfile.mkdtemp(prefix="aigc-sft-"))
    work.mkdir(parents=True, exist_ok=True)
    block, batch = 512, 4

    log("preparing data")
    products = prepare(work / "products", "products", "chat", args.count, 1)
    exercises = prepare(work / "exercises", "exercises", "chat", args.count, 2)
    mixed = combine(work / "mixed", [products, exercises])
    pairs = prepare(work / "products-pref", "products", "preference", max(100, args.count // 2), 3)

    log(f"SFT for {args.seconds:.0f} s")
    sft = train("sft", mixed, work / "sft", "smollm2", args.seconds)
    log(f"SFT: {sft['steps']} steps, {sft['tokens_per_s']} tokens/s, val loss {sft['start']['val_loss']:.3f} -> {sft['best_val_loss']:.3f}")
    log("answering held-out products")
    prod = chat_scores(work / "sft", products, args.eval_limit,
                       ("attribute_coverage", "style_compliance", "invented_facts_rate", "eos_rate", "rouge_l"), work / "eval-products")
    log(f"products: {prod}")
    log("answering held-out exercises")
    ex = chat_scores(work / "sft", exercises, args.eval_limit, ("accuracy", "eos_rate"), work / "eval-exercises")
    log(f"exercises: {ex}")

    dpo_seconds = args.dpo_seconds or args.seconds / 3
    log(f"DPO for {dpo_seconds:.0f} s from the base model")
    dpo = train("dpo", pairs, work / "dpo", "smollm2", dpo_seconds, {"eval_batches": 16})
    log(f"DPO: {dpo['steps']} steps; preference accuracy {dpo['start']['val_preference_accuracy']} -> {dpo['val_preference_accuracy']}")

    ref = {}
    if args.ref_examples:
        log(f"reference: TRL SFTTrainer vs ours on {args.ref_examples} conversations")
        ref = reference(products, args.ref_examples, block, batch, work / "ref")
        log(f"reference: {ref}")

    out = {"benchmark": "sft", "seconds": args.seconds,
           "products": {**prod, "train_s": sft["elapsed_s"], "train_tokens_per_s": sft["tokens_per_s"], "steps": sft["steps"],
                        "epochs": sft["epochs"]},
           "exercises": {side: {"accuracy": ex[side]["accuracy"], "eos_rate": ex[side]["eos_rate"]} for side in ("base", "tuned")},
           "dpo": {"preference_accuracy_before": dpo["start"]["val_preference_accuracy"],
                   "preference_accuracy_after": dpo["val_preference_accuracy"],
                   "reward_accuracy_after": dpo["val_reward_accuracy"], "init": "smollm2",
                   "held_out_pairs": min(32, json.loads((work / "dpo" / "data" / "val.json").read_text())["kept"]),
                   "steps": dpo["steps"], "train_s": dpo["elapsed_s"]},
           "reference": {k: ref[k] for k in ("trl_tokens_per_s", "ours_tokens_per_s", "ratio", "examples", "tokens")} if ref else None,
           "threads": threads.current().to_dict()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
