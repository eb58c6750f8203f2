"""scikit-learn's bundled 8x8 digits: images in [-1, 1], class prompts, and a content hash."""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # the unconditional label used for classifier-free guidance
CLASS_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
WORD_TO_CLASS = {w: i for i, w in enumerate(CLASS_WORDS)}


@lru_cache(maxsize=None)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # scikit-learn loads in ~1 s: only when the digits are first needed

    data = load_digits()
    return data.images.astype(np.float32) / 16.0, data.target.astype(np.int64)


def digits_dataset(resolution: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as (N, 1, r, r) float32 in [-1, 1] and their labels."""
    images, labels = _raw_digits()
    x = torch.from_numpy(images).unsqueeze(1) * 2 - 1
    if resolution != 8:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return x, torch.from_numpy(labels)


def data_hash() -> str:
    """sha256 of the raw digits array, recorded in every manifest built on it."""
    images, labels = _raw_digits()
    return hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()[:16]


def class_prompt(label: int) -> str:
    return f"a handwritten {CLASS_WORDS[label]}"


def parse_prompt(prompt: str) -> int:
    """Map a prompt naming a digit ("a handwritten seven", "7", "digit 7") to its class id."""
    text = prompt.strip().lower()
    found = {WORD_TO_CLASS[w] for w in re.findall(r"[a-z]+", text) if w in WORD_TO_CLASS}
    found |= {int(d) for d in re.findall(r"(?<!\d)\d(?!\d)", text)}
    if len(found) != 1:
        raise ValueError(
            f"prompt {prompt!r} must name exactly one digit class (e.g. 'a handwritten seven' or '7')"
        )
    return found.pop()
