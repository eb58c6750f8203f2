"""Alignment methods, one per file, all rolling out through chain.run_chain; found by name in the
registry (registry.py) that users extend."""

from __future__ import annotations

from cmalign.plugins import lazy_exports

# the public names, imported on first use so that `import cmalign.methods` (and config reading) stays light
_WHERE = {"Batch": "cmalign.methods.base", "Method": "cmalign.methods.base",
          "METHODS": "cmalign.methods.registry", "register_method": "cmalign.methods.registry",
          "method_class": "cmalign.methods.registry", "method_names": "cmalign.methods.registry"}
__all__ = sorted(_WHERE)

__getattr__ = lazy_exports("cmalign.methods", _WHERE)
