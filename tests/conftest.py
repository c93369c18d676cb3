import contextlib
import json
import io
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

AIGC = [sys.executable, "-m", "aigc.cli"]
# One torch thread in every test and every process a test starts: results do not depend on how many cores
# the machine has or how busy it is (float sums, and so trained weights, depend on the thread count).
os.environ["AIGC_THREADS"] = "1"
torch.set_num_threads(1)


def wait_for(check, what: str, timeout: float = 120.0, interval: float = 0.05, proc=None):
    """Poll ``check()`` until it returns something truthy and return that. Past ``timeout`` seconds, or as
    soon as ``proc`` (a subprocess the wait depends on) has exited, fail naming what was awaited."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            output = proc.stderr.read()[-3000:] if proc.stderr else ""
            raise AssertionError(f"waiting for {what}: the process exited with {proc.returncode}\n{output}")
        try:
            result = check()
        except Exception as e:  # a server not listening yet, a file not written yet
            result, last_error = None, e
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"gave up waiting for {what} after {timeout:.0f} s" + (f" (last error: {last_error!r})" if last_error else ""))


@pytest.fixture(scope="session")
def pydoc_corpus(tmp_path_factory) -> Path:
    """The built-in English corpus, prepared once per session."""
    from aigc.data.text import prepare

    out = tmp_path_factory.mktemp("corpus") / "pydoc"
    prepare([], out, builtin=["pydoc"])
    return out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, pydoc_corpus) -> Path:
    """A tiny character-level model trained for a few steps (shared by generate/eval tests)."""
    from aigc.config import load_config
    from aigc.train.lm import TextTrainConfig, prepare_run, train

    run = tmp_path_factory.mktemp("runs") / "tiny"
    cfg = load_config(TextTrainConfig, Path(__file__).parents[1] / "src/aigc/configs/text/tiny.yaml",
                      {"data": {"path": str(pydoc_corpus)}, "train": {"max_steps": 40}})
    prepare_run(cfg, run)
    train(cfg, run)
    return run


def run_cli(*args, ok=True, stdin=None, cwd=None):
    """`aigc ARGS...` in this process (the same entry point as the console script, without paying the imports each time)."""
    from aigc import cli

    out, err = io.StringIO(), io.StringIO()
    saved = sys.argv, sys.stdin, os.getcwd()
    sys.argv = ["aigc", *map(str, args)]
    if stdin is not None:
        sys.stdin = io.StringIO(stdin)
    if cwd is not None:
        os.chdir(cwd)
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli.main()
    except SystemExit as exc:
        code = exc.code or 0
    finally:
        sys.argv, sys.stdin = saved[:2]
        os.chdir(saved[2])
    res = SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())
    if ok:
        assert res.returncode == 0, res.stderr[-3000:]
    return res


TINY_IMAGE = Path(__file__).parents[1] / "src/aigc/configs/image/tiny.yaml"


@pytest.fixture(scope="session")
def text_model(tmp_path_factory, tiny_run) -> Path:
    """A random 2-layer Llama (its outputs are diverse, unlike a 40-step model) with the tiny run's tokenizer."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("models") / "rand"
    tok = AutoTokenizer.from_pretrained(str(tiny_run / "model"))
    _random_llama(tok, 128).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def _random_llama(tok, context: int):
    """A seeded random 2-layer Llama for ``tok``'s vocabulary, with sharpened logits (greedy outputs differ from
    prompt to prompt)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=context, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8)
    return model


@pytest.fixture(scope="session")
def long_models(tmp_path_factory, tiny_run) -> dict[str, Path]:
    """text_model's kind with a 2048-token context, for prompts that list tools: "plain" without a chat template
    (a model pretrained here), "chat" with the built-in one (as an SFT run saves it)."""
    from transformers import AutoTokenizer

    from aigc.data.chat_tokens import ensure_chat_template

    tok = AutoTokenizer.from_pretrained(str(tiny_run / "model"))
    model = _random_llama(tok, 2048)
    out = {}
    for name in ("plain", "chat"):
        out[name] = tmp_path_factory.mktemp("models") / f"long-{name}"
        if name == "chat":
            ensure_chat_template(tok)
        model.save_pretrained(str(out[name]))
        tok.save_pretrained(str(out[name]), save_jinja_files=False)
    return out


@pytest.fixture(scope="session")
def image_model(tmp_path_factory) -> Path:
    from aigc.config import load_config
    from aigc.data.images import ImagePrepareOptions, prepare
    from aigc.train.image import ImageTrainConfig, prepare_run, train

    root = tmp_path_factory.mktemp("imagemodel")
    prepare([], root / "shapes", ImagePrepareOptions(size=8, count=120), builtin=["shapes"])
    cfg = load_config(ImageTrainConfig, TINY_IMAGE, {"data": {"path": str(root / "shapes")}, "model": {"kind": "vae"}})
    run = root / "shapes-vae"
    prepare_run(cfg, run)
    train(cfg, run)
    return run


@pytest.fixture(scope="session", autouse=True)
def _private_home(tmp_path_factory):
    """Keys, certificates and databases the CLI creates go to a temporary home, never the user's ~/.aigc."""
    old = os.environ.get("AIGC_HOME")
    home = tmp_path_factory.mktemp("aigc-home")
    os.environ["AIGC_HOME"] = str(home)
    # A fixed text-watermark key, so the CLI's watermarked samples are the same in every run (a random key makes
    # the green list, and so where a random model draws its end token, differ from run to run).
    (home / "keys").mkdir()
    (home / "keys" / "text-watermark.key").write_bytes(bytes(range(32)))
    (home / "keys" / "text-watermark.key").chmod(0o600)
    yield
    if old is None:
        os.environ.pop("AIGC_HOME", None)
    else:
        os.environ["AIGC_HOME"] = old


