"""Loading from the Hugging Face hub or a local path, with one-line errors instead of tracebacks.

Weights come from a hub id or a local folder/file. Without network, a hub id fails deep inside
huggingface_hub; `hub_errors` turns that into a UserError that names the id and says what to do.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from .errors import UserError


def offline() -> bool:
    """HF_HUB_OFFLINE read now (huggingface_hub reads it once at import, too early for a CLI flag)."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def is_local(ref: str | os.PathLike) -> bool:
    return Path(ref).expanduser().exists()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


@contextlib.contextmanager
def hub_errors(ref: str | os.PathLike, what: str) -> Iterator[None]:
    """Re-raise any loading failure of `what` from `ref` as one clear UserError line."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001  (hub, network, file-format errors all end here)
        if is_local(ref):
            raise UserError(f"{what} at {ref} could not be loaded ({_first_line(exc)})") from None
        raise UserError(
            f"cannot load {what} {str(ref)!r} from the Hugging Face hub ({_first_line(exc)}); without network, "
            f"download it where there is network, then set HF_HUB_OFFLINE=1 and give its local folder path instead"
        ) from None


def resolve_file(ref: str | os.PathLike, filename: str, what: str) -> Path:
    """A file given as itself, as a folder holding `filename`, or as a hub repo id holding `filename`."""
    path = Path(ref).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if not (path / filename).is_file():
            raise UserError(f"{what}: folder {path} has no {filename}")
        return path / filename
    from huggingface_hub import hf_hub_download

    with hub_errors(ref, what):
        return Path(hf_hub_download(str(ref), filename, local_files_only=offline()))
