"""Trainability, dtypes / devices, and a transformers.Trainer smoke test."""

from __future__ import annotations

import math

import pytest
import torch
from peft import get_peft_model
from surm_cases import LAYERS_BY_ID
from surm_testing import adapter_deltas, assert_close64, dense_reference, rel_err, surm_layers

from structpeft import SurmConfig
from testkit import greedy_decode, tiny_gpt2_lm

F64 = torch.float64


def _trainable(name: str) -> bool:
    return "surm_" in name or "modules_to_save" in name


# -------------------------------------------------------------------------------------------- 6. training
def test_only_adapter_parameters_train_and_loss_decreases(structure, layer_case):
    model = get_peft_model(layer_case.model(), structure.config(layer_case))  # identity init
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert trainable == {n for n in params if _trainable(n)}
    assert any("surm_" in n for n in trainable)
    if layer_case.modules_to_save:
        assert any("modules_to_save" in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in params.items() if n not in trainable}

    inputs = layer_case.inputs()
    opt = torch.optim.AdamW([params[n] for n in sorted(trainable)], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = layer_case.loss(layer_case.run(model, inputs))
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = layer_case.loss(layer_case.run(model, inputs)).item()
    assert math.isfinite(final) and final < losses[0], (losses, final)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"base parameter {n} changed"
    # the adapters left the identity
    assert all(torch.count_nonzero(layer.surm_op["default"].to_dense()) for layer in surm_layers(model).values())


# ---------------------------------------------------------------------------------------- 7. dtype/device
def test_to_float64_forward_and_gradients(structure, layer_case):
    model = get_peft_model(layer_case.model(), structure.config(layer_case, init_weights=False, alpha=0.7))
    model.to(F64)
    assert {p.dtype for p in model.parameters()} == {F64}
    inputs = layer_case.inputs(F64)
    out = layer_case.run(model, inputs)
    assert out.dtype == F64
    deltas = adapter_deltas(model, {"default": 0.7})
    assert_close64(out.detach(), dense_reference(layer_case, deltas, inputs, F64))

    layer_case.loss(out).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "surm_" in n}
    assert grads and all(g is not None and g.dtype == F64 and torch.isfinite(g).all() for g in grads.values())
    assert any(torch.count_nonzero(g) for g in grads.values())
    assert all(p.grad is None for n, p in model.named_parameters() if not _trainable(n))

    model.to("cpu")
    with torch.no_grad():
        assert torch.equal(layer_case.run(model, inputs), out.detach())


def _half_tolerance(case, dtype, rel):
    """``rel``, or twice the relative error the cast to ``dtype`` causes in the base model alone if larger."""
    with torch.no_grad():
        base_err = rel_err(case.run(case.model(dtype), case.inputs(dtype)), case.run(case.model(), case.inputs()))
    return max(rel, 2 * base_err)


HALF = [pytest.param(torch.bfloat16, 2e-2, id="bf16"), pytest.param(torch.float16, 5e-3, id="fp16")]


