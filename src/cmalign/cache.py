"""Where cmalign keeps what it builds once and reuses (base models, classifiers, proxy rewards)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shutil
import tempfile
from datetime import datetime, timezone
from importlib import metadata, resources
from pathlib import Path


def cache_root() -> Path:
    """$CMALIGN_CACHE, else $XDG_CACHE_HOME/cmalign, else ~/.cache/cmalign."""
    if os.environ.get("CMALIGN_CACHE"):
        return Path(os.environ["CMALIGN_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cmalign"


def config_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("cmalign", "torch", "diffusers", "peft", "accelerate", "transformers", "scikit-learn", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def shipped_asset(key: str) -> Path | None:
    """The folder `key` that ships inside the package (src/cmalign/assets/), or None."""
    ref = resources.files("cmalign") / "assets" / key
    return Path(str(ref)) if ref.is_dir() else None


def manifest(**fields) -> dict:
    return {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "versions": library_versions(), **fields}


def publish_dir(tmp: Path, final: Path) -> None:
    """Move a fully written temporary folder into place in one rename (no half-written cache)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        if not final.exists():
            os.replace(tmp, final)
            return
    except OSError:  # another process (a parallel experiment run) published the same entry first
        if not final.exists():
            raise
    shutil.rmtree(tmp, ignore_errors=True)


def staging_dir(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    # mkdtemp makes the folder 0700, which publish_dir's rename would keep: other users of a shared
    # cache could not read the entry. Give it the mode a plain mkdir would (0777 minus the umask).
    from cmalign.training.run_dir import umask

    os.chmod(tmp, 0o777 & ~umask())
    return tmp


@contextlib.contextmanager
def build_lock(final: Path):
    """One process builds a cache entry at a time: the others (parallel experiment workers, test
    workers) wait here and then find the entry built instead of building it again."""
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
