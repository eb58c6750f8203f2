"""The independent digit classifier (class accuracy): the shipped weights are the ones their manifest
describes, and without them the classifier is trained once into the cache and reused."""

import json

import pytest
import torch

from cmalign.worlds.digits import classifier as dc


@pytest.mark.parametrize("resolution", [8, 16])
def test_shipped_classifier_scores_its_recorded_held_out_accuracy(monkeypatch, tmp_path, resolution):
    monkeypatch.setenv("CMALIGN_CACHE", str(tmp_path / "empty-cache"))
    shipped = dc.shipped_classifier(resolution)
    assert shipped is not None, f"no shipped classifier for {resolution}x{resolution}"
    monkeypatch.setattr(dc, "train_classifier", lambda *a, **k: pytest.fail("trained instead of loading the shipped one"))
    model = dc.load_classifier(resolution)
    info = json.loads((shipped / "manifest.json").read_text())
    assert info["kind"] == "digits-classifier" and info["resolution"] == resolution and info["held_out"] == dc.HELD_OUT
    _, (x_te, y_te) = dc.split(resolution, torch.Generator().manual_seed(0))  # train_classifier's split (seed 0)
    assert dc.held_out_accuracy(model, x_te, y_te) == info["held_out_accuracy"] > 0.95
    assert not (tmp_path / "empty-cache").exists()  # nothing written: the package's copy was used


def test_without_a_shipped_copy_it_is_trained_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("CMALIGN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(dc, "shipped_classifier", lambda resolution: None)
    real = dc.train_classifier
    calls = []
    monkeypatch.setattr(dc, "train_classifier", lambda resolution: calls.append(resolution) or real(resolution, steps=3))
    dc.load_classifier(8)
    folder = tmp_path / "cache" / "digits" / dc.classifier_key(8)
    info = json.loads((folder / "manifest.json").read_text())
    assert calls == [8] and info["resolution"] == 8 and 0 <= info["held_out_accuracy"] <= 1
    dc.load_classifier(8)  # the cached copy, not a second training
    assert calls == [8]
