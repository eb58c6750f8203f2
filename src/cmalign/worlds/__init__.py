"""Model worlds behind one interface (see base.World), found by name in a registry that users
extend (register_world, entry points `cmalign.worlds`, package.module:attribute)."""

from __future__ import annotations

from ..errors import UserError
from ..plugins import Registry
from .base import World, adapters_disabled


def _builtins() -> None:
    # imported on first use: the lcm world pulls in diffusers and transformers
    WORLDS.register("digits", "cmalign.worlds.digits:DigitsWorld")
    WORLDS.register("lcm", "cmalign.worlds.lcm:LCMWorld")


WORLDS = Registry("world", "cmalign.worlds", _builtins)


def register_world(name: str, cls: type[World] | None = None, *, replace: bool = False):
    """Register a World subclass under `name` (also usable as @register_world("name"))."""

    def put(c):
        if not (isinstance(c, type) and issubclass(c, World)):
            raise TypeError(f"register_world({name!r}): expected a subclass of cmalign.World, got {c!r}")
        return WORLDS.register(name, c, replace=replace)

    return put if cls is None else put(cls)


def world_class(name: str) -> type[World]:
    cls = WORLDS.get(name)
    if not (isinstance(cls, type) and issubclass(cls, World)):
        raise UserError(f"world {name!r} is {cls!r}, not a subclass of cmalign.World")
    return cls


def world_names() -> list[str]:
    return WORLDS.names()


def digits_pretrain_config(cfg):
    from .digits_pretrain import PretrainConfig

    d = cfg.digits
    overrides = {}
    if d.pretrain_teacher_steps is not None:
        overrides["teacher_steps"] = d.pretrain_teacher_steps
    if d.pretrain_distill_steps is not None:
        overrides["distill_steps"] = d.pretrain_distill_steps
    return PretrainConfig(resolution=d.resolution, model_size=d.model_size, **overrides)


def build_world(cfg, device="cpu", lora: bool = True) -> World:
    """The world named by cfg.world, sampling the chain cfg.method asks for, with a fresh
    (zero-effect) adapter, or none if lora=False."""
    from ..methods import method_class

    transition = method_class(cfg.method).transition(cfg)
    return world_class(cfg.world).from_config(cfg, device, lora=lora, transition=transition)


__all__ = ["World", "WORLDS", "adapters_disabled", "build_world", "digits_pretrain_config", "register_world",
           "world_class", "world_names"]
