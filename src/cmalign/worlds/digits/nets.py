"""Networks of the digits world: the class-conditional UNet, its LoRA adapter, and safetensors I/O."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DModel
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from cmalign.worlds.digits.data import NUM_CLASSES

# "base" is the 1.1M-parameter model of research/feasibility.md; "tiny" serves the tests.
UNET_SIZES = {
    "base": dict(block_out_channels=(32, 64, 64), norm_num_groups=8),
    "tiny": dict(block_out_channels=(8, 16, 16), norm_num_groups=4),
}
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]


def build_unet(size: str = "base", resolution: int = 8) -> UNet2DModel:
    if size not in UNET_SIZES:
        raise ValueError(f"unknown digits model size {size!r}; expected one of {sorted(UNET_SIZES)}")
    return UNet2DModel(
        sample_size=resolution,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        attention_head_dim=8,
        num_class_embeds=NUM_CLASSES + 1,  # + the null class of classifier-free guidance
        **UNET_SIZES[size],
    )


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
