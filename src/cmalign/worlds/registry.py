"""The world registry: name -> World subclass. Built-ins are "module:Class" strings imported on first
use (the lcm world pulls in diffusers and transformers); plug-ins come from register_world, the
entry-point group `cmalign.worlds` or a package.module:Class path. Resolving a class makes its config
sections known."""

from __future__ import annotations

from cmalign.config.train import add_sections
from cmalign.plugins import ClassRegistry

BUILTIN_WORLDS = {"digits": "cmalign.worlds.digits.factory:Digits", "lcm": "cmalign.worlds.lcm.factory:LCMFamilyWorld"}


def _builtins() -> None:
    for name, where in BUILTIN_WORLDS.items():
        WORLDS.register(name, where)


WORLDS = ClassRegistry("world", "cmalign.worlds", _builtins, "cmalign.worlds.base:World", on_resolve=add_sections)
register_world = WORLDS.register_class  # register_world(name, cls) or @register_world(name)
world_class = WORLDS.get_class
world_names = WORLDS.names
