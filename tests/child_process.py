"""Shared by tests that start child Python processes (torchrun workers, example scripts)."""

from __future__ import annotations

import os
from pathlib import Path


def subprocess_env() -> dict[str, str]:
    """The environment of a child Python: one thread per process, structpeft importable from this checkout."""
    import structpeft

    env = dict(os.environ)
    src = str(Path(structpeft.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    env["OMP_NUM_THREADS"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env
