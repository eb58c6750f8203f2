"""Reward models learned from preference pairs with the Bradley–Terry loss.

P(a preferred over b) = sigmoid(r(a) - r(b)); the loss is the binary cross-entropy of that
probability against the label (1 if a was preferred, 0 if b; soft labels are allowed).
A pairs file is an .npz with images_a, images_b (N, C, H, W) float in [0, 1], prompts (N,) and
prefer_a (N,) in [0, 1].
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cmalign.errors import UserError


@dataclass
class PreferencePairs:
    images_a: torch.Tensor
    images_b: torch.Tensor
    prompts: list[str]
    prefer_a: torch.Tensor

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, idx: torch.Tensor) -> "PreferencePairs":
        return PreferencePairs(self.images_a[idx], self.images_b[idx], [self.prompts[i] for i in idx.tolist()], self.prefer_a[idx])

    def save(self, path: Path) -> None:
        np.savez_compressed(
            path, images_a=self.images_a.numpy().astype(np.float32), images_b=self.images_b.numpy().astype(np.float32),
            prompts=np.array(self.prompts), prefer_a=self.prefer_a.numpy().astype(np.float32),
        )

    @staticmethod
    def load(path: str | Path) -> "PreferencePairs":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"preference pairs file {path} does not exist")
        try:
            with np.load(path, allow_pickle=False) as data:
                missing = {"images_a", "images_b", "prompts", "prefer_a"} - set(data.files)
                if missing:
                    raise UserError(f"{path} lacks the array(s) {', '.join(sorted(missing))}")
                a, b = torch.from_numpy(data["images_a"]).float(), torch.from_numpy(data["images_b"]).float()
                prompts, pref = [str(p) for p in data["prompts"]], torch.from_numpy(data["prefer_a"]).float()
        except UserError:
            raise
        except Exception as exc:
            raise UserError(f"{path} is not a readable pairs .npz ({type(exc).__name__})") from None
        if a.dim() != 4 or a.shape != b.shape or not (len(prompts) == len(a) == len(pref)):
            raise UserError(f"{path}: images_a/images_b must be (N, C, H, W) of one shape with N prompts and N labels")
        if len(prompts) < 10:
            raise UserError(f"{path}: at least 10 pairs are needed, found {len(prompts)}")
        if not bool(torch.isfinite(pref).all()) or pref.min() < 0 or pref.max() > 1:
            raise UserError(f"{path}: prefer_a must be finite and lie in [0, 1] ({int((~torch.isfinite(pref)).sum())} non-finite)")
        if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
            raise UserError(f"{path}: images_a/images_b hold non-finite values")
        return PreferencePairs(a, b, prompts, pref)


def bt_loss(model, pairs: PreferencePairs) -> torch.Tensor:
    margin = model(pairs.images_a, pairs.prompts) - model(pairs.images_b, pairs.prompts)
    return F.binary_cross_entropy_with_logits(margin, pairs.prefer_a)


@torch.no_grad()
def pair_accuracy(model, pairs: PreferencePairs, truth: torch.Tensor | None = None) -> float:
    """How often the model prefers the image that the labels (or `truth`, 0/1) prefer."""
    margin = model(pairs.images_a, pairs.prompts) - model(pairs.images_b, pairs.prompts)
    target = (pairs.prefer_a if truth is None else truth) > 0.5
    return ((margin > 0) == target).float().mean().item()


@torch.enable_grad()
def train_bradley_terry(
    model: torch.nn.Module,
    pairs: PreferencePairs,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 128,
    max_epochs: int = 200,
    patience: int = 15,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> dict:
    """Fit `model(images, prompts) -> (N,)` by Bradley–Terry with early stopping on held-out pairs."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(pairs), generator=gen)
    n_val = max(1, int(len(pairs) * val_fraction))
    val, train = pairs.subset(perm[:n_val]), pairs.subset(perm[n_val:])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    best, best_state, since = float("inf"), copy.deepcopy(model.state_dict()), 0
    epochs = 0
    for epochs in range(1, max_epochs + 1):
        model.train()
        order = torch.randperm(len(train), generator=gen)
        for i in range(0, len(train), batch_size):
            loss = bt_loss(model, train.subset(order[i : i + batch_size]))
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            val_loss = bt_loss(model, val).item()
        if val_loss < best - 1e-4:
            best, best_state, since = val_loss, copy.deepcopy(model.state_dict()), 0
        else:
            since += 1
            if since >= patience:
                break
    model.load_state_dict(best_state)
    model.eval().requires_grad_(False)
    return {"val_bt_loss": best, "val_accuracy": pair_accuracy(model, val), "epochs": epochs, "train_pairs": len(train), "val_pairs": len(val)}
