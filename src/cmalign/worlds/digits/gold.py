"""The digits gold preference: the stand-in for human raters (evaluation and pair labels only).

    gold(x, c) = 2 * logp_c(x) + 30 * ink(x) - 2 * nn_c(x)

- logp_c: log-probability of the prompted class under an ensemble of scikit-learn classifiers
  (SVC, logistic regression, MLP) trained on the real digits: the image must show the prompted
  digit;
- ink: mean pixel intensity in [0, 1]: people prefer bold strokes;
- nn_c: L2 distance (in [-1, 1] space, per 64 pixels) to the nearest real digit of the prompted
  class: the image must stay a plausible handwritten digit.

Boldness helps until the strokes stop looking like real digits, so gold has an interior optimum,
and base samples leave room above them. Labels drawn from sigmoid(gold_a - gold_b) agree with
the gold ordering about 72% of the time, a realistic noise level for human preference data.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from cmalign.worlds.digits.data import NUM_CLASSES, digits_dataset, parse_prompt

WEIGHTS = {"logp": 2.0, "ink": 30.0, "nn": -2.0}


@lru_cache(maxsize=None)
def _ensemble(resolution: int):
    # scikit-learn's models load in seconds: only when gold is first scored
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.svm import SVC

    x, y = digits_dataset(resolution)
    flat, labels = x.flatten(1).numpy(), y.numpy()
    models = [
        CalibratedClassifierCV(SVC(C=10.0, gamma="scale"), ensemble=False),
        LogisticRegression(C=1.0, max_iter=2000),
        MLPClassifier(hidden_layer_sizes=(64,), max_iter=600, random_state=0),
    ]
    for m in models:
        m.fit(flat, labels)
    return models


@lru_cache(maxsize=None)
def _real_by_class(resolution: int) -> list[torch.Tensor]:
    x, y = digits_dataset(resolution)
    return [x[y == c].flatten(1) for c in range(NUM_CLASSES)]


def gold_components(images01: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each gold term for images (B, 1, r, r) in [0, 1] (clamped here) and class ids (B,)."""
    resolution = images01.shape[-1]
    x = images01.detach().float().cpu().clamp(0, 1)
    flat = (x * 2 - 1).flatten(1)
    labels = labels.cpu()
    probs = np.mean([m.predict_proba(flat.numpy()) for m in _ensemble(resolution)], axis=0)
    logp = torch.from_numpy(np.log(np.clip(probs[np.arange(len(labels)), labels.numpy()], 1e-6, 1.0))).float()
    ink = x.flatten(1).mean(1)
    real = _real_by_class(resolution)
    scale = (flat.shape[1] / 64) ** 0.5  # distances per 64 pixels, comparable across resolutions
    nn = torch.stack([torch.cdist(flat[i : i + 1], real[int(c)]).min() for i, c in enumerate(labels)]) / scale
    gold = WEIGHTS["logp"] * logp + WEIGHTS["ink"] * ink + WEIGHTS["nn"] * nn
    return {"gold": gold, "logp": logp, "ink": ink, "nn": nn}


def gold_score(images01: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Gold of single digits whose prompts each name one class (a grid world scores its cells with gold_components)."""
    labels = torch.tensor([parse_prompt(p) for p in prompts])
    return gold_components(images01, labels)["gold"]
