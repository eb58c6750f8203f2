"""The registered `digits` world: one name for the plain digits and the N x N grids. digits.grid picks the
class (DigitsWorld for 1, GridDigitsWorld otherwise); everything that depends on it is a method of those."""

from __future__ import annotations

from cmalign.worlds.base import World
from cmalign.worlds.digits.grid import GridDigitsWorld
from cmalign.worlds.digits.pretrain import PretrainConfig
from cmalign.worlds.digits.world import DigitsWorld


def digits_world_class(grid: int) -> type[DigitsWorld]:
    """The world class of an N x N grid of digits (1: the plain digits)."""
    return DigitsWorld if grid == 1 else GridDigitsWorld


def pretrain_config_for(cfg) -> PretrainConfig:
    """The base-model recipe a TrainConfig's digits section asks for (the grid's own for N > 1)."""
    return digits_world_class(cfg.digits.grid).pretrain_config(cfg)


class Digits(World):
    """What the world registry holds under `digits`: it checks, prepares and builds the world class that the
    config's digits.grid names (never instantiated itself)."""

    name = "digits"
    config_sections = DigitsWorld.config_sections

    @classmethod
    def from_config(cls, cfg, device="cpu", lora: bool = True, transition=None) -> DigitsWorld:
        return digits_world_class(cfg.digits.grid).from_config(cfg, device, lora=lora, transition=transition)

    @classmethod
    def check_config(cls, cfg) -> None:
        digits_world_class(cfg.digits.grid).check_config(cfg)

    @classmethod
    def default_settings(cls, cfg) -> dict:
        return digits_world_class(cfg.digits.grid).default_settings(cfg)

    @classmethod
    def chain_transition(cls, cfg):
        return digits_world_class(cfg.digits.grid).chain_transition(cfg)

    @classmethod
    def prepare(cls, cfg, progress: bool = True) -> None:
        digits_world_class(cfg.digits.grid).prepare(cfg, progress)
