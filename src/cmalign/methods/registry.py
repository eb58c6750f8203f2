"""The method registry: name -> Method subclass. Built-ins are "module:Class" strings imported on first
use, so that importing one method module never imports the others; plug-ins come from register_method,
the entry-point group `cmalign.methods` or a package.module:Class path."""

from __future__ import annotations

from cmalign.config.train import add_sections
from cmalign.plugins import ClassRegistry


def _builtins() -> None:
    for name, where in (("rocm", "rocm:Rocm"), ("draft", "draft:Draft"), ("rlcm", "policy_gradient:Rlcm"),
                        ("ddpo", "policy_gradient:Ddpo"), ("dpok", "policy_gradient:Dpok"), ("d3po", "d3po:D3po")):
        METHODS.register(name, f"cmalign.methods.{where}")


METHODS = ClassRegistry("method", "cmalign.methods", _builtins, "cmalign.methods.base:Method")


def register_method(name: str, cls=None, *, replace: bool = False):
    """Register a Method subclass under `name` (also usable as @register_method("name"))."""
    return METHODS.register_class(name, cls, replace=replace)


def method_class(name: str) -> type:
    """The class registered as name; its config sections become known."""
    cls = METHODS.get_class(name)
    add_sections(cls)
    return cls


def method_names() -> list[str]:
    return METHODS.names()
