"""Configs in and out: presets and YAML files (safe_load), {field: value} mappings, the flat
spellings of earlier releases, and the stored form of a run's config.yaml."""

from __future__ import annotations

import dataclasses
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from cmalign.config.train import FLAT_ALIASES, TrainConfig, add_sections, common_field_names, deprecated_name, with_changes
from cmalign.config.types import checked
from cmalign.errors import UserError
from cmalign.methods.registry import METHODS
from cmalign.worlds.registry import WORLDS


def _preset_text(name: str) -> str:
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UserError(f"config file {name} does not exist")
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"config file {name} is unreadable ({type(exc).__name__})") from None
    ref = resources.files("cmalign") / "presets" / f"{name}.yaml"
    if not ref.is_file():
        raise UserError(f"unknown preset {name!r}; available: {', '.join(available_presets())}")
    return ref.read_text(encoding="utf-8")


def available_presets() -> list[str]:
    folder = resources.files("cmalign") / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def add_owner_sections(world: Any, method: Any) -> None:
    """The sections of the world and method a config names, where they are plug-ins (built-ins are known);
    a name that resolves to nothing is left for validation to refuse."""
    for registry, name in ((WORLDS, world), (METHODS, method)):
        # built-in sections are known without importing their owners (the lcm world imports diffusers)
        if isinstance(name, str) and name in registry and not registry.is_builtin(name):
            add_sections(registry.get_class(name))


def _flatten(values: dict[str, Any], sections: dict, source: str) -> tuple[dict[str, Any], list[str]]:
    """{"ppo": {"epochs": 1}, "digits_resolution": 16, "beta": 2} -> {"ppo.epochs": 1, "digits.resolution": 16, "beta": 2}."""
    changes, unknown = {}, []
    for key, value in values.items():
        key = str(key)
        if key in sections and isinstance(value, dict):
            changes.update({f"{key}.{name}": v for name, v in value.items()})
        elif key in FLAT_ALIASES:
            deprecated_name(f"{source}: {key}", ".".join(FLAT_ALIASES[key]))
            changes[".".join(FLAT_ALIASES[key])] = value
        elif key in common_field_names() or "." in key:
            changes[key] = value
        else:
            unknown.append(key)
    return changes, unknown


def from_mapping(values: dict[str, Any], base: TrainConfig | None = None, source: str = "config") -> TrainConfig:
    """Apply a {field: value} mapping (from YAML) onto a config. Keys are common fields, sections
    ({ppo: {epochs: 1}}), "section.field" or the flat aliases; unknown keys and ill-typed values are refused."""
    if not isinstance(values, dict):
        raise UserError(f"{source} must be a mapping of field: value")
    base = base or TrainConfig()
    add_owner_sections(values.get("world", base.world), values.get("method", base.method))
    base = TrainConfig(**{**{k: getattr(base, k) for k in common_field_names()}, "sections": base.sections})  # + new sections
    changes, unknown = _flatten(values, base.sections, source)
    for key, value in list(changes.items()):
        section, _, name = key.rpartition(".")
        cls = base.sections[section].__class__ if section in base.sections else (TrainConfig if not section else None)
        if cls is None or name not in {f.name for f in dataclasses.fields(cls)} or name == "sections":
            unknown.append(key)
            del changes[key]
            continue
        changes[key] = checked(cls, name, value, f"{source}: {section + '.' if section else ''}")
    if unknown:
        raise UserError(f"{source}: unknown config key(s) {', '.join(sorted(unknown))}")
    return with_changes(base, **changes)


def load_preset(name: str, base: TrainConfig | None = None) -> TrainConfig:
    try:
        values = yaml.safe_load(_preset_text(name)) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"config {name} is not valid YAML: {str(exc).splitlines()[0]}") from None
    return from_mapping(values, base, source=name)


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The stored form: common fields, then one mapping per section."""
    out = {k: dataclasses.asdict(cfg)[k] for k in common_field_names()}
    out.update({name: dataclasses.asdict(section) for name, section in cfg.sections.items()})
    return out


def to_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flat_items(values: dict[str, Any]) -> dict[str, Any]:
    """{"ppo.epochs": 2, "beta": 6.0, ...} of a stored config dict (nested, or with the flat aliases of old runs)."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict) and key not in common_field_names():
            out.update({f"{key}.{k}": v for k, v in value.items()})
        elif key in FLAT_ALIASES:
            out[".".join(FLAT_ALIASES[key])] = value
        else:
            out[key] = value
    return out


def config_diff(cfg: TrainConfig, stored: dict | str, ignore=()) -> list[str]:
    """The fields (as "section.field" for sections) in which cfg differs from a stored config."""
    if isinstance(stored, str):
        try:
            stored = yaml.safe_load(stored) or {}
        except yaml.YAMLError:
            return ["config.yaml (unreadable)"]
    if not isinstance(stored, dict):
        return ["config.yaml (not a mapping)"]
    now, then = flat_items(to_dict(cfg)), flat_items(stored)
    defaults = flat_items(to_dict(TrainConfig()))
    # a field missing from an older stored config counts as its default
    return sorted(k for k in set(now) | set(then)
                  if k not in ignore and now.get(k, defaults.get(k)) != then.get(k, defaults.get(k)))


def cli_aliases(args: list[str]) -> list[str]:
    """Rewrite the flat flags of earlier releases (--lcm-model X, --ppo_epochs=1) to their sections' (--lcm.model),
    with a deprecation notice each."""
    out = []
    for a in args:
        if a.startswith("--") and len(a) > 2:
            flag, sep, value = a[2:].partition("=")
            key = flag.replace("-", "_")
            if key in FLAT_ALIASES:
                section, name = FLAT_ALIASES[key]
                new = f"--{section}.{name.replace('_', '-')}"
                deprecated_name(f"--{flag}", new)
                a = new + (sep + value if sep else "")
        out.append(a)
    return out
