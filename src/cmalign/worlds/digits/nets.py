"""Networks of the digits worlds: the class-conditional UNet, the grid's per-cell conditioned one, the LoRA
adapter, and safetensors I/O."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DModel
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from cmalign.worlds.digits.cells import CELL
from cmalign.worlds.digits.data import NUM_CLASSES

# "base" is the 1.1M-parameter model of research/feasibility.md; "tiny" serves the tests.
UNET_SIZES = {
    "base": dict(block_out_channels=(32, 64, 64), norm_num_groups=8),
    "tiny": dict(block_out_channels=(8, 16, 16), norm_num_groups=4),
}
EMBED_CHANNELS = 8  # E: channels of the grid's class-embedding map
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]


def _unet(size: str, sample_size: int, in_channels: int, **extra) -> UNet2DModel:
    """The digits worlds' UNet2DModel family: three blocks (the last with attention), one output channel."""
    if size not in UNET_SIZES:
        raise ValueError(f"unknown digits model size {size!r}; expected one of {sorted(UNET_SIZES)}")
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=1,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        attention_head_dim=8,
        **extra,
        **UNET_SIZES[size],
    )


def build_unet(size: str = "base", resolution: int = 8) -> UNet2DModel:
    """The class-conditional UNet of the plain digits (one class embedding per image)."""
    return _unet(size, resolution, 1, num_class_embeds=NUM_CLASSES + 1)  # + the null class of classifier-free guidance


class GridUNet(torch.nn.Module):
    """The N x N grid's network: UNet2DModel at side 8n whose input is the noisy image plus a per-cell
    class-embedding map (every pixel of cell k carries the learned embedding of cell k's class; 11 embeddings:
    ten classes + the null class of guidance). Called like the 8x8 model: net(x, t, class_labels=(B, n²)).sample."""

    def __init__(self, n: int, size: str = "base", embed_channels: int = EMBED_CHANNELS):
        super().__init__()
        self.n = n
        self.class_embedding = torch.nn.Embedding(NUM_CLASSES + 1, embed_channels)  # + the null class
        self.unet = _unet(size, n * CELL, 1 + embed_channels)

    def class_map(self, labels: torch.Tensor) -> torch.Tensor:
        """(B, n²) -> (B, E, 8n, 8n): each cell's pixels carry its class's embedding."""
        b, n = labels.shape[0], self.n
        e = self.class_embedding(labels.view(b, n * n))  # (B, n², E)
        e = e.transpose(1, 2).reshape(b, -1, n, n)
        return e.repeat_interleave(CELL, 2).repeat_interleave(CELL, 3)

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor):
        cond = self.class_map(class_labels).to(x.dtype)
        return self.unet(torch.cat([x, cond], 1), t)


def add_lora(unet: torch.nn.Module, rank: int, alpha: float, targets: list[str] | None = None, init: str | bool = True):
    """Inject a LoRA adapter with peft (UNet2DModel has no PeftAdapterMixin); freeze the base."""
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets or LORA_TARGETS, init_lora_weights=init)
    unet.requires_grad_(False)
    inject_adapter_in_model(config, unet)
    for name, p in unet.named_parameters():
        p.requires_grad_("lora_" in name)
    return config


def save_weights(module: torch.nn.Module, path: Path, dtype: torch.dtype | None = None, metadata: dict | None = None) -> None:
    state = {k: (v.to(dtype) if dtype else v).contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(path), metadata={k: str(v) for k, v in (metadata or {}).items()})


def load_weights(module: torch.nn.Module, path: Path) -> None:
    state = load_file(str(path))
    own = module.state_dict()
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)


def save_adapter(unet: torch.nn.Module, path: Path) -> None:
    save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(unet).items()}, str(path))


def load_adapter(unet: torch.nn.Module, path: Path) -> None:
    result = set_peft_model_state_dict(unet, load_file(str(path)))
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"adapter file {path} holds keys this model does not have: {result.unexpected_keys[:3]}")
