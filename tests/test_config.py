import pytest

from aigc.config import load_config, parse_overrides
from aigc.errors import UserError
from aigc.train.lm import TextTrainConfig


def test_overrides_are_typed_and_nested():
    cfg = load_config(TextTrainConfig, overrides=parse_overrides(["--model.n_layer=3", "--train.lr", "1e-3", "--lora.target_modules=q_proj,v_proj"]))
    assert cfg.model.n_layer == 3 and cfg.train.lr == 1e-3
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize("override, message", [
    (["--model.n_lyer=3"], "unknown config key model.n_lyer (allowed under model.: n_layer"),
    (["--train.precision=fp8"], "train.precision: got 'fp8', expected one of 'auto', 'bf16', 'fp16', 'fp32'"),
    (["--train.batch_size=many"], "train.batch_size: got 'many', expected int"),
    (["--model.n_embd=30", "--model.n_head=4"], "model.n_embd (30) must be divisible by model.n_head (4)"),
    (["--train.max_steps"], "has no value"),
])
def test_bad_values_name_the_key_and_allowed_values(override, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        load_config(TextTrainConfig, overrides=parse_overrides(override))
