"""Model worlds behind one interface (base.World): one package per world (digits/, lcm/), found by
name in the registry (registry.py) that users extend."""

from __future__ import annotations

from cmalign.plugins import lazy_exports

# the public names, imported on first use so that `import cmalign.worlds` (and config reading) stays light
_WHERE = {"World": "cmalign.worlds.base", "adapters_disabled": "cmalign.worlds.base",
          "WORLDS": "cmalign.worlds.registry", "register_world": "cmalign.worlds.registry",
          "world_class": "cmalign.worlds.registry", "world_names": "cmalign.worlds.registry"}
__all__ = sorted(_WHERE)

__getattr__ = lazy_exports("cmalign.worlds", _WHERE)
