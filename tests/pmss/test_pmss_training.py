"""PMSS training: only U (and modules_to_save) is trainable, AdamW lowers a loss without touching the base,
float64 / bfloat16 models, and a transformers Trainer smoke run."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from pmss_cases import CASES_BY_ID, LAYER_CASES
from pmss_helpers import (
    dense_reference,
    pmss_layers,
    recorded,
    reference_deltas,
    rel_err,
    skeleton_delta,
    to_module_layout,
    weight_t,
)
from torch import nn

from testkit import greedy_decode, tiny_gpt2_lm


def _loss(out: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(99)
    target = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    return ((out - target) ** 2).mean()


def test_only_u_and_modules_to_save_train_and_loss_decreases(layer_case):
    model = get_peft_model(layer_case.model(), layer_case.config(selection="deim"))  # U = 0, the paper's init
    model.eval()  # no dropout in BERT / GPT-2: a deterministic loss
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    cores = {n for n in trainable if n.endswith(".pmss_op.default.core")}
    assert len(cores) == len(pmss_layers(model)) > 0
    others = trainable - cores
    if layer_case.modules_to_save:
        assert others and all(".modules_to_save.default." in n for n in others)
    else:
        assert not others
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    inputs = layer_case.inputs()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = _loss(layer_case.run(model, inputs))
        opt.zero_grad()
        loss.backward()
        for n, p in model.named_parameters():
            assert (p.grad is not None) == (n in trainable), n
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = _loss(layer_case.run(model, inputs)).item()
    assert final < losses[0], losses + [final]
    for layer in pmss_layers(model).values():
        assert layer.pmss_op["default"].core.abs().max() > 0  # U moved away from 0
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen parameter {n} changed"


def test_float64_model_forward(layer_case):
    dtype = torch.float64
    model = get_peft_model(layer_case.model(dtype), layer_case.config(init_weights=False))
    for layer in pmss_layers(model).values():
        assert layer.pmss_op["default"].core.dtype == dtype
    inputs = layer_case.inputs(dtype)
    with torch.no_grad():
        out = layer_case.run(model, inputs)
    assert out.dtype == dtype and torch.isfinite(out).all()
    deltas = reference_deltas(layer_case, model, {"default": 1.0}, dtype)
    torch.testing.assert_close(out, dense_reference(layer_case, deltas, inputs, dtype), atol=1e-10, rtol=0)


@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda c: c.id)
def test_bfloat16_model_forward(case):
    """bf16 base: forward works, stays bf16, and matches a float32 dense reference built from the same
    bf16-rounded weights (the bf16 model upcast) plus alpha·W_t[:, I]·U·W_t[J, :]. At the case's visible alpha the
    adapter moves the output far beyond bf16 rounding, so an adapter lost in bf16 fails the limit."""
    alpha = case.visible_alpha
    model = get_peft_model(case.model(torch.bfloat16), case.config(init_weights=False, alpha=alpha))
    with torch.no_grad():
        out = case.run(model, case.inputs(torch.bfloat16))
        with model.disable_adapter():
            no_adapter = case.run(model, case.inputs(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    reference = case.model(torch.bfloat16).float()
    with torch.no_grad():
        for path, layer in pmss_layers(model).items():
            module = reference.get_submodule(path)
            opts = recorded(model.peft_config["default"], path)
            delta = skeleton_delta(
                weight_t(module).clone(), opts["col_idx"], opts["row_idx"], layer.pmss_op["default"].core, alpha
            )
            module.weight += to_module_layout(module, delta)
        expected = case.run(reference, case.inputs(torch.float32))
    # measured: 0.003-0.02 with the adapter, 0.4-1.0 without it
    assert rel_err(no_adapter, expected) > 0.2
    assert rel_err(out, expected) < 0.03


def _weight(layer) -> torch.Tensor:
    return layer.get_base_layer().weight.detach().double()


@pytest.mark.filterwarnings("ignore:after unmerging adapter:UserWarning")  # the merge's rounding, expected here
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_merge_unmerge(dtype):
    """Safe merge in half precision writes W0 + get_delta_weight() (one rounding at the scale of W), unmerge
    restores W0 (to the same tolerance); merged output equals unmerged up to half-precision rounding."""
    case = CASES_BY_ID["linear-mlp"]
    model = get_peft_model(case.model(dtype), case.config(init_weights=False, alpha=case.visible_alpha))
    inputs = case.inputs(dtype)
    layers = pmss_layers(model)
    w0 = {p: layer.get_base_layer().weight.detach().clone() for p, layer in layers.items()}
    with torch.no_grad():
        unmerged = case.run(model, inputs)
        with model.disable_adapter():
            no_adapter = case.run(model, inputs)
    assert rel_err(no_adapter, unmerged) > 0.2  # the adapter moves the output far beyond the rounding
    model.merge_adapter(safe_merge=True)
    tols = {}
    for p, layer in layers.items():
        assert layer.merged and layer.merged_adapters == ["default"], p
        delta = layer.get_delta_weight("default").detach().double()
        expected = w0[p].double() + delta
        tols[p] = 2 * torch.finfo(dtype).eps * float(expected.abs().max())
        assert float(delta.abs().max()) > 10 * tols[p], p  # so a merge that wrote nothing fails below
        torch.testing.assert_close(_weight(layer), expected, atol=tols[p], rtol=0)
    with torch.no_grad():
        merged = case.run(model, inputs)
    assert torch.isfinite(merged).all() and rel_err(merged, unmerged) < 0.03
    model.unmerge_adapter()
    for p, layer in layers.items():
        assert not layer.merged, p
        torch.testing.assert_close(_weight(layer), w0[p].double(), atol=tols[p], rtol=0)
    with torch.no_grad():
        assert rel_err(case.run(model, inputs), unmerged) < 0.03


def test_decoder_generate_with_the_adapter_active_and_merged():
    """task_type CAUSAL_LM on a GPT-2 LM: generate() (KV cache, one token per step) is greedy decoding of the adapted
    model's full forward, other tokens than the base model's; merged it generates the same, disabled the base's."""
    ids = torch.randint(1, 50, (2, 5), generator=torch.Generator().manual_seed(0))
    kwargs = {"max_new_tokens": 4, "do_sample": False, "attention_mask": torch.ones_like(ids)}
    base_tokens = tiny_gpt2_lm().generate(ids, **kwargs)
    case = CASES_BY_ID["conv1d-gpt2"]
    cfg = case.config(task_type="CAUSAL_LM", init_weights=False, alpha=300.0, compute="fast")  # tokens differ
    model = get_peft_model(tiny_gpt2_lm(), cfg)
    assert type(model).__name__ == "PeftModelForCausalLM"
    out = model.generate(input_ids=ids, **kwargs)
    assert out.shape == (2, 9) and torch.equal(out[:, :5], ids)
    assert not torch.equal(out, base_tokens)
    assert torch.equal(out, greedy_decode(model, ids, 4))
    model.merge_adapter()
    assert all(layer.merged for layer in pmss_layers(model).values())
    assert torch.equal(model.generate(input_ids=ids, **kwargs), out)
    model.unmerge_adapter()
    with model.disable_adapter():
        assert torch.equal(model.generate(input_ids=ids, **kwargs), base_tokens)
    assert torch.equal(model.generate(input_ids=ids, **kwargs), out)


def test_trainer_smoke(tmp_path):
    from transformers import Trainer, TrainingArguments

    case = CASES_BY_ID["linear-bert"]
    model = get_peft_model(case.model(), case.config(target_modules=["query", "value"], selection="qdeim"))
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 64, (7,), generator=g), "labels": torch.tensor(i % 3)} for i in range(16)]
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    cores = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("pmss_op.default.core")}
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    result = trainer.train()
    assert trainer.state.global_step == 4
    assert torch.isfinite(torch.tensor(result.training_loss))
    params = dict(model.named_parameters())
    assert any(not torch.equal(params[n], v) for n, v in cores.items())
    for n, v in frozen.items():
        assert torch.equal(params[n], v), n
    assert isinstance(model.base_model.model.classifier, nn.Module)