@pytest.fixture(scope="session")
def spread_model(tmp_path_factory, tiny_run) -> Path:
    """A random 2-layer Llama at its default initialisation (high-entropy outputs, as a watermark needs) with the
    tiny run's tokenizer, saved as a run directory."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("models") / "spread"
    tok = AutoTokenizer.from_pretrained(str(tiny_run / "model"))
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(str(out / "model"))
    tok.save_pretrained(str(out / "model"))
    return out


@pytest.fixture(scope="session")
def music_data(tmp_path_factory) -> Path:
    """Six built-in chorales, transposed -1..+1 for training."""
    from aigc.data.music import MusicPrepareOptions, prepare

    out = tmp_path_factory.mktemp("musicdata") / "chorales"
    prepare([], out, MusicPrepareOptions(limit=6, transpose=[-1, 1], val_fraction=0.3), builtin=["chorales"])
    return out


@pytest.fixture(scope="session")
def music_model(tmp_path_factory, music_data) -> Path:
    from aigc.config import load_config
    from aigc.train.music import MusicTrainConfig, prepare_run, train

    cfg = load_config(MusicTrainConfig, Path(__file__).parent.parent / "src/aigc/configs/music/tiny.yaml",
                      {"data": {"path": str(music_data)}, "train": {"samples": 0}})
    run = tmp_path_factory.mktemp("musicmodel") / "chorale-tiny"
    prepare_run(cfg, run)
    train(cfg, run)
    return run


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory, tiny_run) -> Path:
    """A tiny random Llama (Hugging Face folder) with the tiny run's character tokenizer and the built-in chat
    template: the starting point of the SFT and DPO tests (never the 135M model in the fast tier)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from aigc.data.chat_tokens import ensure_chat_template

    out = tmp_path_factory.mktemp("models") / "chat"
    tok = AutoTokenizer.from_pretrained(str(tiny_run / "model"))
    ensure_chat_template(tok)
    torch.manual_seed(2)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=1024, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(str(out))
    tok.save_pretrained(str(out), save_jinja_files=False)
    return out


@pytest.fixture(scope="session")
def products_chat(tmp_path_factory) -> Path:
    from aigc.data.chat import ChatPrepareOptions, prepare

    out = tmp_path_factory.mktemp("chat") / "products"
    prepare([], out, ChatPrepareOptions(kind="chat"), builtin=["products"], count=60)
    return out


WEATHER_TOOL = {"type": "function", "function": {"name": "weather", "description": "Today's weather in a city",
                                                  "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                                 "required": ["city"]}}}
CITIES = ["Paris", "Rome", "Oslo", "Lima", "Cairo", "Delhi", "Tokyo", "Quito", "Riga", "Bern", "Baku", "Doha", "Kyiv", "Male",
          "Apia", "Suva", "Lome", "Nuuk", "Hanoi", "Accra", "Minsk", "Dakar", "Sofia", "Seoul"]


def weather_records() -> list[dict]:
    """Conversations that offer a weather tool: a weather question gets a call, then its result is reported; a
    greeting gets a plain answer (so a tuned model learns when to call, not only how)."""
    out = []
    for i, city in enumerate(CITIES):
        call = {"id": f"call_{i}", "type": "function", "function": {"name": "weather", "arguments": json.dumps({"city": city})}}
        out.append({"tools": [WEATHER_TOOL], "messages": [
            {"role": "user", "content": f"What is the weather in {city} today?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": f"call_{i}", "content": "sunny, 21 C"},
            {"role": "assistant", "content": f"It is sunny in {city}, 21 C."}]})
        out.append({"tools": [WEATHER_TOOL], "messages": [
            {"role": "user", "content": f"Say hello to {city}."}, {"role": "assistant", "content": f"Hello, {city}!"}]})
    return out


@pytest.fixture(scope="session")
def weather_chat(tmp_path_factory) -> Path:
    from aigc.data.chat import ChatPrepareOptions, prepare

    root = tmp_path_factory.mktemp("chat")
    (root / "weather.jsonl").write_text("".join(json.dumps(r) + "\n" for r in weather_records()))
    prepare([root / "weather.jsonl"], root / "weather", ChatPrepareOptions(kind="chat", near_dedup_threshold=0.0, val_fraction=0.15))
    return root / "weather"


@pytest.fixture(scope="session")
def products_pref(tmp_path_factory) -> Path:
    from aigc.data.chat import ChatPrepareOptions, prepare

    out = tmp_path_factory.mktemp("chat") / "products-pref"
    prepare([], out, ChatPrepareOptions(kind="preference"), builtin=["products"], count=60)
    return out
