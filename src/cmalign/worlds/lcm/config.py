"""Settings of the lcm world: the `lcm` config section (`--lcm.FIELD`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from cmalign.errors import UserError

CHAINS = ("lcm", "tcd", "euler", "euler_ancestral", "ddim_trailing", "scm")  # lcm.scheduler's values
EXPORT_FORMAT_NAMES = ("diffusers", "peft", "kohya")  # which family writes which: lora.EXPORT_FORMATS


@dataclass
class LCMConfig:
    """The lcm world: diffusers latent consistency models."""

    model: str = "SimianLuo/LCM_Dreamshaper_v7"
    """Hub id or local folder of a diffusers latent consistency model (or an SD-1.5 base with lora)."""
    lora: str | None = None
    """Hub id or folder of an LCM-LoRA (e.g. latent-consistency/lcm-lora-sdv1-5) applied to the model."""
    lora_mode: Literal["fuse", "stack"] = "fuse"
    """fuse the LCM-LoRA into the base weights, or stack it under the trained adapter."""
    guidance_scale: float = 8.0
    """LCM guidance-embedding scale w (the pipeline embeds w - 1)."""
    resolution: int = 512
    """Image side in pixels."""
    lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    """Module names the trained LoRA adapter attaches to (attention projections by default)."""
    heldout_fraction: float = 0.2
    """Share of prompts held out from training for evaluation."""
    unet: str | None = None
    """Hub id or folder of a UNet replacing the model's own (e.g. latent-consistency/lcm-sdxl on SDXL base), or a bare
    UNet state dict (.safetensors: a local file or owner/repo/FILE, e.g. SDXL-Lightning's 4-step UNet), loaded into the
    model's own UNet config."""
    lora_weight_name: str | None = None
    """File inside the lora repo/folder when it holds several (e.g. Hyper-SDXL-1step-lora.safetensors)."""
    scheduler: Literal["lcm", "tcd", "euler", "euler_ancestral", "ddim_trailing", "scm"] = "lcm"
    """Chain family: lcm (LCMScheduler), tcd (TCDScheduler, stochasticity tcd_gamma), euler (EulerDiscreteScheduler,
    trailing; SD-Turbo, SDXL-Lightning), euler_ancestral (SDXL-Turbo), ddim_trailing (DDIM eta 0; Hyper-SD), scm
    (SANA-Sprint)."""
    tcd_gamma: float = 0.3
    """TCD's gamma (the pipeline's eta) in [0, 1]: 0 deterministic, 1 the consistency chain's noise."""
    vae_checkpointing: bool = False
    """Recompute the VAE decoder in the backward pass (saves most decoder memory at 1024 px)."""
    allow_non_distilled: bool = False
    """Run a plain (not few-step distilled) SD-1.5 / SDXL / PixArt-alpha base on purpose (research); refused otherwise."""
    export_formats: list[str] = field(default_factory=list)
    """Extra LoRA formats a run writes into adapter/ at its end (`--export-formats diffusers,kohya`): kohya ->
    adapter/lora_kohya.safetensors for ComfyUI / A1111 (SD-1.5 / SDXL); diffusers and peft are always written."""

    def __post_init__(self):
        # "none" / "null" on the command line or in YAML clear an optional hub id or path
        for name in ("lora", "unet", "lora_weight_name"):
            value = getattr(self, name)
            if isinstance(value, str) and value.strip().lower() in ("", "none", "null"):
                setattr(self, name, None)
        if isinstance(self.export_formats, (list, tuple)):  # "diffusers,kohya" as one value or several
            self.export_formats = [f.strip() for v in self.export_formats for f in str(v).split(",") if f.strip()]

    def check(self) -> None:
        """Refuse (one line) values that no lcm model can run; reads no model."""
        if not (self.resolution >= 8 and self.resolution % 8 == 0):
            raise UserError(f"lcm.resolution must be a positive multiple of 8, got {self.resolution}")
        if not 0 <= self.heldout_fraction < 1:
            raise UserError(f"lcm.heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        if not self.lora_targets:
            raise UserError("lcm.lora_targets is empty")
        if not 0.0 <= self.tcd_gamma <= 1.0:
            raise UserError(f"lcm.tcd_gamma must be in [0, 1], got {self.tcd_gamma}")
        if self.lora_mode not in ("fuse", "stack"):
            raise UserError(f"lcm.lora_mode must be fuse or stack, got {self.lora_mode!r}")
        if self.scheduler not in CHAINS:
            raise UserError(f"lcm.scheduler must be one of {', '.join(CHAINS)}, got {self.scheduler!r}")
        unknown = [f for f in self.export_formats if f not in EXPORT_FORMAT_NAMES]
        if unknown:
            raise UserError(f"lcm.export_formats: unknown format {unknown[0]!r}; expected {', '.join(EXPORT_FORMAT_NAMES)}")


def check_lcm_section(lcm: LCMConfig) -> None:
    """The section's own check, for worlds built without config.validate (from_config called directly)."""
    lcm.check()
