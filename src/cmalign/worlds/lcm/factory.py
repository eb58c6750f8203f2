"""The `lcm` world as registered: a factory that reads which model a config names (family.py, configs
only) and builds the world of that family, never a parent class dispatching to its children.

- from_config: identify the model before any weights load, refuse one that is not a few-step model
  (family.check_distilled), then build unet.LCMWorld (SD-1.5 / SD-2.1 / SDXL), pixart.PixArtLCMWorld or
  sana.SanaSprintWorld;
- check_config: the lcm section's own ranges (no model is read);
- default_settings: the family's defaults (family.family_defaults) for the config layer to apply to the
  fields a user did not set;
- chain_transition: the chain the world will sample, built without weights (TCD with its gamma, a distilled
  sampler's ChainSpec, or None for the consistency chain), for the method and reward checks (a deterministic
  chain -- TCD gamma 0, Euler, DDIM trailing -- has no step log-probabilities).
The factory is never instantiated: its from_config returns an instance of the family's class.
"""

from __future__ import annotations

import importlib

from cmalign.worlds.base import World
from cmalign.worlds.lcm.config import LCMConfig, check_lcm_section
from cmalign.worlds.lcm.family import check_distilled, family_defaults, identify
from cmalign.worlds.lcm.tcd import chain_transition

# family -> "module:Class" of its world, imported only when that family is built
FAMILY_WORLDS = {"sd": "cmalign.worlds.lcm.unet:LCMWorld", "sdxl": "cmalign.worlds.lcm.unet:LCMWorld",
                 "pixart": "cmalign.worlds.lcm.pixart:PixArtLCMWorld", "sana": "cmalign.worlds.lcm.sana:SanaSprintWorld"}


def family_world_class(family: str) -> type:
    module_name, _, attr = FAMILY_WORLDS[family].partition(":")
    return getattr(importlib.import_module(module_name), attr)


class LCMFamilyWorld(World):
    """The lcm world: diffusers few-step models (LCM, TCD, Turbo, Lightning, Hyper-SD, SANA-Sprint), by family."""

    name = "lcm"
    config_sections = {"lcm": LCMConfig}
    grad_checkpointing_default = True

    @classmethod
    def from_config(cls, cfg, device="cpu", lora: bool = True, transition=None) -> World:
        cls.check_config(cfg)
        info = identify(cfg.lcm)  # model_index.json, the UNet / scheduler configs: no weights yet
        check_distilled(info, cfg.lcm)
        return family_world_class(info.family).from_config(cfg, device, lora=lora, transition=transition)

    @classmethod
    def check_config(cls, cfg) -> None:
        check_lcm_section(cfg.lcm)

    @classmethod
    def default_settings(cls, cfg) -> dict:
        return family_defaults(cfg.lcm)

    @classmethod
    def chain_transition(cls, cfg):
        return chain_transition(cfg.lcm)