@pytest.mark.parametrize(
    ("dtype", "rel"),
    HALF,
)
def test_half_precision_forward_and_merge(structure, layer_case, dtype, rel):
    """A float32 PEFT model cast with .half() / .bfloat16(): forward, merge, unmerge, safe merge stay finite
    and close to the float32 output.

    The tolerance is ``rel`` or, if larger, twice the error the cast causes in the *base* model alone (the
    tiny BERT's logits are small differences of larger terms: its bf16 logits are off by ~2 % without
    adapters).
    """
    rel = _half_tolerance(layer_case, dtype, rel)
    model = get_peft_model(layer_case.model(), structure.config(layer_case, init_weights=False))
    with torch.no_grad():
        out32 = layer_case.run(model, layer_case.inputs())
    model = model.bfloat16() if dtype == torch.bfloat16 else model.half()
    assert {p.dtype for p in model.parameters()} == {dtype}
    inputs = layer_case.inputs(dtype)
    with torch.no_grad():
        out = layer_case.run(model, inputs)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out, out32) <= rel, rel_err(out, out32)

    layers = surm_layers(model)
    weights = {p: layer.get_base_layer().weight.detach().clone() for p, layer in layers.items()}
    with torch.no_grad():
        model.merge_adapter(safe_merge=True)
        # the merge happened: W = W0 + get_delta_weight in the half dtype (one rounding at the scale of W0 + ΔW)
        for path, layer in layers.items():
            assert layer.merged_adapters == ["default"], path
            merged_w = layer.get_base_layer().weight.detach()
            assert merged_w.dtype == dtype, path
            expected = (weights[path].float() + layer.get_delta_weight("default").float()).to(dtype)
            tol = 2 * torch.finfo(dtype).eps * float(expected.float().abs().max())
            assert float((merged_w.float() - weights[path].float()).abs().max()) > tol, path  # ΔW survives rounding
            torch.testing.assert_close(merged_w.float(), expected.float(), atol=tol, rtol=0)
        merged = layer_case.run(model, inputs)
        model.unmerge_adapter()
        # unmerge restores W0 up to the rounding of W0 + ΔW - ΔW in the half dtype
        for path, layer in layers.items():
            assert not layer.merged, path
            w0 = weights[path].float()
            tol = 2 * torch.finfo(dtype).eps * float((w0 + layer.get_delta_weight("default").float()).abs().max())
            torch.testing.assert_close(layer.get_base_layer().weight.detach().float(), w0, atol=tol, rtol=0)
        unmerged = layer_case.run(model, inputs)
    # merging rounds W + ΔW to the half dtype, unmerging rounds again: allow twice the forward tolerance
    for o in (merged, unmerged):
        assert o.dtype == dtype and torch.isfinite(o).all()
        assert rel_err(o, out32) <= 2 * rel, rel_err(o, out32)


