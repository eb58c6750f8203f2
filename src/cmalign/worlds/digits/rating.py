"""`rating`: a non-differentiable stand-in for human star ratings in the digits world.

rating(x, c) = 1 + #{j : proxy(x, c) > q_j(c)}, i.e. 1 to 5 stars, where q_1..q_4(c) are the 20/40/60/80 %
quantiles of the proxy's score over base-model samples of class c. It is piecewise constant in the
image (its gradient is zero almost everywhere), so it is registered with differentiable=False: rocm
trains on it with its score-function estimator (methods/hybrid.py), rlcm/ddpo/dpok/d3po as on any reward.

The thresholds are per class (a rater compares a seven with other sevens), so every prompt's base
ratings spread evenly over 1..5 (mean 3). They are fixed: computed once from SAMPLES_PER_CLASS samples
per class of the frozen base consistency model (adapter off, K = NUM_STEPS, seed SEED, the same
whichever method trains) and cached beside the proxy under a key of the base model and of the proxy's
weights, so another proxy (digits.proxy_path) gets its own thresholds.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from cmalign.cache import cache_root, manifest, publish_dir, staging_dir
from cmalign.chain import generate
from cmalign.errors import UserError
from cmalign.worlds.digits.data import NUM_CLASSES, class_prompt, parse_prompt
from cmalign.worlds.digits.proxy import PROXY_FILE, load_proxy
from cmalign.worlds.digits.rewards import consistency_world, proxy_folder
from cmalign.rewards.base import Reward, RewardContext, reward_factory

QUANTILES = (0.2, 0.4, 0.6, 0.8)
SAMPLES_PER_CLASS = 200
NUM_STEPS = 4
SEED = 30_000  # distinct from the proxy's pair seeds (0 and 10 000)
THRESHOLDS_FILE = "thresholds.json"


class StarRating(Reward):
    """1..5 stars from the proxy score and per-class thresholds (NUM_CLASSES, len(QUANTILES))."""

    name, differentiable = "rating", False

    def __init__(self, proxy: torch.nn.Module, thresholds: torch.Tensor, device=None):
        self.proxy = proxy.to(device) if device is not None else proxy
        self.thresholds = thresholds.float()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        score = self.proxy(images.float(), prompts).float()
        labels = torch.tensor([parse_prompt(p) for p in prompts])
        thr = self.thresholds[labels].to(score.device)
        return 1.0 + (score[:, None] > thr).sum(1).float()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def rating_thresholds(world, proxy_dir: str | Path, progress: bool = True) -> Path:
    """Compute (once) and cache the per-class proxy quantiles of the base model's samples."""
    proxy_dir = Path(proxy_dir)
    weights = proxy_dir / PROXY_FILE
    if not weights.is_file():
        raise UserError(f"no readable digits proxy reward model in {proxy_dir} (no {PROXY_FILE})")
    base = getattr(world, "base_manifest", {}).get("key", "untracked")
    folder = cache_root() / "digits" / f"rating-{base}-p{_sha256(weights)}-n{SAMPLES_PER_CLASS}-k{NUM_STEPS}-s{SEED}"
    if (folder / THRESHOLDS_FILE).is_file():
        return folder / THRESHOLDS_FILE
    if progress:
        print(f"cmalign: fixing the rating's star thresholds on {SAMPLES_PER_CLASS * NUM_CLASSES} base samples -> {folder}",
              flush=True)
    proxy = load_proxy(proxy_dir).to(world.device)
    prompts = [class_prompt(c) for c in range(NUM_CLASSES) for _ in range(SAMPLES_PER_CLASS)]
    images = generate(world, prompts, NUM_STEPS, torch.Generator().manual_seed(SEED), reference=True)
    with torch.no_grad():
        scores = proxy(images, prompts).float().cpu().view(NUM_CLASSES, SAMPLES_PER_CLASS)
    thresholds = torch.quantile(scores, torch.tensor(QUANTILES), dim=1).T  # (classes, quantiles)
    tmp = staging_dir(folder)
    info = manifest(kind="digits-rating", base=base, proxy=str(proxy_dir), proxy_sha256=_sha256(weights),
                    quantiles=list(QUANTILES), samples_per_class=SAMPLES_PER_CLASS, num_steps=NUM_STEPS, seed=SEED,
                    thresholds=thresholds.tolist())
    (tmp / THRESHOLDS_FILE).write_text(json.dumps(info, indent=2))
    publish_dir(tmp, folder)
    return folder / THRESHOLDS_FILE


def load_thresholds(path: Path) -> torch.Tensor:
    try:
        values = torch.tensor(json.loads(Path(path).read_text())["thresholds"], dtype=torch.float32)
    except Exception as exc:
        raise UserError(f"unreadable rating thresholds {path} ({type(exc).__name__}); delete it to rebuild") from None
    if values.shape != (NUM_CLASSES, len(QUANTILES)):
        raise UserError(f"rating thresholds {path} have shape {tuple(values.shape)}, expected ({NUM_CLASSES}, {len(QUANTILES)})")
    return values


@reward_factory(worlds=("digits",), differentiable=False)
def rating_reward(ctx: RewardContext) -> Reward:
    """The proxy quantised to 1..5 stars (see the module docstring)."""
    if getattr(ctx.world, "grid", 1) > 1:
        raise UserError("the rating reward is defined on single 8x8 digits; a digits grid (digits.grid > 1) has no "
                        "star thresholds: train on proxy (per cell) instead")
    folder = proxy_folder(ctx)
    world = consistency_world(ctx)
    thresholds = load_thresholds(rating_thresholds(world, folder))
    return StarRating(load_proxy(folder), thresholds, ctx.device)
