"""Pieces the text-to-image reward models share: each publisher's image preprocessing on tensors
(differentiable), tokenizer checks against their text towers, checkpoint reading, and the linear score
head of LAION's aesthetic predictor and ImageReward."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cmalign.errors import UserError
from cmalign.precision import WEIGHT_DTYPES

# OpenAI CLIP's normalisation, also used by open_clip ViT-H (HPSv2, PickScore) and BLIP (ImageReward)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# --- preprocessing ----------------------------------------------------------------------------------------
def _straight_through(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value` forward, the identity backward: rounding to 8 bits must not zero the reward's gradient."""
    return x + (value - x).detach()


def to_8bit(x: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] on the 8-bit grid, as the publishers' code receives them (PIL images; diffusers'
    numpy_to_pil rounds)."""
    return _straight_through(x, (x * 255).round().clamp(0, 255) / 255)


def _bicubic(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    # antialias=True is PIL's kernel (a = -0.5, support widened when shrinking), as torchvision's tensor resize
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)


_PRECISION_BITS = 22  # Pillow's Resample.c: 32 - 8 - 2 bits for 8-bit images


@functools.lru_cache(maxsize=64)
def pil_bicubic_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's bicubic resampling of one axis as an (out, in) matrix: its float coefficients and the
    fixed-point integers it actually applies to 8-bit images (precompute_coeffs, normalize_coeffs_8bpc)."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale  # the bicubic filter's support is 2
    weights = np.zeros((out_size, in_size))
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin, xmax = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), in_size)
        t = np.abs((np.arange(xmin, xmax) - center + 0.5) / filterscale)
        a = -0.5
        w = np.where(t < 1, ((a + 2) * t - (a + 3)) * t * t + 1, np.where(t < 2, (((t - 5) * t + 8) * t - 4) * a, 0.0))
        if w.sum() != 0:
            w = w / w.sum()
        weights[xx, xmin:xmax] = w
    fixed = np.trunc(weights * (1 << _PRECISION_BITS) + np.where(weights < 0, -0.5, 0.5))
    return weights, fixed


def _pil_pass(x: torch.Tensor, out_size: int, dim: int) -> torch.Tensor:
    """One Pillow pass along `dim` (-1: horizontal, -2: vertical) of an image on the 8-bit grid: the exact
    8-bit result forward (integer sums in float64, Pillow's rounding and clip), the float kernel backward."""
    weights, fixed = pil_bicubic_weights(x.shape[dim], out_size)
    w = torch.from_numpy(weights).to(device=x.device, dtype=x.dtype)
    k = torch.from_numpy(fixed).to(device=x.device, dtype=torch.float64)
    if dim == -1:
        smooth = x @ w.T
        acc = (x.detach().double() * 255).round() @ k.T
    else:
        smooth = w @ x
        acc = k @ (x.detach().double() * 255).round()
    exact = torch.floor((acc + (1 << (_PRECISION_BITS - 1))) / (1 << _PRECISION_BITS)).clamp(0, 255) / 255
    return _straight_through(smooth, exact.to(x.dtype))


def resize_like_pil(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pillow's Image.resize(BICUBIC) of an 8-bit image, bit for bit: a horizontal pass, then a vertical
    one, each rounded and clipped to 8 bits (differentiable through the float kernel)."""
    if width != x.shape[-1]:
        x = _pil_pass(x, width, -1)
    if height != x.shape[-2]:
        x = _pil_pass(x, height, -2)
    return x


@dataclass(frozen=True)
class Preprocess:
    """One publisher's image preprocessing, tensor side.

    fit "crop": the shorter side to `size` (the longer to int(size * long / short), truncated as
    torchvision and transformers do), then a `size` square from the centre, its offset floor((H - size) / 2)
    as transformers' CLIPImageProcessor crops ("floor") or round((H - size) / 2) as torchvision's CenterCrop
    ("round"). fit "pad": the longer side to `size` (round(side * scale)), then zero padding (black, before
    normalisation) to a square, left/top getting the floor half, as HPSv2's ResizeMaxSize.
    resampler "pil": PIL's 8-bit resampling (publishers that resize a PIL image); "tensor": one float
    pass (torchvision's resize of a float tensor, HPSv2 resizes after ToTensor). Input is put on the
    8-bit grid first (the publishers read 8-bit images); every rounding is straight-through.
    """

    size: int
    fit: str = "crop"
    crop_offset: str = "floor"
    resampler: str = "pil"
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def geometry(self, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
        """(resized height, width) and (top, bottom, left, right): crop offsets (>= 0) or pads (<= 0)."""
        size = self.size
        if self.fit == "crop":
            short, long = min(height, width), max(height, width)
            new_long = int(size * long / short)
            new = (size, new_long) if height <= width else (new_long, size)
            offset = (lambda d: d // 2) if self.crop_offset == "floor" else (lambda d: int(round(d / 2.0)))
            top, left = offset(new[0] - size), offset(new[1] - size)
            return new, (top, new[0] - size - top, left, new[1] - size - left)
        scale = size / float(max(height, width))
        new = (height, width) if scale == 1.0 else (round(height * scale), round(width * scale))
        pad_h, pad_w = size - new[0], size - new[1]
        return new, (-(pad_h // 2), -(pad_h - pad_h // 2), -(pad_w // 2), -(pad_w - pad_w // 2))

    def __call__(self, images01: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Images in [0, 1] (B, 3 or 1, H, W) -> the normalised (B, 3, size, size) input of the vision tower."""
        if images01.ndim != 4 or images01.shape[1] not in (1, 3):
            raise UserError(f"reward images must be (B, 3, H, W) (or one channel), got shape {tuple(images01.shape)}")
        x = to_8bit(images01.float())
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # PIL's convert("RGB") of a grey image
        (new_h, new_w), (top, bottom, left, right) = self.geometry(*x.shape[-2:])
        if (new_h, new_w) != tuple(x.shape[-2:]):
            x = resize_like_pil(x, new_h, new_w) if self.resampler == "pil" else _bicubic(x, (new_h, new_w))
        if self.fit == "crop":
            x = x[..., top : new_h - bottom, left : new_w - right]
        elif top or bottom or left or right:
            # The publisher pads only when it resizes; a non-square image whose longer side is already
            # `size` would not fit its ViT, so it is padded here too.
            x = F.pad(x, (-left, -right, -top, -bottom), value=0.0)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return ((x - mean) / std).to(dtype)


def clip_processor(size: int) -> Preprocess:
    """transformers' CLIPImageProcessor (PickScore's published inference, DDPO's aesthetic scorer, CLIP score)."""
    return Preprocess(size, "crop", "floor", "pil")


def torchvision_pil(size: int) -> Preprocess:
    """torchvision Resize(size, BICUBIC) + CenterCrop(size) on a PIL image (ImageReward, OpenAI CLIP)."""
    return Preprocess(size, "crop", "round", "pil")


def hps_processor(size: int) -> Preprocess:
    """HPSv2's preprocess_val: ToTensor, ResizeMaxSize(size, fill=0), Normalize."""
    return Preprocess(size, "pad", resampler="tensor")


# --- tokenizers -------------------------------------------------------------------------------------------
def check_tokenizer(tokenizer, rows: int, *, reward: str, source: str, fix: str,
                    special: dict[str, int | None]) -> None:
    """Refuse a tokenizer that does not fit its text tower. transformers builds a tokenizer of only its
    special tokens from a folder with no vocabulary files, and raises nothing: every prompt then
    encodes the same. `rows`: the embedding rows the tokenizer must fill exactly; `special`: token
    name -> the id the checkpoint expects (None: only required to exist)."""
    problems = []
    if len(tokenizer) != rows:
        problems.append(f"{len(tokenizer)} tokens, the text tower has {rows} embedding rows")
    for name, expected in special.items():
        got = getattr(tokenizer, f"{name}_token_id", None)
        if got is None or not 0 <= got < rows or (expected is not None and got != expected):
            problems.append(f"{name} token id {got}" + (f" where the checkpoint uses {expected}" if expected is not None else ""))
    if problems:
        raise UserError(f"{reward}: the tokenizer from {source} does not fit the checkpoint ({'; '.join(problems)}); {fix}")


def tokenizer_source(ref: str) -> str:
    """How to name where a tokenizer came from in a refusal: a hub id that is not cached, offline, gives
    transformers nothing but the special tokens, and that is worth saying."""
    from cmalign.hub import looks_local, offline

    if looks_local(ref) or Path(ref).expanduser().exists() or not offline():
        return str(ref)
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = any(isinstance(try_to_load_from_cache(str(ref), name), str)
                     for name in ("tokenizer.json", "vocab.json", "vocab.txt"))
    except Exception:  # noqa: BLE001  (an id the cache cannot even parse is not cached)
        cached = False
    return str(ref) if cached else f"{ref} (a hub id, not cached here, and HF_HUB_OFFLINE is set)"


# --- weights ----------------------------------------------------------------------------------------------
def reward_dtype(config) -> torch.dtype:
    """Frozen reward weights follow the training config's mixed precision (float32 without a config)."""
    return WEIGHT_DTYPES.get(getattr(config, "mixed_precision", "no"), torch.float32)


def freeze(module: torch.nn.Module, device, dtype) -> torch.nn.Module:
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors, or from a torch pickle read with weights_only=True (published
    reward checkpoints are .pt/.pth). A {"state_dict": ...} wrapper and DDP's "module." are removed."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(path)
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"{path} is not a readable tensor checkpoint ({type(exc).__name__}: {str(exc)[:160]})") from None
    if isinstance(tensors, dict) and isinstance(tensors.get("state_dict"), dict):
        tensors = tensors["state_dict"]
    if not isinstance(tensors, dict):
        raise UserError(f"{path} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in tensors.items() if isinstance(v, torch.Tensor)}


class LinearHead(torch.nn.Module):
    """The score head of LAION's improved aesthetic predictor and of ImageReward: Linear layers at
    indices layers.0, .2, .4, .6, .7 with Dropouts (inactive at inference) and no nonlinearity between."""

    def __init__(self, tensors: dict[str, torch.Tensor], prefix: str = "layers."):
        super().__init__()
        pattern = re.compile(re.escape(prefix) + r"(\d+)\.weight$")
        indices = sorted(int(m[1]) for k in tensors if (m := pattern.match(k)))
        if not indices:
            raise UserError(f"no linear layers named {prefix}N.weight in the score-head checkpoint")
        layers = []
        for i in indices:
            weight, bias = tensors[f"{prefix}{i}.weight"], tensors[f"{prefix}{i}.bias"]
            if layers and layers[-1].out_features != weight.shape[1]:
                raise UserError(f"score head: {prefix}{i} takes {weight.shape[1]} features, the layer before gives "
                                f"{layers[-1].out_features}")
            layer = torch.nn.Linear(weight.shape[1], weight.shape[0])
            layer.load_state_dict({"weight": weight.float(), "bias": bias.float()})
            layers.append(layer)
        if layers[-1].out_features != 1:
            raise UserError(f"score head ends in {layers[-1].out_features} outputs, not one score")
        self.layers = torch.nn.Sequential(*layers)

    @property
    def in_features(self) -> int:
        return self.layers[0].in_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features).squeeze(-1)


__all__ = ["CLIP_MEAN", "CLIP_STD", "LinearHead", "Preprocess", "check_tokenizer", "clip_processor", "freeze",
           "hps_processor", "load_tensors", "resize_like_pil", "reward_dtype", "to_8bit", "torchvision_pil"]
