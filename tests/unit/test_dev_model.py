"""The dev models `make model` writes: the trained one carries the committed weights, and only
when their checksum is the recorded one."""

import pytest
import torch
from transformers import JambaForCausalLM

from jamba_server.dev_model import (
    TRAINED_SHA256,
    TRAINED_SOURCE,
    WeightsChanged,
    build,
    build_model,
    sha256_of,
    trained_weights,
)


def test_the_committed_weights_have_the_recorded_checksum():
    assert sha256_of(trained_weights()) == TRAINED_SHA256


def test_changed_weights_are_refused(tmp_path):
    (tmp_path / "model.safetensors").write_bytes((TRAINED_SOURCE / "model.safetensors").read_bytes()[:-1] + b"\0")
    with pytest.raises(WeightsChanged, match="sha256"):
        trained_weights(tmp_path)


@pytest.mark.parametrize(
    "shape",
    [{}, {"num_hidden_layers": 8}, {"num_hidden_layers": 6, "attn_layer_period": 3}, {"num_key_value_heads": 2}],
    ids=["as-built", "grown", "grown-period-3", "widened"],
)
def test_a_build_from_weights_carries_them_and_the_train_log(tmp_path, shape):
    source = tmp_path / "source"
    model, _ = build_model(688, [2, 5], **shape)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.5)
    model.save_pretrained(source)
    (source / "train_log.json").write_text('{"steps": 7}\n')
    build(tmp_path / "out", source / "model.safetensors")
    built = JambaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(built[name], value, rtol=0, atol=0)
    assert (tmp_path / "out" / "train_log.json").read_text() == '{"steps": 7}\n'
    assert built.keys() == model.state_dict().keys()
    assert (tmp_path / "out" / "DIGEST").exists() and (tmp_path / "out" / "tokenizer.json").exists()


def test_only_the_trainable_shape_may_differ():
    with pytest.raises(ValueError, match="hidden_size"):
        build_model(688, [2, 5], hidden_size=64)
