"""Alignment methods, one per file, all rolling out through chain.run_chain.

A method offers `step(prompts, generator, optimizer_step) -> (metrics, images)`: it draws its own
rollouts for the prompts and calls `optimizer_step(loss)` (zero_grad, backward, clip, step; returns
the gradient norm) once per update it makes.
"""

from __future__ import annotations

METHOD_NAMES = ("rocm", "rlcm", "ddpo", "draft", "dpok", "d3po")


def build_method(cfg, world, reward):
    if cfg.method == "rocm":
        from .rocm import Rocm

        return Rocm(cfg, world, reward)
    if cfg.method == "draft":
        from .draft import Draft

        return Draft(cfg, world, reward)
    if cfg.method in ("rlcm", "ddpo", "dpok"):
        from .policy_gradient import Ddpo, Dpok, Rlcm

        return {"rlcm": Rlcm, "ddpo": Ddpo, "dpok": Dpok}[cfg.method](cfg, world, reward)
    if cfg.method == "d3po":
        from .d3po import D3po

        return D3po(cfg, world, reward)
    raise ValueError(f"unknown method {cfg.method!r}")
