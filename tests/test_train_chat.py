"""SFT and DPO of a pretrained model (a tiny random Llama with a chat template here; SmolLM2 in the slow tier)."""
import json
import math

import pytest
import torch

from aigc.config import load_config
from aigc.errors import UserError
from aigc.train.common import read_jsonl
from aigc.train.text import TextTrainConfig, prepare_run, train
from conftest import WEATHER_TOOL, run_cli

LOOP = {"batch_size": 2, "lr": 3e-3, "warmup_steps": 2, "max_steps": 16, "eval_interval": 8, "eval_batches": 2,
        "checkpoint_interval": 8, "precision": "fp32", "samples": 1, "sample_tokens": 20}


def config(task, data, init, **sections):
    return load_config(TextTrainConfig, None, {"task": task, "data": {"path": str(data)}, "init": {"path": str(init)},
                                               "model": {"block_size": 768}, **sections, "train": {**LOOP, **sections.pop("train", {})}})


def test_sft_learns_the_answers_and_saves_a_loadable_chat_model(tmp_path, chat_model, products_chat):
    cfg = config("sft", products_chat, chat_model)
    prepare_run(cfg, tmp_path / "run")
    summary = train(cfg, tmp_path / "run")
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert records[0]["loss"] > records[-1]["loss"] and vals[-1] < vals[0]
    assert summary["task"] == "sft" and summary["data"]["kept"] == summary["data"]["examples"] == 56
    assert summary["data"]["supervised_tokens"] < summary["data"]["tokens"] / 2  # the prompts are long and not trained on
    assert summary["tokenizer_coverage"]["unknown_token_rate"] == 0.0
    # the chat template travels with the checkpoint, inside tokenizer_config.json, and loads with the standard classes
    model_dir = tmp_path / "run" / "model"
    template = json.loads((model_dir / "tokenizer_config.json").read_text())["chat_template"]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    assert tok.chat_template == template and "assistant" in template
    AutoModelForCausalLM.from_pretrained(str(model_dir))
    samples = (tmp_path / "run" / "samples.txt").read_text()
    assert "Write the description for this product." in samples and ">>>" in samples


def test_packing_changes_rows_not_examples(tmp_path, chat_model, products_chat):
    """Packed rows hold several short examples; unpacked, one each: the same examples and supervised tokens."""
    out = {}
    for packing in (True, False):
        cfg = config("sft", products_chat, chat_model, chat={"packing": packing, "mask_history": True}, train={"max_steps": 1, "samples": 0})
        prepare_run(cfg, tmp_path / str(packing))
        out[packing] = json.loads((tmp_path / str(packing) / "data" / "train.json").read_text())
    assert out[True]["supervised_tokens"] == out[False]["supervised_tokens"] > 0
    assert out[False]["rows"] == out[False]["kept"] == 56
    cfg = config("sft", products_chat, chat_model, model={"block_size": 1536}, train={"max_steps": 1, "samples": 0})
    with pytest.raises(UserError, match="longer than the model's context of 1024"):
        prepare_run(cfg, tmp_path / "long")
        train(cfg, tmp_path / "long")


