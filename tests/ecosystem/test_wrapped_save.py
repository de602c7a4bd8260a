"""save_pretrained of models whose blocks sit inside wrappers that hide themselves in the state dict.

``torch.distributed.algorithms._checkpoint.checkpoint_wrapper.apply_activation_checkpointing`` (the usual
activation checkpointing under FSDP) and FSDP1's nested units name a wrapped layer ``..._checkpoint_wrapped_module.fc1``
/ ``..._fsdp_wrapped_module.fc1`` in ``named_modules()`` while their state dicts say ``...fc1``. PEFT 0.21 selects
the adapter's entries by the ``named_modules()`` names and saved an empty adapter there; structpeft's tuners select
by the state-dict spelling (FSDP1 itself: ``tests/distributed``). A state dict that holds none of the adapter's
tensors is refused before anything is written.
"""

from __future__ import annotations

import pytest
import torch
from eco_models import ADAPTER_KINDS, MLP, seeded
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

from structpeft import StateDictError
from structpeft.peft.model import state_dict_name

TARGETS = ["fc1", "fc2"]


def _model(kind: str) -> torch.nn.Module:
    torch.manual_seed(7)  # init_weights=False: non-zero adapters, so a lost tensor shows in the outputs
    return get_peft_model(seeded(MLP), ADAPTER_KINDS[kind](TARGETS))


def _checkpointed(model: torch.nn.Module) -> torch.nn.Module:
    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, BaseTunerLayer))
    return model


def test_state_dict_name_drops_wrapper_segments_only():
    assert (
        state_dict_name("base_model.model.blocks.0._checkpoint_wrapped_module.fc1") == "base_model.model.blocks.0.fc1"
    )
    assert state_dict_name("_fsdp_wrapped_module.a._fsdp_wrapped_module.b") == "a.b"
    assert state_dict_name("x._orig_mod.y") == "x._orig_mod.y"  # torch.compile keeps its segment in the keys
    assert state_dict_name("x.my_fsdp_wrapped_module.y") == "x.my_fsdp_wrapped_module.y"  # whole segments only


@pytest.mark.parametrize("kind", sorted(ADAPTER_KINDS))
def test_adapter_of_checkpoint_wrapped_layers_saves_and_reloads(kind, tmp_path):
    plain = _model(kind)
    x = torch.randn(4, 10, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = plain(x)
    model = _checkpointed(_model(kind))
    wrapped = [n for n, _ in model.named_modules() if "_checkpoint_wrapped_module" in n]
    assert wrapped, "the check_fn wrapped nothing: the test would not exercise the wrapper names"
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    model.save_pretrained(tmp_path)
    plain.save_pretrained(tmp_path / "plain")
    saved = load_file(tmp_path / "adapter_model.safetensors")
    reference = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    assert saved.keys() == reference.keys() and saved
    assert all(torch.equal(saved[k], reference[k]) for k in saved)
    loaded = PeftModel.from_pretrained(seeded(MLP), str(tmp_path))
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


@pytest.mark.parametrize("kind", ["surm-circulant", "pmss"])
def test_a_state_dict_without_the_adapter_is_refused_and_the_saved_adapter_kept(kind, tmp_path):
    model = _model(kind)
    model.save_pretrained(tmp_path)
    before = (tmp_path / "adapter_model.safetensors").read_bytes()
    base_only = {k: v for k, v in model.state_dict().items() if model.peft_config["default"].param_prefix not in k}
    with pytest.raises(StateDictError, match=r"holds none of adapter 'default'.*fc1") as err:
        model.save_pretrained(tmp_path, state_dict=base_only)
    assert f"{len(base_only)} entries" in str(err.value)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before


def test_an_empty_state_dict_of_another_rank_saves_nothing(tmp_path):
    """What non-zero ranks hold with a rank-0-only full state dict: no error, and no file from them."""
    model = _model("surm-circulant")
    model.save_pretrained(tmp_path / "other-rank", state_dict={}, is_main_process=False)
    assert not (tmp_path / "other-rank" / "adapter_model.safetensors").exists()
