"""The lcm world: diffusers few-step models (LCM, LCM-LoRA, TCD, PixArt-LCM; SD-Turbo, SDXL-Turbo, SDXL-Lightning,
Hyper-SD, SANA-Sprint on their distilled samplers).

Modules: factory (the registered `lcm` world: picks the family's class before weights load), family (the
model's family and kind from its configs, the refusal of plain bases, the per-family defaults), config (the
`lcm` section), loading (components from a folder or hub id, LCM-LoRA), core (what the worlds share), unet
(SD-1.5 / SDXL), pixart (PixArt-LCM), sana (SANA-Sprint), lora (our adapter's export and its load-completely checks),
tcd (the TCD chain), distilled (the Euler, Euler-ancestral, DDIM-trailing and SCM chains). Nothing heavy is imported here; the public names below load on first use.
"""

from __future__ import annotations

import importlib

_LAZY = {"LCMFamilyWorld": "factory", "LCMWorld": "unet", "PixArtLCMWorld": "pixart", "SanaSprintWorld": "sana", "LCMConfig": "config",
         "family_defaults": "family", "identify": "family", "model_family": "family"}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
