"""The method registry: name -> Method subclass. Built-ins are "module:Class" strings imported on first
use, so that importing one method module never imports the others; plug-ins come from register_method,
the entry-point group `cmalign.methods` or a package.module:Class path. Resolving a class makes its
config sections known."""

from __future__ import annotations

from cmalign.config.train import add_sections
from cmalign.plugins import ClassRegistry

BUILTIN_METHODS = {"rocm": "rocm:Rocm", "draft": "draft:Draft", "rlcm": "policy_gradient:Rlcm", "ddpo": "policy_gradient:Ddpo",
                   "dpok": "policy_gradient:Dpok", "d3po": "d3po:D3po"}


def _builtins() -> None:
    for name, where in BUILTIN_METHODS.items():
        METHODS.register(name, f"cmalign.methods.{where}")


METHODS = ClassRegistry("method", "cmalign.methods", _builtins, "cmalign.methods.base:Method", on_resolve=add_sections)
register_method = METHODS.register_class  # register_method(name, cls) or @register_method(name)
method_class = METHODS.get_class
method_names = METHODS.names
