"""Configs as dataclasses, turned into command-line options and back, with one declaration per option.

A config is a dataclass. Each field is one of:
- an option: `field(default=..., metadata=described("help"))` — becomes `--field-name`;
- a group: a nested config dataclass (`field(default_factory=Group)`) — its options become an argument group;
- a choice from a registry: `registered(REGISTRY, "default-name", "help")` — the field holds an object of the
  chosen registered class (itself a config dataclass); `--field-name NAME` chooses it and the options of every
  registered class are listed under it, each applying only when its class is chosen.

`build(Config, options)` makes a config from flat option names (what the CLI parses, what the Python API's
keyword arguments are), so `prune(model, ratio=0.2, alpha=0.3)` and `--ratio 0.2 --alpha 0.3` take one path.
Options not given keep the dataclass's default: the default lives in exactly one place.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable, Iterator
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any, ClassVar

from .errors import SdmpruneError


def described(text: str, **extra) -> dict:
    """`field(metadata=described("..."))`: the option's --help text."""
    return {"help": text, **extra}


class Registry:
    """Named config classes for one extension point (criteria, teachers, methods...).

    Register with the decorator `@REGISTRY.register("name")` on a dataclass; its docstring's first line is
    the one-line description shown in --help.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self.classes: dict[str, type] = {}

    def register(self, name: str):
        def decorate(cls: type) -> type:
            if not is_dataclass(cls):
                raise TypeError(f"{self.kind} '{name}' must be a dataclass (its fields are its options)")
            cls.name = name
            self.classes[name] = cls
            return cls

        return decorate

    def get(self, name: str) -> type:
        if name not in self.classes:
            raise SdmpruneError(f"unknown {self.kind} '{name}': choose one of {', '.join(sorted(self.classes))}")
        return self.classes[name]

    def description(self, name: str) -> str:
        doc = self.get(name).__doc__ or name
        return doc.strip().splitlines()[0].rstrip(".")

    def __contains__(self, name: str) -> bool:
        return name in self.classes

    def __iter__(self) -> Iterator[str]:
        return iter(self.classes)


class Named:
    """Base of registered config classes: `name` is set by `Registry.register`."""

    name: ClassVar[str] = ""


class FromOptions:
    """Mixin of config dataclasses: `Config.of(ratio=0.2, output="runs/x")` builds one from flat option names."""

    @classmethod
    def of(cls, **options):
        return build(cls, options)


def registered(registry: Registry, default: str, text: str):
    """A field holding an object of the class registered as `default` (changed with `--<field> NAME`)."""
    return field(default_factory=lambda: registry.get(default)(), metadata=described(text, registry=registry))


# ----------------------------------------------------------------------------- walking a config class


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_group(cls: type, f: dataclasses.Field) -> bool:
    kind = _hints(cls)[f.name]
    return isinstance(kind, type) and is_dataclass(kind) and "registry" not in f.metadata


def option_type(cls: type, f: dataclasses.Field) -> type:
    """The scalar type of an option field (`int | None` -> int)."""
    kind = _hints(cls)[f.name]
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return args[0] if args else kind


def _none_or(kind: type) -> Callable[[str], Any]:
    """Argument parser of an optional number: `none` gives None (the field's unset meaning)."""
    def parse(text: str) -> Any:
        return None if text.strip().lower() == "none" else kind(text)
    parse.__name__ = kind.__name__  # argparse names the type in its "invalid value" message
    return parse


def default_of(cls: type, f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def flat_names(cls: type) -> dict[str, list[str]]:
    """Every flat option name of `cls` -> the path of attribute names that reaches it (registry options of
    every registered class included, under the registry field's path). A name reached twice, other than by
    two registered classes of one registry (only the chosen one applies), is a config error."""
    names: dict[str, list[str]] = {}

    def add(name: str, path: list[str]) -> None:
        if name in names:
            raise TypeError(f"{cls.__name__}: option '{name}' is declared twice ({names[name]} and {path})")
        names[name] = path

    for f in fields(cls):
        if _is_group(cls, f):
            for name, path in flat_names(_hints(cls)[f.name]).items():
                add(name, [f.name, *path])
        elif "registry" in f.metadata:
            add(f.name, [f.name])
            members: dict[str, list[str]] = {}
            for member in f.metadata["registry"].classes.values():
                for name, path in flat_names(member).items():
                    members.setdefault(name, [f.name, *path])
            for name, path in members.items():
                add(name, path)
        else:
            add(f.name, [f.name])
    return names


# ----------------------------------------------------------------------------- building a config


def build(cls: type, options: dict[str, Any] | None = None, base: Any = None) -> Any:
    """An instance of config class `cls` from flat option names, starting from `base` (else the defaults).

    Unknown names fail, and so does an option of a registered class that is not the chosen one (e.g.
    `--alpha` with `--criterion taylor`), with one line naming what applies.
    """
    options = dict(options or {})
    unknown = sorted(set(options) - set(flat_names(cls)))
    if unknown:
        raise SdmpruneError(f"unknown option(s) {', '.join(_flag(n) for n in unknown)} for {cls.__name__}")
    result = _build(cls, options, base)
    if options:  # left over: options of registered classes that were not chosen
        name = sorted(options)[0]
        raise SdmpruneError(f"{_flag(name)} does not apply here: {_owner_hint(cls, name, result)}")
    return result


def _build(cls: type, options: dict[str, Any], base: Any) -> Any:
    values = {}
    for f in fields(cls):
        if not f.init:
            continue
        if base is None and default_of(cls, f) is MISSING and f.name not in options and not _is_group(cls, f):
            raise SdmpruneError(f"{_flag(f.name)} is required")
        current = getattr(base, f.name) if base is not None else None
        if _is_group(cls, f):  # a method's own defaults for a shared group come from its default_factory
            default = default_of(cls, f)
            group_base = current if current is not None else (None if default is MISSING else default)
            values[f.name] = _build(_hints(cls)[f.name], options, group_base)
        elif "registry" in f.metadata:
            registry: Registry = f.metadata["registry"]
            chosen = options.pop(f.name, None)
            if isinstance(chosen, Named):  # an object given directly (Python API)
                values[f.name] = _build(type(chosen), options, chosen)
                continue
            if chosen is None:
                member_base = current if current is not None else default_of(cls, f)
            else:
                member_base = current if current is not None and current.name == chosen else None
            member = registry.get(chosen) if chosen is not None else type(member_base)
            values[f.name] = _build(member, options, member_base)
        elif f.name in options:
            values[f.name] = options.pop(f.name)
        elif base is not None:
            values[f.name] = current
    return cls(**values)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _owner_hint(cls: type, name: str, config: Any) -> str:
    for f in fields(cls):
        if _is_group(cls, f):
            hint = _owner_hint(_hints(cls)[f.name], name, getattr(config, f.name))
            if hint:
                return hint
        elif "registry" in f.metadata:
            chosen = getattr(config, f.name)
            owners = [n for n, member in f.metadata["registry"].classes.items() if name in flat_names(member)]
            if owners:
                return (f"it is an option of {f.name.replace('_', ' ')} {', '.join(owners)}, and "
                        f"{_flag(f.name)} is {chosen.name}")
            hint = _owner_hint(type(chosen), name, chosen)
            if hint:
                return hint
    return ""


def to_dict(config: Any) -> dict[str, Any]:
    """JSON-ready nested dict of a config; a registered object records its `name` first."""
    result = {"name": config.name} if isinstance(config, Named) else {}
    for f in fields(config):
        value = getattr(config, f.name)
        result[f.name] = to_dict(value) if is_dataclass(value) else value
    return result


def walk(config: Any) -> Iterator[Any]:
    """`config` and every config nested in it (groups and chosen registered objects), depth first."""
    yield config
    for f in fields(config):
        value = getattr(config, f.name)
        if is_dataclass(value):
            yield from walk(value)


def validate(config: Any) -> None:
    """Call `validate()` on every config nested in `config`, inner first: bad values fail before any work."""
    for part in reversed(list(walk(config))):
        check = getattr(part, "validate", None)
        if check is not None:
            check()


# ----------------------------------------------------------------------------- the command line


@dataclass
class _Added:
    flags: set[str] = field(default_factory=set)


def add_arguments(parser: argparse.ArgumentParser, cls: type, title: str | None = None,
                  _added: _Added | None = None, _defaults: Any = None) -> None:
    """Options of config class `cls` on `parser`, one argument group per config (nested groups and registered
    classes get their own). Defaults are left to the dataclass (argparse records only what was given)."""
    added = _added or _Added()
    group = parser.add_argument_group(title or (cls.__doc__ or cls.__name__).strip().splitlines()[0])
    nested = []
    for f in fields(cls):
        if not f.init:
            continue
        default = getattr(_defaults, f.name) if _defaults is not None else default_of(cls, f)
        if _is_group(cls, f):
            nested.append((_hints(cls)[f.name], None, None if default is MISSING else default))
            continue
        if "registry" in f.metadata:
            registry: Registry = f.metadata["registry"]
            listing = "; ".join(f"{n}: {registry.description(n)}" for n in registry)
            _add(group, added, f.name, str, f"{f.metadata['help']} ({listing})", default.name, choices=list(registry))
            for name, member in registry.classes.items():
                member_defaults = default if type(default) is member else member()
                if fields(member):
                    nested.append((member, f"{registry.kind} {name}", member_defaults))
            continue
        if f.metadata.get("positional"):
            group.add_argument(f.name, nargs="?", default=argparse.SUPPRESS, help=f"{f.metadata['help']} "
                               f"(default: {default})")
            continue
        kind = option_type(cls, f)
        if kind in (int, float) and type(None) in typing.get_args(_hints(cls)[f.name]):
            kind = _none_or(kind)
        _add(group, added, f.name, kind, f.metadata["help"], default, choices=f.metadata.get("choices"))
    for member, member_title, member_defaults in nested:
        add_arguments(parser, member, member_title, added, member_defaults)


def _add(group, added: _Added, name: str, kind: type, text: str, default: Any, choices=None) -> None:
    flag = _flag(name)
    if flag in added.flags:  # the same option of two registered classes: declared by the first
        return
    added.flags.add(flag)
    shown = "" if default is MISSING or default is None else f" (default: {default})"
    if kind is bool:
        group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=text + shown)
        return
    required = default is MISSING
    group.add_argument(flag, type=kind, default=argparse.SUPPRESS, required=required, choices=choices,
                       help=text + ("" if required else shown))
