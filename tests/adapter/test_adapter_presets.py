"""target_modules=None picks the preset of the model type, per placement (LoRA position vs Houlsby positions)."""

from __future__ import annotations

import pytest
import torch
import transformers
from peft import get_peft_model
from torch import nn

import structpeft
from structpeft.errors import TargetModulesError

MODELS = {
    "bert": lambda: transformers.BertModel(
        transformers.BertConfig(
            vocab_size=50, hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=36
        )
    ),
    "gpt2": lambda: transformers.GPT2Model(
        transformers.GPT2Config(n_embd=24, n_layer=1, n_head=2, vocab_size=50, bos_token_id=0, eos_token_id=0)
    ),
    "llama": lambda: transformers.LlamaModel(
        transformers.LlamaConfig(
            hidden_size=24,
            intermediate_size=40,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=64,
        )
    ),
}
EXPECTED = {
    ("bert", "lora"): ["encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.value"],
    ("bert", "adapter"): ["encoder.layer.0.attention.output.dense", "encoder.layer.0.output.dense"],
    ("gpt2", "lora"): ["h.0.attn.c_attn"],
    ("gpt2", "adapter"): ["h.0.attn.c_proj", "h.0.mlp.c_proj"],
    ("llama", "lora"): ["layers.0.self_attn.q_proj", "layers.0.self_attn.v_proj"],
    ("llama", "adapter"): ["layers.0.mlp.down_proj", "layers.0.self_attn.o_proj"],
}


@pytest.mark.parametrize(("family", "placement"), sorted(EXPECTED))
def test_presets_per_model_type_and_placement(family, placement):
    torch.manual_seed(0)
    model = get_peft_model(MODELS[family](), structpeft.SurmConfig(placement=placement))
    assert sorted(model.peft_config["default"].layer_options) == EXPECTED[family, placement]


@pytest.mark.parametrize("family", sorted(MODELS))
def test_pmss_uses_the_lora_position_presets(family):
    torch.manual_seed(0)
    model = get_peft_model(MODELS[family](), structpeft.PmssConfig(k_in=3, k_out=3))
    assert sorted(model.peft_config["default"].layer_options) == EXPECTED[family, "lora"]


@pytest.mark.parametrize("config", [structpeft.SurmConfig, structpeft.PmssConfig])
def test_no_preset_for_a_plain_torch_model_names_the_presets(config):
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(TargetModulesError, match="give target_modules") as err:
        get_peft_model(model, config())
    assert "'custom'" in str(err.value) and "bert" in str(err.value)
    assert isinstance(model[0], nn.Linear)
