"""User data files: ``.csv``, ``.tsv`` and JSON lines (``.jsonl`` / ``.json``)."""

from __future__ import annotations

import csv
import io
import json
import os
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from structpeft.data.base import (
    ClassificationData,
    DataError,
    DataFileNotFoundError,
    GenerationData,
    split_indices,
    stratified_split,
    stratified_take,
)

__all__ = ["SUPPORTED_SUFFIXES", "TASKS", "ExactMatchScorer", "load_file", "read_records"]

SUPPORTED_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")
TASKS = ("classification", "generation")

_INT_RE = re.compile(r"^(-?(?:0|[1-9]\d*))(?:\.0+)?$")


def read_records(path: str | os.PathLike[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """Read a data file into a list of row dicts and the list of column names (in first-seen order).

    ``.csv`` / ``.tsv`` need a header row. ``.jsonl`` / ``.json`` hold one JSON object per line; a ``.json``
    file holding a single JSON array of objects is accepted too.
    """
    p = Path(path).expanduser()
    suffix = p.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise DataError(
            f"unsupported data file type {suffix or '(no suffix)'!r} for {str(p)!r}; supported: "
            f"{', '.join(SUPPORTED_SUFFIXES)}"
        )
    if not p.exists():
        raise DataFileNotFoundError(
            f"data file {str(p)!r} does not exist (give an existing {'/'.join(SUPPORTED_SUFFIXES)} file "
            "or a built-in data set name)"
        )
    if not p.is_file():
        raise DataError(f"data path {str(p)!r} is not a file; expected a {'/'.join(SUPPORTED_SUFFIXES)} file")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"data file {str(p)!r} is not UTF-8 text: {exc}") from exc
    if not text.strip():
        raise DataError(f"data file {str(p)!r} is empty; it needs a header/first record and at least one row")
    if suffix in (".csv", ".tsv"):
        rows, columns = _read_delimited(p, text, "\t" if suffix == ".tsv" else ",")
    else:
        rows, columns = _read_json(p, text)
    if not rows:
        raise DataError(f"data file {str(p)!r} has no data rows (columns: {columns!r})")
    return rows, columns


def _read_delimited(p: Path, text: str, delimiter: str) -> tuple[list[dict[str, Any]], list[str]]:
    # newline="": the csv module handles line ends itself (also inside quoted fields). strict: a quote that closes
    # a field must be followed by the delimiter or the line end (a stray quote would otherwise swallow rows)
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    tsv = delimiter == "\t"
    columns = list(reader.fieldnames or [])
    if len(set(columns)) != len(columns):
        dup = sorted({c for c in columns if columns.count(c) > 1})
        raise DataError(f"data file {str(p)!r} has duplicate column names {dup!r}")
    rows: list[dict[str, Any]] = []
    old_limit = csv.field_size_limit(2**31 - 1)  # long documents exceed the 128 KiB default
    last_line = reader.line_num
    try:
        for row in reader:
            first_line, last_line = last_line + 1, reader.line_num
            if tsv and last_line > first_line and any(isinstance(v, str) and "\n" in v for v in row.values()):
                raise DataError(
                    f"{str(p)!r} line {first_line}: a quote opened in this row is closed only on line {last_line}, "
                    "so the rows between were read as one text; TSV fields cannot hold line breaks: remove the "
                    "stray quote (or quote the field as a whole)"
                )
            if None in row:  # more fields than header names
                raise DataError(
                    f"{str(p)!r} line {reader.line_num}: {len(columns) + len(row[None])} fields but the "
                    f"header has {len(columns)} ({columns!r}); quote fields that contain "
                    f"{'tabs' if delimiter == chr(9) else 'commas'}"
                )
            if all(v is None or v == "" for v in row.values()):
                continue  # blank line
            row["__line__"] = reader.line_num
            rows.append(row)
    except csv.Error as exc:
        raise DataError(
            f"{str(p)!r} line {last_line + 1}: malformed {'TSV' if tsv else 'CSV'} ({exc}); a field that starts with a "
            "quote must end with one (write a quote inside a quoted field as two quotes)"
        ) from exc
    finally:
        csv.field_size_limit(old_limit)
    return rows, columns


def _read_json(p: Path, text: str) -> tuple[list[dict[str, Any]], list[str]]:
    stripped = text.lstrip()
    records: list[tuple[int, Any]] = []
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{str(p)!r}: invalid JSON array ({exc})") from exc
        records = [(i + 1, r) for i, r in enumerate(data)]
        where = "item"
    else:
        # split on "\n" only: str.splitlines() would also split at U+2028 etc., which JSON allows in strings
        for lineno, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                records.append((lineno, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{str(p)!r} line {lineno}: not valid JSON ({exc.msg}); expected one JSON object per line"
                ) from exc
        where = "line"
    rows: list[dict[str, Any]] = []
    columns: dict[str, None] = {}
    for lineno, rec in records:
        if not isinstance(rec, dict):
            raise DataError(
                f"{str(p)!r} {where} {lineno}: expected a JSON object with named fields, got {type(rec).__name__}"
            )
        for k in rec:
            columns.setdefault(k, None)
        rec = dict(rec)
        rec["__line__"] = lineno
        rows.append(rec)
    return rows, list(columns)


def _check_columns(p: str, columns: Sequence[str], wanted: dict[str, str | None]) -> None:
    for option, col in wanted.items():
        if col is not None and col not in columns:
            raise DataError(
                f"column {col!r} (option {option}) does not exist in {p!r}; existing columns: {list(columns)!r}"
            )


def _cell(p: str, row: dict[str, Any], index: int, col: str, *, as_text: bool = True) -> Any:
    lineno = row.get("__line__", index + 1)
    if col not in row or row[col] is None:
        raise DataError(f"{p!r} row at line {lineno}: missing value for column {col!r}")
    value = row[col]
    if as_text:
        if isinstance(value, (dict, list)):
            raise DataError(f"{p!r} row at line {lineno}: column {col!r} holds a {type(value).__name__}, expected text")
        text = value if isinstance(value, str) else str(value)
        if not text.strip():  # an empty cell, as a missing one: nothing to learn from or to answer
            raise DataError(f"{p!r} row at line {lineno}: empty value in column {col!r}")
        return text
    return value


def _label_key(p: str, value: Any, lineno: Any, col: str) -> int | str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        v = value.strip()
        if v == "":
            raise DataError(f"{p!r} row at line {lineno}: empty label in column {col!r}")
        # an integer written canonically ("3", "-1") or as an integer-valued decimal ("3.0", how pandas writes a
        # float column) is the number, as in JSON; anything else ("03", "+3", "1e3") is a label string as written
        m = _INT_RE.match(v)
        return int(m.group(1)) if m else v
    if isinstance(value, (float, dict, list)):
        raise DataError(f"{p!r} row at line {lineno}: label {value!r} in column {col!r} must be a string or an integer")
    return str(value)


def _label_values(p: str, rows: list[dict[str, Any]], col: str) -> list[int | str]:
    out = []
    for i, row in enumerate(rows):
        lineno = row.get("__line__", i + 1)
        if col not in row or row[col] is None:
            raise DataError(f"{p!r} row at line {lineno}: missing label in column {col!r}")
        out.append(_label_key(p, row[col], lineno, col))
    return out


def _label_names(values: Sequence[int | str]) -> list[int | str]:
    uniq = set(values)
    if all(isinstance(v, int) for v in uniq):
        return sorted(uniq)
    return sorted({str(v) for v in uniq})


def _validate_options(test_fraction: float, max_train: int | None, max_test: int | None) -> None:
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
        raise DataError(f"test_fraction must be a number strictly between 0 and 1, got {test_fraction!r}")
    for name, v in (("max_train", max_train), ("max_test", max_test)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise DataError(f"{name} must be a positive integer or None, got {v!r}")


def _detect_task(
    p: str,
    columns: Sequence[str],
    task: str | None,
    label_column: str,
    prompt_column: str,
    answer_column: str,
) -> str:
    if task is not None:
        if task not in TASKS:
            raise DataError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)} (or None to infer)")
        return task
    if label_column in columns:
        return "classification"
    if prompt_column in columns and answer_column in columns:
        return "generation"
    raise DataError(
        f"cannot tell the task of {p!r}: it has no label column {label_column!r} (classification) and not "
        f"both a prompt column {prompt_column!r} and an answer column {answer_column!r} (generation); "
        f"existing columns: {list(columns)!r}. Set label_column=..., or prompt_column=/answer_column=, "
        "or task=."
    )


def load_file(
    path: str | os.PathLike[str],
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
    """Load a user data file; see :func:`structpeft.data.load_data` for the options.

    Without ``test_path`` the rows are split into train/test (``test_fraction``, seeded; stratified by label
    for classification). With ``test_path`` that file (same columns) is the test set and nothing is split.
    ``max_train`` / ``max_test`` then keep a seeded (stratified) subset of each side.
    """
    _validate_options(test_fraction, max_train, max_test)
    p = str(Path(path).expanduser())
    rows, columns = read_records(p)
    task = _detect_task(p, columns, task, label_column, prompt_column, answer_column)
    wanted: dict[str, str | None] = (
        {"text_column": text_column, "text_pair_column": text_pair_column, "label_column": label_column}
        if task == "classification"
        else {"prompt_column": prompt_column, "answer_column": answer_column}
    )
    _check_columns(p, columns, wanted)
    test_rows: list[dict[str, Any]] | None = None
    tp = None
    if test_path is not None:
        tp = str(Path(test_path).expanduser())
        test_rows, test_columns = read_records(tp)
        _check_columns(tp, test_columns, wanted)

    source = f"user file {p}" + (f" (test: {tp})" if tp else f" (seeded split, test_fraction={test_fraction})")
    name = Path(p).stem
    if task == "classification":
        return _classification(
            p,
            rows,
            tp,
            test_rows,
            text_column,
            text_pair_column,
            label_column,
            max_train,
            max_test,
            test_fraction,
            seed,
            name,
            source,
        )
    return _generation(
        p,
        rows,
        tp,
        test_rows,
        prompt_column,
        answer_column,
        max_train,
        max_test,
        test_fraction,
        seed,
        name,
        source,
    )


def _classification(
    p, rows, tp, test_rows, text_col, pair_col, label_col, max_train, max_test, frac, seed, name, source
) -> ClassificationData:
    values = _label_values(p, rows, label_col)
    test_values = _label_values(tp, test_rows, label_col) if test_rows is not None else []
    names = _label_names(values + test_values)
    if len(names) < 2:
        raise DataError(
            f"label column {label_col!r} of {p!r} has only one class {str(names[0])!r}; classification "
            "needs at least two distinct labels (is label_column the right column?)"
        )
    to_id = {v: i for i, v in enumerate(names)}
    if not all(isinstance(v, int) for v in names):
        values = [str(v) for v in values]
        test_values = [str(v) for v in test_values]
    label_names = [str(v) for v in names]

    def columns_of(src, rs, vals):
        texts = [_cell(src, r, i, text_col) for i, r in enumerate(rs)]
        pairs = [_cell(src, r, i, pair_col) for i, r in enumerate(rs)] if pair_col else None
        return texts, pairs, [to_id[v] for v in vals]

    texts, pairs, labels = columns_of(p, rows, values)
    if test_rows is None:
        train_idx, test_idx = stratified_split(labels, frac, seed)
        te_texts, te_pairs, te_labels = texts, pairs, labels
    else:
        te_texts, te_pairs, te_labels = columns_of(tp, test_rows, test_values)
        train_idx = list(range(len(labels)))
        test_idx = list(range(len(te_labels)))
        random.Random(seed).shuffle(train_idx)
        random.Random(seed + 1).shuffle(test_idx)
    if max_train is not None:
        train_idx = [train_idx[i] for i in stratified_take([labels[j] for j in train_idx], max_train, seed)]
    if max_test is not None:
        test_idx = [test_idx[i] for i in stratified_take([te_labels[j] for j in test_idx], max_test, seed + 1)]
    trained = {labels[i] for i in train_idx}
    limit = f" (max_train={max_train})" if max_train is not None else ""
    if len(trained) < 2:
        only = ", ".join(repr(label_names[i]) for i in sorted(trained)) or "none"
        raise DataError(
            f"the training examples of {p!r}{limit} hold one class only ({only}); classification needs at least two "
            f"(all labels: {label_names})"
        )
    unseen = sorted({te_labels[i] for i in test_idx} - trained)
    if unseen:
        raise DataError(
            f"test labels {[label_names[i] for i in unseen]} never occur in the training examples of {p!r}{limit} "
            f"(training labels: {[label_names[i] for i in sorted(trained)]}): the model could not learn them; use "
            "test data with the training labels, or more training data"
        )
    return ClassificationData(
        train_texts=[texts[i] for i in train_idx],
        train_pairs=[pairs[i] for i in train_idx] if pairs is not None else None,
        test_texts=[te_texts[i] for i in test_idx],
        test_pairs=[te_pairs[i] for i in test_idx] if te_pairs is not None else None,
        train_labels=[labels[i] for i in train_idx],
        test_labels=[te_labels[i] for i in test_idx],
        label_names=label_names,
        name=name,
        source=source,
    )


def _generation(
    p, rows, tp, test_rows, prompt_col, answer_col, max_train, max_test, frac, seed, name, source
) -> GenerationData:
    prompts = [_cell(p, r, i, prompt_col) for i, r in enumerate(rows)]
    answers = [_cell(p, r, i, answer_col) for i, r in enumerate(rows)]
    if test_rows is None:
        if len(rows) < 2:
            raise DataError(f"{p!r} has only {len(rows)} row; a train/test split needs at least 2")
        train_idx, test_idx = split_indices(len(rows), frac, seed)
        te_prompts, te_answers = prompts, answers
    else:
        te_prompts = [_cell(tp, r, i, prompt_col) for i, r in enumerate(test_rows)]
        te_answers = [_cell(tp, r, i, answer_col) for i, r in enumerate(test_rows)]
        train_idx = list(range(len(rows)))
        test_idx = list(range(len(test_rows)))
        random.Random(seed).shuffle(train_idx)
        random.Random(seed + 1).shuffle(test_idx)
    if max_train is not None:
        train_idx = train_idx[:max_train]
    if max_test is not None:
        test_idx = test_idx[:max_test]
    test_answers = [te_answers[i] for i in test_idx]
    return GenerationData(
        train_prompts=[prompts[i] for i in train_idx],
        train_answers=[answers[i] for i in train_idx],
        test_prompts=[te_prompts[i] for i in test_idx],
        test_answers=test_answers,
        name=name,
        source=source,
        score=ExactMatchScorer(test_answers),
    )


def _normalise(text: str) -> str:
    return " ".join(text.strip().split()).lower()


class ExactMatchScorer:
    """``score(generated_text, i)``: 1.0 if the text equals reference answer ``i`` up to case and runs of
    whitespace, else 0.0. A class rather than a closure so that :class:`GenerationData` stays picklable."""

    def __init__(self, answers: list[str]) -> None:
        self.gold = [_normalise(a) for a in answers]

    def __call__(self, generated_text: str, i: int) -> float:
        return 1.0 if _normalise(generated_text) == self.gold[i] else 0.0
