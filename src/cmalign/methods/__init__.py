"""Alignment methods, one per file, all rolling out through chain.run_chain; found by name in a
registry that users extend (register_method, entry points `cmalign.methods`, module:attribute)."""

from __future__ import annotations

from cmalign.plugins import ClassRegistry
from cmalign.methods.base import Batch, Method


def _builtins() -> None:
    # imported on first use ("module:Class"), so that importing one method module never imports the others
    for name, where in (("rocm", "rocm:Rocm"), ("draft", "draft:Draft"), ("rlcm", "policy_gradient:Rlcm"),
                        ("ddpo", "policy_gradient:Ddpo"), ("dpok", "policy_gradient:Dpok"), ("d3po", "d3po:D3po")):
        METHODS.register(name, f"cmalign.methods.{where}")


METHODS = ClassRegistry("method", "cmalign.methods", _builtins, Method)


def register_method(name: str, cls: type[Method] | None = None, *, replace: bool = False):
    """Register a Method subclass under `name` (also usable as @register_method("name"))."""
    return METHODS.register_class(name, cls, replace=replace)


def method_class(name: str) -> type[Method]:
    return METHODS.get_class(name)


def method_names() -> list[str]:
    return METHODS.names()


def build_method(cfg, world, reward) -> Method:
    return method_class(cfg.method)(cfg, world, reward)


__all__ = ["Batch", "Method", "METHODS", "build_method", "method_class", "method_names", "register_method"]
