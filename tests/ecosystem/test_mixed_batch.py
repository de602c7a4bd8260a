"""Mixed-adapter batches: ``model(..., adapter_names=[...])`` gives example i the adapter adapter_names[i]
(``"__base__"``: none), as PEFT's LoRA does.

Reference: each example run alone with that adapter set active (``set_adapter``), or with the adapters disabled
for ``"__base__"``. Covered: nn.Linear (MLP), transformers Conv1D (GPT-2) and nn.Conv2d; SURM LoRA placement
(circulant, Kronecker) and adapter placement (bottleneck, GELU) in one model, PMSS in another; per-adapter
classification heads (``modules_to_save``); ``generate``; and the errors.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from eco_models import MLP, ConvNet, gpt2_lm, pmss, seeded, surm_adapter, surm_lora
from peft import get_peft_model

from structpeft import MixedBatchError
from testkit import tiny_bert_cls

BASE = "__base__"


def _mlp_inputs(n: int) -> dict:
    return {"x": torch.randn(n, 10, generator=torch.Generator().manual_seed(1))}


def _gpt2_inputs(n: int) -> dict:
    return {"input_ids": torch.randint(1, 40, (n, 7), generator=torch.Generator().manual_seed(1))}


def _conv_inputs(n: int) -> dict:
    return {"x": torch.randn(n, 3, 7, 6, generator=torch.Generator().manual_seed(1))}


# layer type -> (base model factory, inputs, LoRA-placement targets, adapter-placement targets, output reader)
LAYER_TYPES = {
    "linear": (MLP, _mlp_inputs, ["fc1", "fc2"], ["fc2"], lambda out: out),
    "conv1d": (gpt2_lm, _gpt2_inputs, ["c_attn"], ["mlp.c_proj"], lambda out: out.logits),
    "conv2d": (ConvNet, _conv_inputs, ["conv0", "conv1"], ["conv1"], lambda out: out),
}
SURM_NAMES = ["cir", BASE, "adp", "kro", "cir", "adp", BASE]
PMSS_NAMES = ["p1", "p2", BASE, "p2", "p1"]


def surm_model(layer_type: str):
    factory, _, lora_targets, adapter_targets, _ = LAYER_TYPES[layer_type]
    model = get_peft_model(seeded(factory), surm_lora("circulant", lora_targets), adapter_name="cir")
    model.add_adapter("kro", surm_lora("kronecker", lora_targets))
    model.add_adapter("adp", surm_adapter(adapter_targets))
    return model.eval()


def pmss_model(layer_type: str):
    factory, _, lora_targets, _, _ = LAYER_TYPES[layer_type]
    model = get_peft_model(seeded(factory), pmss(lora_targets), adapter_name="p1")
    model.add_adapter("p2", pmss(lora_targets[-1:], k_in=2, k_out=4, selection="random"))
    return model.eval()


def each_alone(model, inputs: dict, names: list[str], read) -> list[torch.Tensor]:
    """Example i run alone with adapter names[i] active (or with adapters disabled for "__base__")."""
    outs = []
    for i, name in enumerate(names):
        one = {k: v[i : i + 1] for k, v in inputs.items()}
        if name == BASE:
            with model.disable_adapter():
                outs.append(read(model(**one))[0])
        else:
            model.set_adapter(name)
            outs.append(read(model(**one))[0])
    return outs


@pytest.mark.parametrize("layer_type", LAYER_TYPES)
@pytest.mark.parametrize("method", ["surm", "pmss"])
@torch.no_grad()
def test_mixed_batch_equals_each_example_alone(layer_type, method):
    model = surm_model(layer_type) if method == "surm" else pmss_model(layer_type)
    names = SURM_NAMES if method == "surm" else PMSS_NAMES
    _, make_inputs, _, _, read = LAYER_TYPES[layer_type]
    inputs = make_inputs(len(names))
    mixed = read(model(**inputs, adapter_names=names))
    expected = each_alone(model, inputs, names, read)
    for i, (got, want) in enumerate(zip(mixed, expected, strict=True)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5, msg=f"example {i} ({names[i]})")
    # every adapter (and the base) gives another output, so the comparison above can fail
    probe = {k: v[:1] for k, v in inputs.items()}
    outs = {name: each_alone(model, probe, [name], read)[0] for name in set(names)}
    for a, b in itertools.combinations(sorted(outs), 2):
        assert not torch.allclose(outs[a], outs[b], atol=1e-4), (a, b)


@torch.no_grad()
def test_mixed_batch_of_one_adapter_equals_that_adapter_active():
    model = surm_model("linear")
    inputs = _mlp_inputs(5)
    for name in ("cir", "kro", "adp"):
        model.set_adapter(name)
        torch.testing.assert_close(model(**inputs, adapter_names=[name] * 5), model(**inputs), atol=1e-6, rtol=1e-5)
    with model.disable_adapter():
        base = model(**inputs)
    torch.testing.assert_close(model(**inputs, adapter_names=[BASE] * 5), base, atol=0, rtol=0)


@torch.no_grad()
def test_mixed_batch_uses_each_adapters_own_classification_head():
    """task_type SEQ_CLS: every adapter has its own trained copy of the classifier (PEFT's modules_to_save); a
    mixed batch routes each example through its adapter's layers *and* head."""
    from structpeft import SurmConfig

    model = get_peft_model(
        seeded(tiny_bert_cls),
        SurmConfig(structure="circulant", task_type="SEQ_CLS", init_weights=False, target_modules=["query"]),
        adapter_name="a",
    )
    model.add_adapter(
        "b", SurmConfig(structure="ldr", task_type="SEQ_CLS", init_weights=False, target_modules=["value"])
    )
    model.eval()
    for i, name in enumerate(("a", "b")):  # make the heads differ from the base head and from each other
        head = model.base_model.model.classifier.modules_to_save[name]
        head.weight.data.add_(0.5 * (i + 1))
    ids = torch.randint(0, 64, (4, 6), generator=torch.Generator().manual_seed(2))
    names = ["b", "a", BASE, "b"]
    mixed = model(input_ids=ids, adapter_names=names).logits
    expected = each_alone(model, {"input_ids": ids}, names, lambda out: out.logits)
    for got, want in zip(mixed, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(expected[0], expected[1], atol=1e-3)


@pytest.mark.parametrize("num_beams", [1, 2])
@torch.no_grad()
def test_generate_with_mixed_adapters(num_beams):
    model = surm_model("conv1d")
    ids = _gpt2_inputs(3)["input_ids"]
    names = ["kro", BASE, "adp"]
    kwargs = {"max_new_tokens": 4, "do_sample": False, "num_beams": num_beams}
    mixed = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names, **kwargs)
    for i, name in enumerate(names):
        one = ids[i : i + 1]
        alone = {}  # this prompt's generation with each of the batch's adapters (and none)
        for other in names:
            if other == BASE:
                with model.disable_adapter():
                    alone[other] = model.generate(input_ids=one, attention_mask=torch.ones_like(one), **kwargs)[0]
            else:
                model.set_adapter(other)
                alone[other] = model.generate(input_ids=one, attention_mask=torch.ones_like(one), **kwargs)[0]
        assert torch.equal(mixed[i], alone[name]), (name, mixed[i], alone[name])
        # the adapters generate differently from this prompt, so example i getting another one's layers would fail
        for other, generated in alone.items():
            assert other == name or not torch.equal(generated, alone[name]), (name, other, generated)


@torch.no_grad()
def test_mixed_batch_with_adapters_disabled_is_the_base_model():
    model = surm_model("linear")
    inputs = _mlp_inputs(3)
    with model.disable_adapter():
        base = model(**inputs)
        torch.testing.assert_close(model(**inputs, adapter_names=["cir", "kro", "adp"]), base, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["cir", "nope", "kro"], "['nope']"),
        (["cir", "kro"], "adapter_names has 2 entries but the batch reaching"),
        ("cir", "adapter_names='cir' is invalid"),
        (["cir", 3, "kro"], "expected a list with one adapter name (str) per example"),
    ],
)
@torch.no_grad()
def test_mixed_batch_errors(names, message):
    model = surm_model("linear")
    with pytest.raises(MixedBatchError) as info:
        model(**_mlp_inputs(3), adapter_names=names)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)  # PEFT raises ValueError here
    if "nope" in message:
        assert "adp, cir, kro" in str(info.value) and "'__base__'" in str(info.value)


