"""Registries of rewards, worlds and methods that users extend.

A name resolves, in this order, to: what was registered in this process (the built-ins and
`register_*` calls), an entry point of the group `cmalign.rewards` / `cmalign.worlds` /
`cmalign.methods` of an installed package, or a `package.module:attribute` import path. Every
failure (unknown name, a module that does not import, a missing attribute) is one UserError line.
"""

from __future__ import annotations

import importlib
import inspect
from importlib import metadata
from typing import Any, Callable

from cmalign.errors import UserError


def import_object(spec: str, kind: str) -> Any:
    """The attribute named by "package.module:attribute" (dotted attributes allowed)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"{kind} {spec!r}: expected a registered name or package.module:attribute")
    try:
        obj = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure of a user's module is their bad input
        raise UserError(f"{kind} {spec!r}: cannot import {module_name} ({type(exc).__name__}: {str(exc)[:160]})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"{kind} {spec!r}: module {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


class Registry:
    """name -> object, filled by built-in modules (imported on first use), register() and entry points."""

    def __init__(self, kind: str, group: str, builtins: Callable[[], None]):
        self.kind, self.group, self._builtins = kind, group, builtins
        self._items: dict[str, Any] = {}
        self._loaded = False

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True  # first: built-in modules that register themselves re-enter register()
        self._builtins()
        for ep in metadata.entry_points(group=self.group):
            held = self._items.get(ep.name)
            if isinstance(held, _EntryPoint) and _package(held.ep) != _package(ep):
                held.others.append(ep)  # two installed packages define the name: refused when it is used
            elif ep.name not in self._items:  # a name registered in this process wins over an installed package's
                self._items[ep.name] = _EntryPoint(ep)

    def register(self, name: str, obj: Any = None, *, replace: bool = False):
        """register(name, obj), or @register(name) as a decorator."""
        if not isinstance(name, str) or not name or ":" in name:
            raise ValueError(f"a {self.kind} name must be a non-empty string without ':', got {name!r}")

        def put(o):
            self._load()
            if name in self._items and not replace and self._items[name] is not o:
                raise ValueError(f"{self.kind} {name!r} is registered already (pass replace=True to override it)")
            self._items[name] = o
            return o

        return put if obj is None else put(obj)

    def is_builtin(self, name: str) -> bool:
        """A built-in entry (a "cmalign." import path registered by the package itself)."""
        self._load()
        entry = self._items.get(name)
        where = entry if isinstance(entry, str) else entry.__module__ if isinstance(entry, type) else ""
        return where.startswith("cmalign.")

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._items or ":" in name

    def get(self, name: str) -> Any:
        self._load()
        if name in self._items:
            obj = self._items[name]
            if isinstance(obj, _EntryPoint):
                obj = self._items[name] = obj.load(self.kind)
            elif isinstance(obj, str):  # a lazily imported built-in: failing to import it is a bug, not bad input
                module_name, _, attr = obj.partition(":")
                obj = self._items[name] = getattr(importlib.import_module(module_name), attr)
            return obj
        if ":" in name:
            return import_object(name, self.kind)
        raise UserError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())} "
                        "(or package.module:attribute)")


class ClassRegistry(Registry):
    """A registry whose entries are subclasses of `base` (worlds, methods)."""

    def __init__(self, kind: str, group: str, builtins: Callable[[], None], base: str,
                 on_resolve: Callable[[type], None] = lambda cls: None):
        super().__init__(kind, group, builtins)
        self._base = base  # "module:Class", resolved on first use so that the registry module stays light
        self._on_resolve = on_resolve  # e.g. make the class's config sections known

    @property
    def base(self) -> type:
        module_name, _, attr = self._base.partition(":")
        return getattr(importlib.import_module(module_name), attr)

    def register_class(self, name: str, cls: type | None = None, *, replace: bool = False):
        """register_class(name, cls), or @register_class(name) as a decorator."""

        def put(c):
            if not (isinstance(c, type) and issubclass(c, self.base)):
                raise TypeError(f"register_{self.kind}({name!r}): expected a subclass of cmalign.{self.base.__name__}, got {c!r}")
            return self.register(name, c, replace=replace)

        return put if cls is None else put(cls)

    def get_class(self, name: str) -> type:
        cls = self.get(name)
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise UserError(f"{self.kind} {name!r} is {cls!r}, not a subclass of cmalign.{self.base.__name__}")
        self._on_resolve(cls)
        return cls


def lazy_exports(package: str, where: dict[str, str]):
    """A package's module-level __getattr__ that imports each public name from its module on first use, so that
    importing the package (and reading a config, or --help) stays light."""

    def __getattr__(name: str):
        if name in where:
            return getattr(importlib.import_module(where[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


def _package(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return f"{dist.name} {dist.version}" if dist is not None else ep.value


class _EntryPoint:
    def __init__(self, ep: metadata.EntryPoint):
        self.ep = ep
        self.others: list[metadata.EntryPoint] = []  # the same name from other installed packages

    def load(self, kind: str) -> Any:
        if self.others:
            where = ", ".join(f"{_package(e)} ({e.value})" for e in [self.ep, *self.others])
            raise UserError(f"{kind} {self.ep.name!r} is defined by several installed packages: {where}; "
                            f"uninstall one, or name the one to use by its import path (package.module:attribute)")
        try:
            return self.ep.load()
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"{kind} {self.ep.name!r} (entry point {self.ep.value}): cannot load it "
                            f"({type(exc).__name__}: {str(exc)[:160]})") from None


# --- errors raised inside plug-in code -------------------------------------------------------------
class PluginError(UserError):
    """An exception raised inside a plug-in's own code (a reward, world or method that is not cmalign's),
    as one line naming the plug-in and where; the original exception is its __cause__ (`cmalign --debug`
    prints its traceback)."""

    def __init__(self, message: str, plugin: str):
        super().__init__(message)
        self.plugin = plugin


def plugin_module(obj: Any) -> str | None:
    """The module whose code `obj` (a function, class or instance) runs, unless it is cmalign's own."""
    direct = isinstance(obj, type) or inspect.isfunction(obj) or inspect.ismethod(obj)
    module = getattr(obj, "__module__", None) if direct else type(obj).__module__
    return None if not isinstance(module, str) or module.split(".")[0] == "cmalign" else module


def blame(exc: BaseException, plugins: dict[str, str]) -> str | None:
    """The plug-in (label of `plugins`: module name -> label) whose code raised exc: the innermost frame
    of its traceback in one of those modules; None when none of them is on it (a cmalign bug stays a traceback)."""
    found = None
    tb = exc.__traceback__
    while tb is not None:
        found = plugins.get(tb.tb_frame.f_globals.get("__name__"), found)
        tb = tb.tb_next
    return found


def is_out_of_memory(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text or "not enough memory" in text))


def as_plugin_error(exc: BaseException, plugins: dict[str, str], where: str) -> PluginError | None:
    """exc, raised inside a plug-in's code, as one PluginError line (None: not a plug-in's exception)."""
    if isinstance(exc, UserError) or not isinstance(exc, Exception) or is_out_of_memory(exc):
        return None
    label = blame(exc, plugins)
    if label is None:
        return None
    text = (str(exc).strip().splitlines() or [""])[0][:200]
    return PluginError(f"{label} raised {type(exc).__name__}{': ' + text if text else ''} {where}", label)
