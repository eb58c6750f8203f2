"""The parts of a run from its config: the world sampling the chain its method asks for, and the method."""

from __future__ import annotations

from cmalign.methods.registry import method_class
from cmalign.worlds.registry import world_class


def build_world(cfg, device="cpu", lora: bool = True):
    """The world named by cfg.world, sampling the chain cfg.method asks for, with a fresh
    (zero-effect) adapter, or none if lora=False."""
    transition = method_class(cfg.method).transition(cfg)
    return world_class(cfg.world).from_config(cfg, device, lora=lora, transition=transition)


def build_method(cfg, world, reward):
    return method_class(cfg.method)(cfg, world, reward)
