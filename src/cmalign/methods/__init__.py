"""Alignment methods, one per file, all rolling out through chain.run_chain; found by name in a
registry that users extend (register_method, entry points `cmalign.methods`, module:attribute)."""

from __future__ import annotations

from ..errors import UserError
from ..plugins import Registry
from .base import Batch, Method


def _builtins() -> None:
    # imported on first use ("module:Class"), so that importing one method module never imports the others
    for name, where in (("rocm", "rocm:Rocm"), ("draft", "draft:Draft"), ("rlcm", "policy_gradient:Rlcm"),
                        ("ddpo", "policy_gradient:Ddpo"), ("dpok", "policy_gradient:Dpok"), ("d3po", "d3po:D3po")):
        METHODS.register(name, f"cmalign.methods.{where}")


METHODS = Registry("method", "cmalign.methods", _builtins)


def register_method(name: str, cls: type[Method] | None = None, *, replace: bool = False):
    """Register a Method subclass under `name` (also usable as @register_method("name"))."""

    def put(c):
        if not (isinstance(c, type) and issubclass(c, Method)):
            raise TypeError(f"register_method({name!r}): expected a subclass of cmalign.Method, got {c!r}")
        return METHODS.register(name, c, replace=replace)

    return put if cls is None else put(cls)


def method_class(name: str) -> type[Method]:
    cls = METHODS.get(name)
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise UserError(f"method {name!r} is {cls!r}, not a subclass of cmalign.Method")
    return cls


def method_names() -> list[str]:
    return METHODS.names()


def build_method(cfg, world, reward) -> Method:
    return method_class(cfg.method)(cfg, world, reward)


__all__ = ["Batch", "Method", "METHODS", "build_method", "method_class", "method_names", "register_method"]
