import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from aigc.data import tokenizers
from aigc.errors import UserError
from aigc.generate import templates
from aigc.generate.text import HFDecoder, LlamaDecoder, SamplingParams, TextGenerator


def tiny_llama(kv_heads=2, vocab=70, context=16):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=kv_heads, max_position_embeddings=context, tie_word_embeddings=False, rms_norm_eps=1e-5)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_fast_decoder_matches_hf_forward_with_padding_and_gqa(kv_heads):
    model = tiny_llama(kv_heads)
    tokens = torch.randint(0, 70, (2, 6))
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, :2] = True  # second prompt is 2 tokens shorter
    follow = [3, 5, 7]
    dec = LlamaDecoder(model)
    dec.start(2, 12)
    with torch.no_grad():
        steps = [dec.forward(tokens, pad)] + [dec.forward(torch.tensor([[t], [t]])) for t in follow]
        for row, start in ((0, 0), (1, 2)):
            seq = torch.cat([tokens[row, start:], torch.tensor(follow)])[None]
            ref = model(seq).logits[0]  # (T, V) of the unpadded sequence
            n = tokens.shape[1] - start
            for i, logits in enumerate(steps):
                torch.testing.assert_close(logits[row], ref[n - 1 + i], atol=2e-5, rtol=1e-4)


def test_hf_decoder_matches_fast_decoder():
    model = tiny_llama()
    tokens = torch.randint(0, 70, (1, 5))
    outs = []
    for cls in (LlamaDecoder, HFDecoder):
        dec = cls(model)
        dec.start(1, 10)
        with torch.no_grad():
            outs.append([dec.forward(tokens)] + [dec.forward(torch.tensor([[t]])) for t in (1, 2, 3)])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def generator():
    tok = tokenizers.to_hf(tokenizers.train_char(["abcdefghijklmnopqrstuvwxyz .,\n"]))
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=True)
    return TextGenerator(LlamaForCausalLM(cfg), tok)


def test_same_seed_same_output_and_n_samples(generator):
    p = SamplingParams(max_new_tokens=30, temperature=1.0, seed=7, n=3, ignore_eos=True)
    a, b = generator.generate("abc", p), generator.generate("abc", p)
    assert [c.text for c in a] == [c.text for c in b]
    assert len({c.text for c in a}) == 3  # the n samples differ
    alone = generator.generate("abc", SamplingParams(max_new_tokens=30, temperature=1.0, seed=7, n=1, ignore_eos=True))
    assert alone[0].text == a[0].text  # sample i depends on seed + i only
    assert all(c.completion_tokens == 30 and c.finish_reason == "length" for c in a)


def test_greedy_top_k_one_and_sliding_context(generator):
    greedy = generator.generate("ab", SamplingParams(max_new_tokens=60, temperature=0, ignore_eos=True))[0]
    topk1 = generator.generate("ab", SamplingParams(max_new_tokens=60, temperature=1.5, top_k=1, seed=3, ignore_eos=True))[0]
    assert greedy.text == topk1.text and greedy.completion_tokens == 60  # 60 > the 32-token context: the cache slides


def test_repetition_penalty_reduces_repeats(generator):
    def repeats(text):
        return len(text) - len(set(text))
    plain = generator.generate("a", SamplingParams(max_new_tokens=25, temperature=0, ignore_eos=True))[0].text
    penal = generator.generate("a", SamplingParams(max_new_tokens=25, temperature=0, repetition_penalty=5.0, ignore_eos=True))[0].text
    assert repeats(penal) < repeats(plain)


def test_stop_strings_and_streaming(generator):
    p = SamplingParams(max_new_tokens=40, temperature=1.0, seed=2, ignore_eos=True)
    full = generator.generate("x", p)[0].text
    stop = full[5:7]
    cut = generator.generate("x", SamplingParams(**{**p.__dict__, "stop": [stop]}))[0]
    assert cut.text == full[: full.find(stop)] and cut.finish_reason == "stop"
    deltas, final = [], None
    for _, delta, done in generator.stream(["x"], p):
        deltas.append(delta)
        final = done or final
    assert "".join(deltas) == full == final.text and len(deltas) > 10


def test_bad_sampling_params():
    for bad in ({"temperature": -1}, {"top_p": 0}, {"max_new_tokens": 0}, {"n": 0}, {"stop": [""]}):
        with pytest.raises(UserError):
            SamplingParams(**bad).validate()


def test_templates_render_and_validate():
    t = templates.load("product-description")
    prompt = t.render({"name": "Trail Mug", "category": "kitchen", "features": "steel, 350 ml", "tone": "premium"})
    assert prompt == "Product: Trail Mug\nCategory: kitchen\nFeatures: steel, 350 ml\nTone: premium\nDescription:"
    assert "Tone: friendly" in t.render({"name": "Mug", "category": "kitchen", "features": ["steel"]})
    with pytest.raises(UserError, match="missing required variable 'name'"):
        t.render({"category": "kitchen", "features": "x"})
    with pytest.raises(UserError, match="unknown variable 'colour'"):
        t.render({"name": "Mug", "category": "k", "features": "x", "colour": "red"})
    with pytest.raises(UserError, match="must be one of friendly, premium, playful, technical"):
        t.render({"name": "Mug", "category": "k", "features": "x", "tone": "angry"})
    with pytest.raises(UserError, match="more than its limit of 30"):
        templates.load("poem").render({"title": "長" * 31})
    assert templates.load("poem").render({"title": "春曉"}) == "《春曉》\n"
    with pytest.raises(UserError, match="unknown template"):
        templates.load("sonnet")
    assert {"ad-slogan", "poem", "product-description"} <= set(templates.available())


def test_the_batching_engine_decodes_what_the_generator_decodes(spread_model):
    """Greedy, several sequences at once at different positions (GQA model): the server's engine and the CLI's
    generator give the same tokens."""
    import threading

    from aigc.serve.batching import Sequence, TextEngine

    gen = TextGenerator.from_path(spread_model)
    prompts = [gen.encode("The "), gen.encode("A longer prompt, "), gen.encode("x")]
    want = [gen.generate([p], SamplingParams(max_new_tokens=10, temperature=0.0))[0].text for p in prompts]
    engine = TextEngine(gen, max_batch=4, context=64)
    done, got = threading.Event(), {}
    try:
        for i, p in enumerate(prompts):
            def sink(delta, finish, i=i):
                if finish is not None:
                    got[i] = finish.text
                    if len(got) == len(prompts):
                        done.set()
            engine.submit(Sequence(p, 10, 0.0, 1.0, [], 0, sink))
        assert done.wait(60), "the engine did not finish"
    finally:
        engine.close()
    assert [got[i] for i in range(len(prompts))] == want
