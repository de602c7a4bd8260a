"""Writing the folders structpeft creates for users: replacing a folder atomically (the new one is built next to
it and swapped in only when complete: ``structpeft finetune``'s run folders, :func:`structpeft.to_lora`, the SNLI
fetch), giving a finished folder ordinary modes, and the sha256 that caches record of their files."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def staged_folder(target: Path, name: str | None = None) -> Iterator[Path]:
    """Yield an empty folder ``.<name>.tmp-*`` next to ``target`` (creating the parent if needed); when the body
    returns, it replaces ``target``: an existing ``target`` is renamed aside (``.<name>.old-*``), the new folder
    renamed into place, then the old one deleted, or put back if that rename fails. If the body raises, ``target``
    is untouched, and the staged folder is removed, as is a parent this call created (if still empty). mkdtemp
    makes the folder 0o700: the body sets the modes it wants. ``name`` replaces ``<name>`` (default: target's
    name), for callers that clean up stale folders by a fixed pattern."""
    name = target.name if name is None else name
    parent = target.parent
    created_parent = not parent.exists()
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent))
    try:
        yield tmp
        aside = None
        if target.exists():
            aside = Path(tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent))
            os.replace(target, aside / "old")
        try:
            os.replace(tmp, target)
        except BaseException:
            if aside is not None:
                os.replace(aside / "old", target)  # put the old folder back
                aside.rmdir()
            raise
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created_parent:
            with contextlib.suppress(OSError):
                parent.rmdir()  # only if still empty
        raise


def make_readable(folder: Path) -> None:
    """Give ``folder`` and everything in it the modes of an ordinary shared folder: 0o755 for folders, 0o644 for
    files (mkdtemp makes 0o700, and some writers, e.g. mkstemp and safetensors, 0o600)."""
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o755)
        for f in files:
            os.chmod(os.path.join(root, f), 0o644)
    os.chmod(folder, 0o755)


def file_sha256(path: Path) -> str:
    """The sha256 hex digest of the file at ``path``, read in 4 MB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
