"""Alignment objectives, one per file, all rolling out through chain.run_chain."""

from __future__ import annotations

METHOD_NAMES = ("rocm",)


def build_method(cfg, world, reward):
    if cfg.method == "rocm":
        from .rocm import Rocm

        return Rocm(cfg, world, reward)
    raise ValueError(f"unknown method {cfg.method!r}")