def test_mixed_batch_refuses_merged_adapters_and_training_mode():
    model = surm_model("linear")
    inputs = _mlp_inputs(2)
    model.train()
    with pytest.raises(MixedBatchError, match=r"training mode: call model.eval\(\) first"):
        model(**inputs, adapter_names=["cir", "kro"])
    model.eval()
    model.set_adapter("cir")
    model.merge_adapter()
    with torch.no_grad(), pytest.raises(MixedBatchError, match=r"\['cir'\] are merged .*unmerge_adapter\(\)"):
        model(**inputs, adapter_names=["cir", "kro"])
    model.unmerge_adapter()
    with torch.no_grad():
        assert model(**inputs, adapter_names=["cir", "kro"]).shape == (2, 5)


@torch.no_grad()
def test_generate_encoder_decoder_with_beams():
    """T5 with beam search: the decoder sees each input num_beams times, the encoder once; each part gets the
    adapter names of its own batch."""
    from transformers import T5Config, T5ForConditionalGeneration

    from structpeft import SurmConfig

    cfg = T5Config(
        vocab_size=40,
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=2,
        num_heads=2,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    base = seeded(lambda: T5ForConditionalGeneration(cfg))
    # every weight drawn here, not by transformers' initialiser or the global RNG after it (both differ between
    # transformers versions): base N(0, 0.5²), then the adapters N(0, 1), so that the three generations differ
    gen = torch.Generator().manual_seed(0)
    for p in base.parameters():
        p.normal_(0.0, 0.5, generator=gen)
    model = get_peft_model(base, SurmConfig(structure="circulant", target_modules=["q", "v"]), adapter_name="a")
    model.add_adapter("b", SurmConfig(structure="kronecker", target_modules=["q", "v", "o"]))
    for name, p in model.named_parameters():
        if "surm_op" in name:
            p.normal_(0.0, 1.0, generator=gen)
    model.eval()
    ids = torch.randint(2, 40, (3, 5), generator=torch.Generator().manual_seed(0))
    names = ["a", BASE, "b"]
    kwargs = {"max_new_tokens": 4, "do_sample": False, "num_beams": 2}
    mixed = model.generate(input_ids=ids, adapter_names=names, **kwargs)
    alone = []
    for i, name in enumerate(names):
        if name == BASE:
            with model.disable_adapter():
                alone.append(model.generate(input_ids=ids[i : i + 1], **kwargs)[0])
        else:
            model.set_adapter(name)
            alone.append(model.generate(input_ids=ids[i : i + 1], **kwargs)[0])
    for i, row in enumerate(alone):
        # a row that finished early is filled up to the batch's length (with EOS by transformers 4.56, seen with
        # other weights; the pad id is accepted too), so compare the generation itself and require filler after it
        n = row.shape[0]
        assert torch.equal(mixed[i, :n], row), (names[i], mixed[i], row)
        filler = set(mixed[i, n:].tolist())
        assert filler <= {cfg.pad_token_id, cfg.eos_token_id}, (names[i], mixed[i], row)
        assert n == mixed.shape[1] or row[-1].item() == cfg.eos_token_id, (names[i], mixed[i], row)
    assert len({tuple(row.tolist()) for row in alone}) == 3  # the three generations differ
