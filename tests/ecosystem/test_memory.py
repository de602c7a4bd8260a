"""Memory features with structpeft adapters: PEFT's ``low_cpu_mem_usage`` (adapter tensors created on the meta
device, then assigned from the checkpoint), a base model built on the meta device, transformers' loading (which
initialises on meta and then loads), ``inference_mode`` loading, and gradient checkpointing.

Every kind of adapter is covered: SURM LoRA placement (circulant, Kronecker), SURM adapter placement (bottleneck,
GELU) and PMSS. Gradient checkpointing of SURM LoRA placement on GPT-2 (every structure) is in
``tests/surm/test_surm_training.py::test_gradient_checkpointing_gives_the_same_gradients``; here the other kinds,
on BERT.
"""

from __future__ import annotations

import pytest
import torch
from eco_models import ADAPTER_KINDS, MLP, seeded
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file

from structpeft.errors import SelectionError
from testkit import tiny_bert_cls, tiny_bert_config

KINDS = list(ADAPTER_KINDS)
BERT_TARGETS = {
    "surm-circulant": ["query", "value"],
    "surm-kronecker": ["query", "value"],
    "surm-adapter": ["output.dense"],  # after the attention output and the FFN output
    "pmss": ["query", "value"],
}
PREFIX = {"pmss": "pmss_"}


def _prefix(kind: str) -> str:
    return PREFIX.get(kind, "surm_")


def _ids(n: int = 3) -> torch.Tensor:
    return torch.randint(0, 64, (n, 7), generator=torch.Generator().manual_seed(5))


def _meta_tensors(model: torch.nn.Module) -> list[str]:
    return [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]


def _saved_adapter(kind: str, folder) -> torch.Tensor:
    """Save a non-zero adapter of ``kind`` (with the SEQ_CLS head) for the seeded tiny BERT; return its logits."""
    model = get_peft_model(seeded(tiny_bert_cls), ADAPTER_KINDS[kind](BERT_TARGETS[kind], task_type="SEQ_CLS"))
    model.eval()
    model.save_pretrained(folder)
    with torch.no_grad():
        return model(input_ids=_ids()).logits


@pytest.mark.parametrize("kind", KINDS)
def test_from_pretrained_low_cpu_mem_usage_equals_normal_loading(kind, tmp_path):
    expected = _saved_adapter(kind, tmp_path)
    outs = {}
    for low_cpu in (False, True):
        model = PeftModel.from_pretrained(seeded(tiny_bert_cls), str(tmp_path), low_cpu_mem_usage=low_cpu)
        assert _meta_tensors(model) == []
        with torch.no_grad():
            outs[low_cpu] = model(input_ids=_ids()).logits
    assert torch.equal(outs[True], outs[False])
    torch.testing.assert_close(outs[True], expected, atol=0, rtol=0)
    with torch.no_grad():
        assert not torch.equal(expected, seeded(tiny_bert_cls)(input_ids=_ids()).logits)  # the adapter is not a no-op


