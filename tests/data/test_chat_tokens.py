"""Turn-by-turn encoding with loss masks, the chat template, and packing without cross-contamination."""
import pytest
import torch
import torch.nn.functional as F

from aigc.data.chat_tokens import BUILTIN_TEMPLATE, IGNORE, encode_chat, ensure_chat_template, pack
from aigc.errors import UserError

CONVO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Mug colour?"},
         {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Size?"},
         {"role": "assistant", "content": "300 ml."}]


@pytest.fixture(scope="module")
def tok(tiny_run):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(str(tiny_run / "model"))
    assert ensure_chat_template(t) == "builtin" and t.chat_template == BUILTIN_TEMPLATE
    assert ensure_chat_template(t) == "own"  # set once, then it is the model's own
    return t


def trained_text(tok, enc):
    return tok.decode([i for i, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE])


def test_only_assistant_turns_and_their_end_are_trained(tok):
    enc = encode_chat(tok, CONVO)
    assert len(enc.input_ids) == len(enc.labels)
    eos = tok.eos_token
    assert trained_text(tok, enc) == f"Blue.{eos}\n300 ml.{eos}\n"
    # the whole sequence is the rendered template, tokenised piece by piece
    assert tok.decode(enc.input_ids) == tok.apply_chat_template(CONVO, tokenize=False)
    assert trained_text(tok, encode_chat(tok, CONVO, mask_history=True)) == f"300 ml.{eos}\n"
    weighted = [*CONVO[:2], {**CONVO[2], "weight": 0}, *CONVO[3:]]
    assert trained_text(tok, encode_chat(tok, weighted)) == f"300 ml.{eos}\n"
    assert encode_chat(tok, CONVO, train_on_prompt=True).labels == enc.input_ids


def test_serving_prompt_ids_are_the_training_ids(tok):
    train = encode_chat(tok, CONVO)
    serve = encode_chat(tok, CONVO[:-1], add_generation_prompt=True)
    assert train.input_ids[: len(serve.input_ids)] == serve.input_ids  # then the model writes "300 ml." and the end token
    assert tok.decode(train.input_ids[len(serve.input_ids):]) == f"300 ml.{tok.eos_token}\n"


def test_a_template_that_rewrites_earlier_turns_is_refused(tok):
    import copy

    t = copy.deepcopy(tok)
    t.chat_template = "{{ messages | length }} turns\n{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    with pytest.raises(UserError, match="not prefix-stable"):
        encode_chat(t, CONVO)


def test_packed_loss_equals_the_examples_one_by_one(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)).eval()
    convos = [CONVO, CONVO[1:3], [{"role": "user", "content": "Price?"}, {"role": "assistant", "content": "Nine euros."}]]
    encoded = [encode_chat(tok, c, train_on_prompt=True) for c in convos]

    def loss_sum(ids, labels, positions=None):
        kw = {"position_ids": torch.tensor([positions])} if positions is not None else {}
        with torch.no_grad():
            logits = model(torch.tensor([ids]), use_cache=False, **kw).logits[0]
        return F.cross_entropy(logits[:-1].float(), torch.tensor(labels[1:]), ignore_index=IGNORE, reduction="sum").item()

    alone = sum(loss_sum(e.input_ids, e.labels) for e in encoded)
    rows = pack(encoded, block=256, pad_id=tok.eos_token_id)
    assert len(rows) == 1 and rows[0].examples == 3 and len(rows[0].input_ids) == 256
    packed = sum(loss_sum(r.input_ids, r.labels, r.position_ids) for r in rows)
    assert packed == pytest.approx(alone, rel=1e-4)
    # without restarting positions (one long sequence) the examples would see each other: a different loss
    r = rows[0]
    assert loss_sum(r.input_ids, r.labels, list(range(len(r.input_ids)))) != pytest.approx(alone, rel=1e-4)
    # a small block splits between examples, never inside one (except one longer than the block, cut)
    small = pack(encoded, block=len(encoded[0].input_ids) + 5, pad_id=0)
    assert [r.examples for r in small] == [1, 2]
