"""The digits proxy reward model: a small CNN fitted by Bradley–Terry to gold-labelled pairs.

Pairs are base-model samples of the same prompted class; the label is drawn from
sigmoid(gold_a - gold_b), as noisy as human raters. Because base samples stay on the digit
manifold, the proxy learns "more ink is better" and extrapolates it off the manifold: optimised
too hard, it is hacked (DESIGN §3).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from cmalign.cache import build_lock, cache_root, manifest, publish_dir, staging_dir
from cmalign.chain import generate
from cmalign.errors import UserError
from cmalign.rewards.bradley_terry import PreferencePairs, pair_accuracy, train_bradley_terry
from cmalign.worlds.digits.data import NUM_CLASSES, class_prompt, parse_prompt
from cmalign.worlds.digits.gold import gold_components

PROXY_FILE = "proxy.safetensors"


class ProxyCNN(nn.Module):
    """conv(1->w) SiLU conv(w->2w, stride 2) SiLU Linear(-> h) SiLU Linear(h -> 10); reward = output[class]."""

    def __init__(self, resolution: int = 8, width: int = 16, hidden: int = 64):
        super().__init__()
        self.config = {"resolution": resolution, "width": width, "hidden": hidden}
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Flatten(), nn.Linear(2 * width * (resolution // 2) ** 2, hidden), nn.SiLU(),
            nn.Linear(hidden, NUM_CLASSES),
        )

    def forward(self, images01: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        labels = torch.tensor([parse_prompt(p) for p in prompts], device=images01.device)
        out = self.net((images01 * 2 - 1).clamp(-1, 1))
        return out.gather(1, labels[:, None]).squeeze(1)


def make_gold_pairs(world, num_pairs: int, num_steps: int = 4, seed: int = 0) -> tuple[PreferencePairs, torch.Tensor]:
    """Base-model sample pairs of one random class each, labelled ~ Bernoulli(sigmoid(gold_a - gold_b)).

    Returns the pairs and the noiseless gold order (1 where gold_a > gold_b) for measuring accuracy.
    """
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_CLASSES, (num_pairs,), generator=gen)
    return gold_labelled_pairs(world, [class_prompt(int(c)) for c in labels], labels, num_steps, gen)


def gold_labelled_pairs(world, prompts: list[str], labels: torch.Tensor, num_steps: int, gen: torch.Generator,
                        digits=None) -> tuple[PreferencePairs, torch.Tensor]:
    """Two base-model samples of each prompt (noise from gen) cut into single digits by `digits` (default: the
    samples themselves; the grid world cuts its cells), the first len(labels) of them paired and labelled ~
    Bernoulli(sigmoid(gold_a - gold_b)) of their classes `labels`. Returns the pairs and the noiseless gold order."""
    images = generate(world, prompts + prompts, num_steps, gen, reference=True).cpu()
    a, b = images[: len(prompts)], images[len(prompts) :]
    if digits is not None:
        a, b = digits(a), digits(b)
    a, b = a[: len(labels)], b[: len(labels)]
    ga, gb = gold_components(a, labels)["gold"], gold_components(b, labels)["gold"]
    prefer_a = torch.bernoulli(torch.sigmoid(ga - gb), generator=gen)
    return PreferencePairs(a, b, [class_prompt(int(c)) for c in labels], prefer_a), (ga > gb).float()


def fit_proxy(pairs: PreferencePairs, resolution: int, seed: int = 0) -> tuple[ProxyCNN, dict]:
    torch.manual_seed(seed)
    model = ProxyCNN(resolution)
    stats = train_bradley_terry(model, pairs, seed=seed)
    return model, stats


def save_proxy(model: ProxyCNN, folder: Path, info: dict) -> None:
    save_file(model.state_dict(), str(folder / PROXY_FILE))
    (folder / "manifest.json").write_text(json.dumps(manifest(kind="digits-proxy", model=model.config, **info), indent=2))


def load_proxy(folder: str | Path) -> ProxyCNN:
    """The 8x8 (or 16x16) ProxyCNN in `folder`; a grid world applies an 8x8 one to each cell (image_reward)."""
    folder = Path(folder)
    try:
        info = json.loads((folder / "manifest.json").read_text())
        model = ProxyCNN(**info["model"])
        model.load_state_dict(load_file(str(folder / PROXY_FILE)))
    except Exception as exc:
        raise UserError(f"no readable digits proxy reward model in {folder} ({type(exc).__name__})") from None
    return model.eval().requires_grad_(False)


def build_default_proxy(world, num_pairs: int, seed: int = 0, num_steps: int = 4, progress: bool = True) -> Path:
    """Train (once) and cache the proxy for this base model: num_pairs training pairs plus 500
    held-out pairs for reporting its agreement with the noisy labels and with the gold order
    (the world fits it: world.build_proxy)."""
    key = getattr(world, "base_manifest", {}).get("key", "untracked")
    folder = cache_root() / "digits" / f"proxy-{key}-n{num_pairs}-k{num_steps}-s{seed}"
    if folder.exists():
        return folder
    with build_lock(folder):  # parallel workers: one trains it, the others wait and reuse it
        if not folder.exists():
            world.build_proxy(folder, num_pairs, seed, num_steps, progress,
                              {"base": key, "num_pairs": num_pairs, "seed": seed, "num_steps": num_steps})
    return folder


def fit_and_publish(folder: Path, make_pairs, resolution: int, num_pairs: int, seed: int, info: dict) -> None:
    """Fit a proxy on make_pairs(num_pairs, seed), report it on 500 held-out pairs (agreement with the noisy
    labels and with the gold order) and publish it with its manifest into `folder`."""
    start = time.time()
    pairs, _ = make_pairs(num_pairs, seed)
    test, test_truth = make_pairs(500, seed + 10_000)
    model, stats = fit_proxy(pairs, resolution, seed)
    stats.update(
        test_accuracy_noisy_labels=pair_accuracy(model, test),
        test_accuracy_gold_order=pair_accuracy(model, test, test_truth),
        label_agreement_with_gold=((test.prefer_a > 0.5).float() == test_truth).float().mean().item(),
        seconds=round(time.time() - start, 1),
    )
    tmp = staging_dir(folder)
    save_proxy(model, tmp, {**info, "stats": stats})
    publish_dir(tmp, folder)