@pytest.mark.parametrize("kind", KINDS)
def test_get_peft_model_low_cpu_mem_usage_then_load_the_weights(kind, tmp_path):
    """``get_peft_model(..., low_cpu_mem_usage=True)`` creates the adapter tensors on meta (no memory, no init);
    ``set_peft_model_state_dict(..., low_cpu_mem_usage=True)`` assigns the saved ones."""
    expected = _saved_adapter(kind, tmp_path)
    config = ADAPTER_KINDS[kind](BERT_TARGETS[kind], task_type="SEQ_CLS")
    model = get_peft_model(seeded(tiny_bert_cls), config, low_cpu_mem_usage=True)
    meta = _meta_tensors(model)
    assert meta and all(_prefix(kind) in n for n in meta), meta
    assert any(".weight" in n or ".core" in n or ".left" in n for n in meta)
    set_peft_model_state_dict(model, load_file(tmp_path / "adapter_model.safetensors"), low_cpu_mem_usage=True)
    assert _meta_tensors(model) == []
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=_ids()).logits, expected, atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["surm-circulant", "surm-kronecker", "surm-adapter"])
def test_base_model_on_meta_then_adapters_then_weights_assigned(kind):
    """A base model built under ``torch.device("meta")`` takes SURM adapters (on meta as well); loading the full
    state dict with ``assign=True`` gives the model the normal path builds."""
    targets = ["fc2"] if kind == "surm-adapter" else ["fc1", "fc2"]
    reference = get_peft_model(seeded(MLP), ADAPTER_KINDS[kind](targets)).eval()
    with torch.device("meta"):
        base = MLP()
    model = get_peft_model(base, ADAPTER_KINDS[kind](targets)).eval()
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert set(model.state_dict()) == set(reference.state_dict())
    model.load_state_dict(reference.state_dict(), assign=True)
    assert _meta_tensors(model) == []
    x = torch.randn(4, 10, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


def test_pmss_on_a_meta_base_model_says_it_needs_the_weights():
    """PMSS selects C and R from the pretrained weight, so it cannot start from a meta model: a clear error (load
    the base weights first; transformers' from_pretrained does)."""
    with torch.device("meta"):
        base = MLP()
    with pytest.raises(SelectionError, match="meta device"):
        get_peft_model(base, ADAPTER_KINDS["pmss"](["fc1"]))


@pytest.mark.parametrize("kind", KINDS)
def test_transformers_from_pretrained_base_then_adapter(kind, tmp_path):
    """The base model loaded by transformers' ``from_pretrained`` (which builds it on the meta device and then
    loads the weights; transformers >= 5 always does, ``low_cpu_mem_usage`` is gone) takes the saved adapter,
    with PEFT's ``low_cpu_mem_usage`` too, and gives the in-memory model's outputs."""
    from transformers import BertForSequenceClassification

    seeded(tiny_bert_cls).save_pretrained(tmp_path / "base")
    expected = _saved_adapter(kind, tmp_path / "adapter")
    base = BertForSequenceClassification.from_pretrained(tmp_path / "base", config=tiny_bert_config())
    model = PeftModel.from_pretrained(base.eval(), str(tmp_path / "adapter"), low_cpu_mem_usage=True)
    assert _meta_tensors(model) == []
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=_ids()).logits, expected, atol=0, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_inference_mode_loading_freezes_everything(kind, tmp_path):
    """``PeftModel.from_pretrained`` (``is_trainable=False``: the config's inference_mode) leaves no parameter
    trainable, adapter and classification head included; ``is_trainable=True`` makes exactly the adapter and the
    head trainable."""
    _saved_adapter(kind, tmp_path)
    model = PeftModel.from_pretrained(seeded(tiny_bert_cls), str(tmp_path))
    assert model.peft_config["default"].inference_mode is True
    params = dict(model.named_parameters())
    assert any(_prefix(kind) in n for n in params)
    assert [n for n, p in params.items() if p.requires_grad] == []
    trainable = PeftModel.from_pretrained(seeded(tiny_bert_cls), str(tmp_path), is_trainable=True)
    names = {n for n, p in trainable.named_parameters() if p.requires_grad}
    assert names and all(_prefix(kind) in n or "modules_to_save" in n for n in names), names
    assert any(_prefix(kind) in n for n in names) and any("modules_to_save" in n for n in names)


@pytest.mark.parametrize("kind", ["surm-kronecker", "surm-adapter", "pmss"])
def test_gradient_checkpointing_gives_identical_gradients(kind):
    """``model.gradient_checkpointing_enable()`` (transformers 5: ``activation_checkpointing_enable``) on the PEFT
    model, forwarded to the transformers model: the
    BERT layers are recomputed in backward (each structured layer runs twice) and every adapter gradient is the
    one of the plain run (dropout on: checkpointing replays the RNG)."""
    ids = _ids(4)
    labels = torch.tensor([0, 2, 1, 2])
    grads, calls = [], []
    for checkpointing in (False, True):
        torch.manual_seed(3)
        model = get_peft_model(seeded(tiny_bert_cls), ADAPTER_KINDS[kind](BERT_TARGETS[kind]))
        if checkpointing:
            # transformers 5 renamed it activation_checkpointing_enable (the old name warns); keep 4.x working
            (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
            model.enable_input_require_grads()
        model.train()
        layer = next(layer for _, layer in model.base_model.structured_layers())
        count = [0]
        layer.register_forward_hook(lambda *_, count=count: count.__setitem__(0, count[0] + 1))
        torch.manual_seed(4)  # the dropout masks
        model(input_ids=ids, labels=labels).loss.backward()
        calls.append(count[0])
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert calls == [1, 2]
    assert grads[0].keys() == grads[1].keys() and grads[0]
    assert all(_prefix(kind) in n for n in grads[0])
    for name, grad in grads[0].items():
        assert torch.count_nonzero(grad), name
        # atol relative to the gradient's own scale: PMSS's are about 4e-9 here (its C and R are columns and rows of
        # a tiny random BERT's weights), below any fixed atol that suits the others
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6 * float(grad.abs().max()), rtol=1e-5, msg=name)
