import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from aigc.data import tokenizers

TEXTS = ["Hello, world!\nSecond line.", "床前明月光，疑是地上霜。", "舉頭望明月，低頭思故鄉。"]


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_tokenizer_round_trips_and_loads_with_transformers(tmp_path, kind):
    tok = tokenizers.train_tokenizer(TEXTS * 20, kind, 300 if kind == "bpe" else 0)
    tokenizers.save(tok, tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    for hf in (AutoTokenizer.from_pretrained(str(tmp_path)), PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))):
        for text in TEXTS:
            ids = hf(text, add_special_tokens=False)["input_ids"]
            assert hf.decode(ids) == text
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.eos_token == "<|endoftext|>" and hf.eos_token_id == 0


def test_char_tokenizer_is_one_token_per_character_and_bpe_merges(tmp_path):
    char = tokenizers.to_hf(tokenizers.train_char(TEXTS))
    assert len(char("床前明月光", add_special_tokens=False)["input_ids"]) == 5
    assert char.decode(char("xyz", add_special_tokens=False)["input_ids"]) == "<unk><unk><unk>"  # unseen characters
    bpe = tokenizers.to_hf(tokenizers.train_bpe(TEXTS * 50, vocab_size=300))
    assert len(bpe("Hello, world!", add_special_tokens=False)["input_ids"]) < len("Hello, world!")
    assert bpe.decode(bpe("unseen ✓ text", add_special_tokens=False)["input_ids"]) == "unseen ✓ text"  # byte fallback