@pytest.mark.parametrize(("dtype", "rel"), HALF)
def test_half_precision_base_model_gets_float32_adapters(structure, layer_case, dtype, rel):
    """get_peft_model on a bf16 / fp16 base (PEFT's autocast_adapter_dtype=True): adapter parameters in
    float32, output in the base dtype, close to the same model in float32."""
    model = get_peft_model(layer_case.model(dtype), structure.config(layer_case, init_weights=False))
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if "surm_" in name else dtype), name
    with torch.no_grad():
        out = layer_case.run(model, layer_case.inputs(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    # reference: the float32 base model with the same (float32) ΔW, computed without PEFT
    deltas = adapter_deltas(model, {"default": 1.0})
    ref = dense_reference(layer_case, deltas, layer_case.inputs(), torch.float32)
    assert rel_err(out, ref) <= _half_tolerance(layer_case, dtype, rel), rel_err(out, ref)


# -------------------------------------------------------------------------------------------- 10. Trainer
def test_transformers_trainer_smoke(one_structure, tmp_path):
    from transformers import Trainer, TrainingArguments

    case = LAYERS_BY_ID["linear-bert"]
    model = get_peft_model(case.model(), one_structure.config(case, task_type="SEQ_CLS"))
    assert type(model).__name__ == "PeftModelForSequenceClassification"
    model.train()
    g = torch.Generator().manual_seed(0)
    data = [
        {
            "input_ids": torch.randint(0, 64, (7,), generator=g),
            "labels": int(torch.randint(0, 3, (), generator=g)),
        }
        for _ in range(16)
    ]
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        label_names=["labels"],
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if "surm_" in n}
    assert frozen and adapters and all(model.get_parameter(n).requires_grad for n in adapters)
    result = Trainer(model=model, args=args, train_dataset=data).train()
    assert result.global_step == 4
    assert math.isfinite(result.training_loss)
    params = dict(model.named_parameters())
    for n, v in frozen.items():  # the base model did not change
        assert torch.equal(params[n], v), n
    # every SURM layer's adapter was trained (some of its parameters changed, its ΔW left zero)
    for path, layer in surm_layers(model).items():
        changed = [n for n in adapters if f".{path}.surm_op." in n and not torch.equal(params[n], adapters[n])]
        assert changed, f"no adapter parameter of {path} changed"
        assert torch.count_nonzero(layer.surm_op["default"].to_dense()) > 0, path


@pytest.mark.parametrize("compute", ["fast", "dense"])
def test_trainer_evaluation_after_training_sees_the_trained_adapter(compute, tmp_path):
    """transformers' default optimizer (adamw_torch_fused) updates parameters without bumping their version
    counters: an evaluation per epoch caches ΔW / spectra / the folded weight, and the next one must not reuse
    them. Trainer.predict after training equals a fresh copy of the trained model (no caches)."""
    import copy

    from transformers import Trainer, TrainingArguments

    case = LAYERS_BY_ID["linear-bert"]
    config = SurmConfig(structure="circulant", target_modules=["query", "value"], task_type="SEQ_CLS", compute=compute)
    model = get_peft_model(case.model(), config)
    g = torch.Generator().manual_seed(0)
    data = [
        {"input_ids": torch.randint(0, 64, (7,), generator=g), "labels": int(torch.randint(0, 3, (), generator=g))}
        for _ in range(16)
    ]
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        num_train_epochs=3,
        eval_strategy="epoch",
        per_device_train_batch_size=8,
        learning_rate=5e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        label_names=["labels"],
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    assert "fused" in str(args.optim).lower()  # the default this test is about
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data)
    trainer.train()
    predicted = torch.as_tensor(trainer.predict(data).predictions)
    fresh = copy.deepcopy(model).eval()  # caches live outside the module: the copy has none
    with torch.no_grad():
        expected = fresh(input_ids=torch.stack([d["input_ids"] for d in data])).logits
    torch.testing.assert_close(predicted, expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------- decoder models


def test_decoder_generate(one_structure):
    """task_type CAUSAL_LM on a GPT-2 LM: generate() works; at init it generates what the base model does."""
    ids = torch.randint(1, 50, (2, 5), generator=torch.Generator().manual_seed(0))
    kwargs = {"max_new_tokens": 4, "do_sample": False, "attention_mask": torch.ones_like(ids)}
    expected = tiny_gpt2_lm().generate(ids, **kwargs)
    lm = LAYERS_BY_ID["conv1d-gpt2"]
    model = get_peft_model(tiny_gpt2_lm(), one_structure.config(lm, task_type="CAUSAL_LM"))
    assert type(model).__name__ == "PeftModelForCausalLM"
    assert torch.equal(model.generate(input_ids=ids, **kwargs), expected)
    model = get_peft_model(tiny_gpt2_lm(), one_structure.config(lm, task_type="CAUSAL_LM", init_weights=False))
    out = model.generate(input_ids=ids, **kwargs)
    assert out.shape == (2, 9)
    # with a non-zero ΔW, generate (KV cache, one new token per step) is greedy decoding of the adapted model's
    # full forward
    assert torch.equal(out, greedy_decode(model, ids, 4))


def test_gradient_checkpointing_gives_the_same_gradients(one_structure):
    """With activation checkpointing the SURM layers are recomputed in backward (their forward runs twice) and
    the gradients are those of the plain run."""
    lm = LAYERS_BY_ID["conv1d-gpt2"]
    ids = torch.randint(1, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    grads, calls = [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = get_peft_model(tiny_gpt2_lm(), one_structure.config(lm, task_type="CAUSAL_LM", init_weights=False))
        if checkpointing:
            base = model.base_model.model
            # transformers 5 renamed it (the old name warns); keep transformers 4.x working
            (getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable)()
            model.enable_input_require_grads()
        model.train()
        layer = next(iter(surm_layers(model).values()))
        n_calls = [0]

        def count(*_, n_calls=n_calls):
            n_calls[0] += 1

        layer.register_forward_hook(count)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        calls.append(n_calls[0])
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert calls == [1, 2]
    assert grads[0].keys() == grads[1].keys() and grads[0]
    assert all("surm_" in n for n in grads[0])
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, atol=1e-6, rtol=1e-5)
