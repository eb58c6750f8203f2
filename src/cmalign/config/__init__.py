"""Training configuration: `TrainConfig` (train.py) with the sections its worlds and methods own
(config_sections of their classes), presets and YAML (io.py), the field type checker (types.py) and validation (checks.py)."""

from __future__ import annotations

from cmalign.plugins import lazy_exports

_WHERE = {
    **dict.fromkeys(("DIVERGENCE_NAMES", "FLAT_ALIASES", "TrainConfig", "with_changes"), "cmalign.config.train"),
    **dict.fromkeys(("available_presets", "cli_aliases", "config_diff", "flat_items", "from_mapping", "load_preset",
                     "to_dict", "to_yaml"), "cmalign.config.io"),
    **dict.fromkeys(("validate", "MAX_BATCH"), "cmalign.config.checks"),
}
__all__ = sorted(_WHERE)

# imported on first use: the registries that sections come from import this package's submodules, and
# validation imports torch, which reading a config must not
__getattr__ = lazy_exports("cmalign.config", _WHERE)
