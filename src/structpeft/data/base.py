"""Data containers, error classes and deterministic splitting helpers shared by the loaders."""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from structpeft.errors import ConfigError, UnknownStructureError

__all__ = [
    "ClassificationData",
    "DataError",
    "DataFileNotFoundError",
    "GenerationData",
    "UnknownDatasetError",
    "data_cache_root",
    "split_indices",
    "stratified_split",
    "stratified_take",
]


class DataError(ConfigError):
    """A data set cannot be loaded: empty file, missing column, single-class labels, bad option."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A data file named by the user does not exist."""


class UnknownDatasetError(DataError, UnknownStructureError):
    """A bare name that is neither a built-in data set nor an existing file."""


@dataclass
class ClassificationData:
    """Text or text-pair classification data with a fixed train/test split.

    ``train_pairs`` / ``test_pairs`` hold the second sentence of pair tasks (NLI) and are ``None`` for
    single-text tasks. Labels are ids into ``label_names``.
    """

    train_texts: list[str]
    train_pairs: list[str] | None
    test_texts: list[str]
    test_pairs: list[str] | None
    train_labels: list[int]
    test_labels: list[int]
    label_names: list[str]
    name: str
    source: str

    def __post_init__(self) -> None:
        for split, texts, pairs, labels in (
            ("train", self.train_texts, self.train_pairs, self.train_labels),
            ("test", self.test_texts, self.test_pairs, self.test_labels),
        ):
            if len(texts) != len(labels):
                raise DataError(f"{split}: {len(texts)} texts but {len(labels)} labels")
            if pairs is not None and len(pairs) != len(texts):
                raise DataError(f"{split}: {len(texts)} texts but {len(pairs)} second sentences")
            bad = [y for y in labels if not (0 <= y < len(self.label_names))]
            if bad:
                raise DataError(
                    f"{split}: label id {bad[0]!r} out of range for {len(self.label_names)} label names "
                    f"{self.label_names!r}"
                )

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def is_pair(self) -> bool:
        return self.train_pairs is not None

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.label_names))

    @property
    def label2id(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.label_names)}

    def __repr__(self) -> str:
        return (
            f"ClassificationData(name={self.name!r}, train={len(self.train_texts)}, "
            f"test={len(self.test_texts)}, labels={self.label_names!r}, pair={self.is_pair})"
        )


@dataclass
class GenerationData:
    """Prompt -> answer data for causal-LM fine-tuning.

    ``score(generated_text, i)`` (optional) returns the exact-match score (1.0 or 0.0) of a generated
    continuation for test item ``i``.
    """

    train_prompts: list[str]
    train_answers: list[str]
    test_prompts: list[str]
    test_answers: list[str]
    name: str
    source: str
    score: Callable[[str, int], float] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.train_prompts) != len(self.train_answers):
            raise DataError(f"train: {len(self.train_prompts)} prompts but {len(self.train_answers)} answers")
        if len(self.test_prompts) != len(self.test_answers):
            raise DataError(f"test: {len(self.test_prompts)} prompts but {len(self.test_answers)} answers")

    def __repr__(self) -> str:
        return (
            f"GenerationData(name={self.name!r}, train={len(self.train_prompts)}, "
            f"test={len(self.test_prompts)}, scored={self.score is not None})"
        )


def data_cache_root() -> Path:
    """Root of downloaded data (``$STRUCTPEFT_DATA_DIR``, default ``~/.cache/structpeft/data``)."""
    env = os.environ.get("STRUCTPEFT_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "structpeft" / "data"


# ------------------------------------------------------------------------------------------ splitting


def _allocate(sizes: Sequence[int], n: int, caps: Sequence[int]) -> list[int]:
    """Split ``n`` over groups proportionally to ``sizes`` (largest remainder), each at most its cap."""
    total = sum(sizes)
    if total == 0 or n <= 0:
        return [0] * len(sizes)
    n = min(n, sum(caps))
    exact = [n * s / total for s in sizes]
    counts = [min(int(e), c) for e, c in zip(exact, caps, strict=True)]
    # Hand out the rest by largest remainder (ties: larger group, then lower index), respecting caps.
    order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - int(exact[i])), -sizes[i], i))
    while sum(counts) < n:
        progressed = False
        for i in order:
            if sum(counts) >= n:
                break
            if counts[i] < caps[i]:
                counts[i] += 1
                progressed = True
        if not progressed:
            break
    return counts


def _groups(labels: Sequence[Hashable]) -> dict[Hashable, list[int]]:
    groups: dict[Hashable, list[int]] = {}
    for i, y in enumerate(labels):
        groups.setdefault(y, []).append(i)
    return groups


def stratified_take(labels: Sequence[Hashable], n: int, seed: int) -> list[int]:
    """Indices of a seeded, class-proportional subset of size ``n``, in a seeded random order.

    If ``n >= len(labels)`` all indices are returned in their original order (nothing to drop).
    """
    if n >= len(labels):
        return list(range(len(labels)))
    rng = random.Random(seed)
    groups = _groups(labels)
    keys = sorted(groups, key=repr)
    for k in keys:
        rng.shuffle(groups[k])
    sizes = [len(groups[k]) for k in keys]
    counts = _allocate(sizes, n, sizes)
    chosen = [i for k, c in zip(keys, counts, strict=True) for i in groups[k][:c]]
    rng.shuffle(chosen)
    return chosen


def stratified_split(labels: Sequence[Hashable], test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded stratified train/test split: about ``test_fraction`` of every class goes to test.

    Every class keeps at least one example in train; every class with at least two examples gets at least
    one in test when the test share allows it. Both index lists are returned in a seeded random order.
    """
    rng = random.Random(seed)
    groups = _groups(labels)
    keys = sorted(groups, key=repr)
    for k in keys:
        rng.shuffle(groups[k])
    sizes = [len(groups[k]) for k in keys]
    n_test = max(1, round(len(labels) * test_fraction)) if len(labels) >= 2 else 0
    caps = [max(s - 1, 0) for s in sizes]
    counts = _allocate(sizes, n_test, caps)
    # Give classes with >= 2 examples but 0 test examples one, taken from the largest test share.
    for i, s in enumerate(sizes):
        if s >= 2 and counts[i] == 0:
            donor = max(range(len(counts)), key=lambda j: (counts[j], -j))
            if counts[donor] > 1:
                counts[donor] -= 1
                counts[i] = 1
    test = [i for k, c in zip(keys, counts, strict=True) for i in groups[k][:c]]
    train = [i for k, c in zip(keys, counts, strict=True) for i in groups[k][c:]]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def split_indices(n: int, test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded random train/test split of ``range(n)`` (at least one item on each side when ``n >= 2``)."""
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    n_test = min(max(1, round(n * test_fraction)), n - 1) if n >= 2 else 0
    return idx[n_test:], idx[:n_test]
