"""Model worlds behind one interface (see base.World)."""

from __future__ import annotations

from .base import World, adapters_disabled


def digits_pretrain_config(cfg):
    from .digits_pretrain import PretrainConfig

    overrides = {}
    if cfg.pretrain_teacher_steps is not None:
        overrides["teacher_steps"] = cfg.pretrain_teacher_steps
    if cfg.pretrain_distill_steps is not None:
        overrides["distill_steps"] = cfg.pretrain_distill_steps
    return PretrainConfig(resolution=cfg.digits_resolution, model_size=cfg.digits_model_size, **overrides)


def build_world(cfg, device="cpu", lora: bool = True) -> World:
    """The world named by cfg.world with a fresh (zero-effect) adapter, or none if lora=False."""
    rank = cfg.lora_rank if lora else None
    if cfg.world == "digits":
        from .digits import DigitsWorld

        if getattr(cfg, "method", None) == "ddpo":
            # DDPO: the DDPM teacher (v-prediction, cosine) with a LoRA, sampled by DDIM(eta).
            from ..chain import DDIMTransition

            world = DigitsWorld.from_pretrained(digits_pretrain_config(cfg), device, which="teacher",
                                                lora_rank=rank, lora_alpha=cfg.lora_alpha)
            world.transition = DDIMTransition(eta=cfg.ddim_eta)
            return world
        return DigitsWorld.from_pretrained(digits_pretrain_config(cfg), device, lora_rank=rank, lora_alpha=cfg.lora_alpha)
    if cfg.world == "lcm":
        from .lcm import LCMWorld

        if getattr(cfg, "method", None) == "ddpo":
            from ..errors import UserError

            raise UserError("ddpo needs a diffusion model's DDIM chain; it is implemented for the digits world's teacher only")

        return LCMWorld.from_config(cfg, device, lora=lora)
    raise ValueError(f"unknown world {cfg.world!r}")


__all__ = ["World", "adapters_disabled", "build_world", "digits_pretrain_config"]
