import pytest
import torch

from tli import surgery
from tli.errors import TLIError

from conftest import TINY, tiny_config, tiny_model


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_layout_finds_every_part(model_type):
    model = tiny_model(model_type, layers=3)
    blocks = surgery.blocks(model)
    assert isinstance(blocks, torch.nn.ModuleList) and len(blocks) == 3
    assert surgery.num_layers(model.config) == 3
    assert isinstance(surgery.final_norm(model), torch.nn.Module)
    head = surgery.lm_head(model)
    assert head.weight.shape[0] == model.config.vocab_size
    # The decoder's output, through the final norm, is what the LM head sees.
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        dec = surgery.decoder(model)(ids)
    torch.testing.assert_close(dec.last_hidden_state, out.hidden_states[-1])
    torch.testing.assert_close(head(dec.last_hidden_state), out.logits)
    for name in surgery.lora_target_modules(model):
        assert any(n.endswith(name) for n, _ in model.named_modules())


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_truncate_config_keeps_per_layer_lists_consistent(model_type):
    config = tiny_config(model_type, layers=4)
    cut = surgery.truncate_config(config, 2)
    assert surgery.num_layers(cut) == 2 and surgery.num_layers(config) == 4
    if getattr(config, "layer_types", None) is not None:
        assert cut.layer_types == config.layer_types[:2]
    with pytest.raises(TLIError, match="max_layer"):
        surgery.truncate_config(config, 5)


def test_unsupported_architecture_is_named():
    config = tiny_config("llama")
    config.model_type = "mamba"
    with pytest.raises(TLIError, match="'mamba' is not supported"):
        surgery.layout(config)
