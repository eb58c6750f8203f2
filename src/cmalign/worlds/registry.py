"""The world registry: name -> World subclass. Built-ins are "module:Class" strings imported on first
use (the lcm world pulls in diffusers and transformers); plug-ins come from register_world, the
entry-point group `cmalign.worlds` or a package.module:Class path."""

from __future__ import annotations

from cmalign.config.train import add_sections
from cmalign.plugins import ClassRegistry


def _builtins() -> None:
    WORLDS.register("digits", "cmalign.worlds.digits.world:DigitsWorld")
    WORLDS.register("lcm", "cmalign.worlds.lcm.factory:LCMFamilyWorld")


WORLDS = ClassRegistry("world", "cmalign.worlds", _builtins, "cmalign.worlds.base:World")


def register_world(name: str, cls=None, *, replace: bool = False):
    """Register a World subclass under `name` (also usable as @register_world("name"))."""
    return WORLDS.register_class(name, cls, replace=replace)


def world_class(name: str) -> type:
    """The class registered as name; its config sections become known."""
    cls = WORLDS.get_class(name)
    add_sections(cls)
    return cls


def world_names() -> list[str]:
    return WORLDS.names()
