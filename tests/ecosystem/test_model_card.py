"""The model card (README.md) that ``save_pretrained`` writes into an adapter folder: method, structure,
trainable parameter count and base model name, in PEFT's card (metadata and text), once per save."""

from __future__ import annotations

import pytest
from eco_models import ADAPTER_KINDS, seeded
from huggingface_hub import ModelCard
from peft import PeftModel, get_peft_model

from structpeft.peft.card import SECTION_START
from testkit import tiny_bert_cls

TARGETS = {"surm-adapter": ["output.dense"]}


@pytest.fixture(scope="module")
def named_base(tmp_path_factory):
    """A tiny BERT saved to and loaded from a folder, so that it has a name_or_path (as a hub model would)."""
    from transformers import BertForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny-bert")
    seeded(tiny_bert_cls).save_pretrained(folder)
    return folder, lambda: BertForSequenceClassification.from_pretrained(folder)


@pytest.mark.parametrize("kind", list(ADAPTER_KINDS))
def test_card_names_method_structure_parameters_and_base_model(kind, named_base, tmp_path):
    folder, load_base = named_base
    config = ADAPTER_KINDS[kind](TARGETS.get(kind, ["query", "value"]), task_type="SEQ_CLS")
    model = get_peft_model(load_base(), config)
    trainable, _ = model.get_nb_trainable_parameters()
    structured = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" not in n)
    model.save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    text = card.text
    method = "PMSS" if kind == "pmss" else "SURM"
    assert f"| Method | {method} (" in text
    assert f"| Trainable parameters | {trainable:,} (" in text
    assert f"{structured:,} structured, {trainable - structured:,} in `modules_to_save`" in text
    assert f"| Base model | `{folder}` |" in text
    assert card.data.base_model == str(folder)
    assert {"structpeft", method.lower()} <= set(card.data.tags)
    assert card.data.library_name == "peft"
    if method == "SURM":
        structure = "kronecker" if kind == "surm-kronecker" else "circulant"
        assert f"| Structure | `{structure}`" in text and f"structure:{structure}" in card.data.tags
        placement = "adapter" if kind == "surm-adapter" else "lora"
        assert f"placement `{placement}`" in text
    else:
        assert "| Structure | skeleton ΔW = W[:, I]·U·W[J, :]" in text and "3×3" in text
    assert "- PEFT " in text  # PEFT's own part of the card is kept
    # the adapter still loads from the folder with the card in it
    assert isinstance(PeftModel.from_pretrained(load_base(), str(tmp_path)), PeftModel)


def test_card_section_is_replaced_not_repeated_and_other_adapters_get_their_own(named_base, tmp_path):
    _, load_base = named_base
    model = get_peft_model(load_base(), ADAPTER_KINDS["surm-circulant"](["query"]))
    model.add_adapter("second", ADAPTER_KINDS["surm-kronecker"](["value"]))
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert text.count(SECTION_START) == 1
    second = ModelCard.load(tmp_path / "second" / "README.md")
    assert second.text.count(SECTION_START) == 1
    assert "`kronecker`" in second.text and "`circulant`" not in second.text
    n_second = sum(p.numel() for n, p in model.named_parameters() if ".second." in n)
    assert f"| Trainable parameters | {n_second:,} (" in second.text


def test_card_of_an_unnamed_base_model_says_so(tmp_path):
    model = get_peft_model(seeded(tiny_bert_cls), ADAPTER_KINDS["surm-circulant"](["query"]))
    model.save_pretrained(tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert "| Base model | not recorded" in text
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert f"| Trainable parameters | {n:,} (stored in `adapter_model.safetensors`: {n:,} structured) |" in text


def test_card_counts_what_the_weights_file_holds(tmp_path):
    """The count comes from the saved file: equal to the adapter's parameters, not to the whole model's."""
    from safetensors.torch import load_file

    model = get_peft_model(seeded(tiny_bert_cls), ADAPTER_KINDS["pmss"](["query", "value"], k_in=2, k_out=5))
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    stored = sum(t.numel() for t in tensors.values() if t.is_floating_point())  # PMSS's indices I, J are not counted
    assert stored == 4 * 2 * 5 and sum(t.numel() for t in tensors.values()) == stored + 4 * (2 + 5)
    assert f"| Trainable parameters | {stored:,} (" in (tmp_path / "README.md").read_text()
    assert stored < sum(p.numel() for p in model.parameters()) / 100