def test_dpo_starts_at_log2_and_prefers_the_chosen_answers(tmp_path, chat_model, products_pref):
    for lora in (True, False):  # LoRA: the reference is the adapter switched off; full: a frozen copy
        cfg = config("dpo", products_pref, chat_model, lora={"enabled": lora}, train={"max_steps": 12, "eval_interval": 12})
        run = tmp_path / f"lora-{lora}"
        prepare_run(cfg, run)
        summary = train(cfg, run)
        records = read_jsonl(run / "metrics.jsonl")
        # at step 1 the policy is the reference: every reward is 0 and the loss is -log sigmoid(0)
        assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-5) and records[0]["reward_margin"] == pytest.approx(0, abs=1e-6)
        late = records[len(records) // 2 :]
        assert sum(r["reward_accuracy"] for r in late) / len(late) > 0.7 and sum(r["reward_margin"] for r in late) > 0
        assert summary["best_val_loss"] < math.log(2) - 0.003  # held out: the chosen answers gain on the rejected ones
        assert 0 <= summary["val_reward_accuracy"] <= 1 and 0 <= summary["val_preference_accuracy"] <= 1


def test_wrong_data_kind_and_missing_base_model_are_one_line_errors(tmp_path, chat_model, products_chat, pydoc_corpus):
    with pytest.raises(UserError, match="a prepared chat dataset, not a preference one"):
        prepare_run(config("dpo", products_chat, chat_model), tmp_path / "a")
    with pytest.raises(UserError, match="a prepared text dataset, not a chat one"):
        prepare_run(config("sft", pydoc_corpus, chat_model), tmp_path / "b")
    with pytest.raises(UserError, match="fine-tunes a pretrained model: set init.path"):
        load_config(TextTrainConfig, None, {"task": "sft", "data": {"path": str(products_chat)}})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.fixture(scope="module")
def poems_chat(tmp_path_factory):
    from aigc.data.chat import ChatPrepareOptions, prepare

    out = tmp_path_factory.mktemp("chat") / "poems"
    prepare([], out, ChatPrepareOptions(kind="chat"), builtin=["poems"], count=40)
    return out


def test_unknown_characters_are_refused_then_added_with_extend(tmp_path, chat_model, poems_chat):
    """The character model knows no Chinese: fine-tuning on poems would train it to predict <unk>."""
    with pytest.raises(UserError, match=r"unknown to the base model's tokenizer .* --tokenizer.extend=true"):
        prepare_run(config("sft", poems_chat, chat_model), tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    for lora in (False, True):
        run = tmp_path / f"extended-{lora}"
        cfg = config("sft", poems_chat, chat_model, tokenizer={"extend": True}, lora={"enabled": lora},
                     model={"block_size": 256}, train={"max_steps": 4, "eval_interval": 4})
        prepare_run(cfg, run)
        summary = train(cfg, run)
        cov = summary["tokenizer_coverage"]
        assert cov["unknown_token_rate"] > 0.2 and cov["added_tokens"] == cov["missing_symbols"] > 100
        assert cov["unknown_token_rate_after"] == 0.0
        from aigc.generate.text import load_model

        model, tok = load_model(run)  # LoRA: the base grown to the new vocabulary, then the adapter merged
        poem = json.loads((poems_chat / "train.jsonl").read_text(encoding="utf-8").splitlines()[0])["messages"][-1]["content"]
        assert model.get_input_embeddings().weight.shape[0] == len(tok) > 500 and tok.unk_token_id not in tok(poem)["input_ids"]
        if lora:  # only the new tokens' embedding rows were trained, beside the adapter
            ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
            assert any("trainable_tokens" in n for n in ckpt["params"])


def test_cli_sft_lora_config_trains_and_answers_chat(tmp_path, chat_model, products_chat):
    run = tmp_path / "sft"
    res = run_cli("train", "text", "sft-smollm2-lora", "--data", products_chat, "--run", run, f"--init.path={chat_model}",
                  "--model.block_size=768", "--train.max_steps=4", "--train.eval_interval=4", "--train.batch_size=2",
                  "--train.samples=0", "--train.precision=fp32", "--json")
    summary = json.loads(res.stdout)
    assert summary["task"] == "sft" and summary["steps"] == 4 and summary["trainable_parameters"] < summary["parameters"]
    res = run_cli("generate", "text", run, "--chat", "Write the description for this product.\nname: Nook Mug",
                  "--max-new-tokens", "8", "--seed", "1", "--json")
    out = json.loads(res.stdout)
    assert out["chat"] is True and len(out["completions"]) == 1
    # evaluation: the task's checker on held-out answers, beside the base model's
    res = run_cli("eval", "text", run, "--limit", "3", "--max-new-tokens", "12", "--json")
    report = json.loads(res.stdout)
    assert report["task"] == "products" and report["examples"] == 3 and report["base_model"] == str(chat_model)
    for side in ("tuned", "base"):
        assert {"attribute_coverage", "style_compliance", "invented_facts_rate", "eos_rate", "rouge_l", "bleu", "tokens_mean"} <= set(report[side])
        assert report[side]["tokens_mean"] <= 12 and 0 <= report[side]["attribute_coverage"] <= 1
    md = (run / "eval" / "chat" / "report.md").read_text()
    assert "| attribute_coverage |" in md and "Base model" in md


def test_a_user_checker_scores_any_chat_data(tmp_path, monkeypatch, text_model, products_chat):
    from aigc.eval.chat import aggregate, evaluate_chat

    assert aggregate([{"correct": True, "n": 2, "errs": [], "s": "x"}, {"correct": False, "n": 4, "errs": ["e"], "s": "y"}]) == \
        {"accuracy": 0.5, "n": 3.0, "errs_rate": 0.5}
    (tmp_path / "mycheck.py").write_text("def check(prompt, answer):\n    return {'mentions_name': 'Nook' in answer, "
                                         "'length': len(answer)}\n")
    monkeypatch.chdir(tmp_path)
    report = evaluate_chat(text_model, products_chat, "mycheck:check", limit=2, max_new_tokens=5, base=False,
                           out_dir=tmp_path / "out")
    assert set(report["tuned"]) >= {"mentions_name", "length", "eos_rate"} and "base" not in report
    with pytest.raises(UserError, match="write MODULE:FUNCTION"):
        evaluate_chat(text_model, products_chat, "nonsense", limit=2)
    with pytest.raises(UserError, match="No module named"):
        evaluate_chat(text_model, products_chat, "nomodule:check", limit=2)


def test_output_layer_on_supervised_positions_only_gives_the_full_losses():
    """The loop runs the output layer where a loss is taken; the answers' log-probabilities and the SFT loss are
    those of the full logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from aigc.train.chat import answer_logprobs, sft_loss

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    ids = torch.randint(0, 50, (2, 7))
    labels = ids.clone()
    labels[0, :3], labels[1, :5], labels[1, 6] = -100, -100, -100
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids), "tokens": 14}
    with torch.no_grad():
        lp = model(ids).logits.log_softmax(-1)  # (B, T, V)
        got, counts = answer_logprobs(model, batch, "fp32")
        loss, n = sft_loss(model, batch, "fp32")
    want = [sum(lp[b, t - 1, ids[b, t]] for t in range(1, 7) if labels[b, t] != -100) for b in range(2)]
    assert got.tolist() == pytest.approx([w.item() for w in want], rel=1e-5) and counts.tolist() == [4, 1]
    assert n == 5 and loss.item() == pytest.approx(-(want[0] + want[1]).item() / 5, rel=1e-5)


def test_sft_killed_with_sigkill_resumes_exactly(tmp_path, chat_model, products_chat):
    import os
    import signal
    import subprocess
    import time

    from conftest import AIGC

    args = ["train", "text", "sft-smollm2-lora", "--data", str(products_chat), f"--init.path={chat_model}",
            "--model.block_size=768", "--train.max_steps=40", "--train.checkpoint_interval=5", "--train.eval_interval=20",
            "--train.batch_size=2", "--train.eval_batches=1", "--train.samples=0", "--train.precision=fp32", "--train.patience=0"]
    run_cli(*args, "--run", tmp_path / "straight")
    proc = subprocess.Popen([*AIGC, *args, "--run", str(tmp_path / "killed")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 300
    while len(read_jsonl(metrics)) < 12 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 12 <= len(read_jsonl(metrics)) < 40, "the run must be killed mid-way"
    run_cli("train", "text", "--resume", "--run", tmp_path / "killed")
    straight, resumed = read_jsonl(tmp_path / "straight" / "metrics.jsonl"), read_jsonl(metrics)
    assert [r["step"] for r in resumed] == list(range(1, 41))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    assert [r.get("val_loss") for r in resumed] == [r.get("val_loss") for r in straight]


def test_sft_on_tool_calls_trains_the_calls_as_the_server_parses_them(tmp_path, chat_model, weather_chat):
    from aigc.generate.text import TextGenerator

    cfg = config("sft", weather_chat, chat_model, train={"max_steps": 12, "eval_interval": 12, "samples": 0})
    prepare_run(cfg, tmp_path / "run")
    summary = train(cfg, tmp_path / "run")
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert records[0]["loss"] > records[-1]["loss"] and summary["data"]["kept"] == summary["data"]["examples"] >= 36
    assert summary["tokenizer_coverage"]["unknown_token_rate"] == 0.0  # the call's and the tool list's characters are counted
    # the tuned run answers with the tool listing in its prompt, as it was trained (the slow tier checks that
    # SmolLM2 learns to call; this 2-layer model does not in 12 steps)
    gen = TextGenerator.from_path(tmp_path / "run")
    ids = gen.encode_chat([{"role": "user", "content": "What is the weather in Oslo today?"}], [WEATHER_TOOL])
    assert "<tools>" in gen.tokenizer.decode(ids) and '"name": "weather"' in gen.tokenizer.decode(ids)
