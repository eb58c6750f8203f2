"""Model worlds behind one interface (see base.World), found by name in a registry that users
extend (register_world, entry points `cmalign.worlds`, package.module:attribute)."""

from __future__ import annotations

from cmalign.plugins import ClassRegistry
from cmalign.worlds.base import World, adapters_disabled


def _builtins() -> None:
    # imported on first use: the lcm world pulls in diffusers and transformers
    WORLDS.register("digits", "cmalign.worlds.digits.world:DigitsWorld")
    WORLDS.register("lcm", "cmalign.worlds.lcm.unet:LCMWorld")


WORLDS = ClassRegistry("world", "cmalign.worlds", _builtins, World)


def register_world(name: str, cls: type[World] | None = None, *, replace: bool = False):
    """Register a World subclass under `name` (also usable as @register_world("name"))."""
    return WORLDS.register_class(name, cls, replace=replace)


def world_class(name: str) -> type[World]:
    return WORLDS.get_class(name)


def world_names() -> list[str]:
    return WORLDS.names()


def digits_pretrain_config(cfg):
    from cmalign.worlds.digits.pretrain import PretrainConfig

    d = cfg.digits
    overrides = {}
    if d.pretrain_teacher_steps is not None:
        overrides["teacher_steps"] = d.pretrain_teacher_steps
    if d.pretrain_distill_steps is not None:
        overrides["distill_steps"] = d.pretrain_distill_steps
    if getattr(d, "grid", 1) > 1:  # compositional digits: the grid's own recipe (worlds/digits_grid.py)
        from cmalign.worlds.digits.grid import grid_pretrain_config

        return grid_pretrain_config(d.grid, d.model_size, **overrides)
    return PretrainConfig(resolution=d.resolution, model_size=d.model_size, **overrides)


def build_world(cfg, device="cpu", lora: bool = True) -> World:
    """The world named by cfg.world, sampling the chain cfg.method asks for, with a fresh
    (zero-effect) adapter, or none if lora=False."""
    from cmalign.methods import method_class

    transition = method_class(cfg.method).transition(cfg)
    return world_class(cfg.world).from_config(cfg, device, lora=lora, transition=transition)


__all__ = ["World", "WORLDS", "adapters_disabled", "build_world", "digits_pretrain_config", "register_world",
           "world_class", "world_names"]
