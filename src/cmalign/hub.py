"""Loading from the Hugging Face hub or a local path, with one-line errors instead of tracebacks.

Weights come from a hub id or a local folder/file. A path that looks local and is not there is
reported as a missing file or folder (never as a hub failure); without network, a hub id fails deep
inside huggingface_hub, and `hub_errors` turns that into one whole UserError line that names the id,
the flag that gives a local path instead, and the cause.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Iterator, Sequence

from cmalign.errors import UserError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")  # "name" or "owner/name"
_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".json", ".txt", ".gz", ".ckpt")


def offline() -> bool:
    """HF_HUB_OFFLINE read now (huggingface_hub reads it once at import, too early for a CLI flag)."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def is_local(ref: str | os.PathLike) -> bool:
    return Path(ref).expanduser().exists()


def looks_local(ref: str | os.PathLike) -> bool:
    """A path, not a hub id: absolute, ./ ../ ~, more than one '/', a backslash, or a file name suffix."""
    text = str(ref)
    return (isinstance(ref, os.PathLike) or text.startswith(("/", ".", "~")) or "\\" in text
            or not _HUB_ID.match(text) or text.lower().endswith(_FILE_SUFFIXES))


def require_local(ref: str | os.PathLike, what: str, flag: str | None = None) -> None:
    """A local-looking `ref` that does not exist ends here, as what it is: a missing file or folder.
    `flag`: where the user gave it (e.g. "--reward-paths pickscore.tokenizer=PATH")."""
    if looks_local(ref) and not is_local(ref):
        raise UserError(f"{what}: no such file or folder: {ref}" + (f" (given with {flag})" if flag else ""))


def _local_hint(flag: str | None) -> str:
    return f"give its local path with {flag}" if flag else "give its local folder path instead"


def _cause(exc: BaseException) -> str:
    """The exception whole, on one line."""
    text = " ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())
    return f"{type(exc).__name__}: {text}".rstrip(": ")


@contextlib.contextmanager
def hub_errors(ref: str | os.PathLike, what: str, flag: str | None = None) -> Iterator[None]:
    """Re-raise any loading failure of `what` from `ref` as one clear UserError line. `flag` is how a
    local path is given instead (for a reward component: "--reward-paths NAME.COMPONENT=PATH")."""
    require_local(ref, what, flag)
    hint = _local_hint(flag)
    try:
        yield
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001  (hub, network, file-format errors all end here)
        if is_local(ref):
            raise UserError(f"{what} at {ref} could not be loaded ({_cause(exc)})") from None
        text = f"{type(exc).__name__} {exc}".lower()
        if offline() and any(w in text for w in ("localentrynotfound", "offline", "cache", "outgoing traffic")):
            # not cached: the cause would only repeat that (and suggest going online)
            raise UserError(
                f"cannot load {what} {str(ref)!r}: no local file or folder has that name, and with HF_HUB_OFFLINE=1 "
                f"it is not in the Hugging Face cache; download it where there is network and {hint}"
            ) from None
        raise UserError(
            f"cannot load {what} {str(ref)!r}: no local file or folder has that name, and the Hugging Face hub "
            f"gave no such repo or could not be reached ({_cause(exc)}); without network, download it where there "
            f"is network, set HF_HUB_OFFLINE=1 and {hint}"
        ) from None


def resolve_file(ref: str | os.PathLike, filenames: str | Sequence[str], what: str, flag: str | None = None) -> Path:
    """A file given as itself, as a folder holding one of `filenames` (the publisher's names, first
    preferred), or as a hub repo id holding the first of them."""
    names = [filenames] if isinstance(filenames, str) else list(filenames)
    path = Path(ref).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for name in names:
            if (path / name).is_file():
                return path / name
        raise UserError(f"{what}: folder {path} has no {' or '.join(names)}" + (f" (given with {flag})" if flag else ""))
    from huggingface_hub import hf_hub_download

    with hub_errors(ref, what, flag):
        return Path(hf_hub_download(str(ref), names[0], local_files_only=offline()))
