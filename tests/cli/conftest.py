"""Fixtures of the CLI tests: a tiny randomly initialised BERT with its own WordPiece vocabulary, and a small
generated CSV data set (two classes separable by one keyword). Nothing is downloaded."""

from __future__ import annotations

import csv
import json
import os
import random
from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    """The ``slow`` tests here (the real MiniLM + BBC demo, minutes of CPU) run only when asked for:
    ``pytest -m slow`` or ``STRUCTPEFT_RUN_SLOW=1``."""
    markexpr = config.getoption("markexpr", "") or ""
    if "slow" in markexpr and "not slow" not in markexpr:
        return
    if os.environ.get("STRUCTPEFT_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: opt in with -m slow or STRUCTPEFT_RUN_SLOW=1")
    for item in items:
        if "slow" in item.keywords and _HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)


FILLER = [
    "the", "a", "one", "two", "red", "blue", "green", "small", "large", "cat", "dog", "bird", "tree", "house",
    "car", "road", "river", "stone", "light", "dark", "fast", "slow", "old", "new", "day", "night", "sun",
    "moon", "rain", "wind",
]  # fmt: skip
KEYWORDS = {"pos": "alpha", "neg": "omega"}
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _write_tiny_bert(directory: Path, *, hidden_size: int = 24, seed: int = 0) -> Path:
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL + FILLER + sorted(KEYWORDS.values())) + "\n", encoding="utf-8")
    import inspect

    if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters:  # transformers >= 5
        tokenizer = BertTokenizerFast(vocab=str(vocab), do_lower_case=True)
    else:  # transformers 4
        tokenizer = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)
    assert tokenizer.unk_token_id not in tokenizer("alpha omega red")["input_ids"], "tiny vocabulary not loaded"
    tokenizer.save_pretrained(str(directory))
    config = BertConfig(
        vocab_size=len(SPECIAL) + len(FILLER) + len(KEYWORDS),
        hidden_size=hidden_size,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    # Saved without a classifier (like a pretrained encoder): the CLI adds and trains the head.
    model = BertForSequenceClassification(config).bert
    model.save_pretrained(str(directory))
    return directory


def _write_csv(path: Path, n_per_class: int = 60, seed: int = 0) -> Path:
    rng = random.Random(seed)
    rows = []
    for label, word in KEYWORDS.items():
        for _ in range(n_per_class):
            words = [rng.choice(FILLER) for _ in range(rng.randint(4, 9))]
            words.insert(rng.randint(0, len(words)), word)
            rows.append({"text": " ".join(words), "label": label})
    rng.shuffle(rows)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return _write_tiny_bert(tmp_path_factory.mktemp("tiny-bert") / "model")


@pytest.fixture(scope="session")
def other_bert(tmp_path_factory) -> Path:
    """A second tiny BERT with the same vocabulary but other weights and hidden size."""
    return _write_tiny_bert(tmp_path_factory.mktemp("other-bert") / "model", hidden_size=32, seed=1)


@pytest.fixture(scope="session")
def keyword_csv(tmp_path_factory) -> Path:
    return _write_csv(tmp_path_factory.mktemp("data") / "keywords.csv")


def _write_tiny_llama(directory: Path, seed: int = 0) -> Path:
    """A tiny random Llama decoder that uses the same WordPiece vocabulary (for the generation path)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    bert_dir = _write_tiny_bert(directory.parent / "tok-src")
    tokenizer = AutoTokenizer.from_pretrained(str(bert_dir))
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(directory))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        eos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return _write_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "model")


@pytest.fixture(scope="session")
def qa_jsonl(tmp_path_factory) -> Path:
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("gen-data") / "qa.jsonl"
    lines = []
    for _ in range(40):
        words = [rng.choice(FILLER) for _ in range(3)]
        answer = "alpha" if "red" in words or rng.random() < 0.5 else "omega"
        lines.append(json.dumps({"prompt": " ".join(words), "answer": answer}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
