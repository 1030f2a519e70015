"""The configurations that ship with jaxdeblur, and the one loader every entry point uses.

Each module here has a ``get_config()`` whose docstring gives the command that runs it and
the result it reaches: ``mcem`` (Deep EM), ``photo`` (blind deblurring of a photo), ``flow_prior`` (stage I), ``ufpnet_tiny`` (the
default CPU run of stages II/III) and ``ufpnet_gopro`` (the official configuration).

    >>> from jaxdeblur import configs
    >>> config = configs.load("mcem", ["em_iterations=50", "grid=(1,1)"])
    >>> config.grid
    (1, 1)
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import json
import pathlib
import typing
from typing import Iterable, Mapping

import ml_collections

NAMES = ("mcem", "photo", "flow_prior", "ufpnet_tiny", "ufpnet_gopro")


def path(name: str) -> pathlib.Path:
    """The file of the shipped config ``name`` (for ``config_flags.DEFINE_config_file``)."""
    if name not in NAMES:
        raise ValueError(f"no shipped config {name!r}; shipped: {', '.join(NAMES)}")
    return pathlib.Path(__file__).with_name(f"{name}.py")


def _from_file(file: pathlib.Path) -> ml_collections.ConfigDict:
    if not file.is_file():
        raise ValueError(f"config file {file} does not exist; give a shipped name "
                         f"({', '.join(NAMES)}) or the path of a get_config() .py or a .json")
    if file.suffix == ".json":
        try:
            return ml_collections.ConfigDict(json.loads(file.read_text()))
        except (ValueError, TypeError) as err:
            raise ValueError(f"cannot read the JSON config {file}: {err}") from err
    spec = importlib.util.spec_from_file_location(f"_jaxdeblur_config_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        return module.get_config()
    except Exception as err:  # noqa: BLE001 - any error in a user's config file
        raise ValueError(f"cannot load the config {file}: {type(err).__name__}: {err}") \
            from err


def _parse_value(text: str):
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return tuple(value) if isinstance(value, list) else value


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Iterable[str]) -> ml_collections.ConfigDict:
    """Sets ``KEY=VALUE`` overrides in place: dotted keys, Python literals
    (``em_iterations=50``, ``grid=(2,2)``, ``image_net.features=(16,16)``). A key the config
    does not have is an error naming it and the fields there are.
    """
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"an override is KEY=VALUE, got {item!r}")
        key, text = item.split("=", 1)
        names = key.strip().split(".")
        target = config
        for depth, name in enumerate(names):
            if not isinstance(target, ml_collections.ConfigDict) or name not in target:
                fields = (", ".join(sorted(target.keys()))
                          if isinstance(target, ml_collections.ConfigDict) else "none")
                raise ValueError(f"override {key}: the config has no field "
                                 f"{'.'.join(names[:depth + 1])!r} (fields there: {fields})")
            if depth < len(names) - 1:
                target = target[name]
        value = _parse_value(text)
        try:
            target[names[-1]] = value
        except (TypeError, ValueError) as err:
            raise ValueError(f"override {key}={value!r}: {err}") from err
    return config


def plain(value):
    """ConfigDicts and mappings as dicts, lists (JSON) as tuples, recursively."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return tuple(plain(v) for v in value)
    return value


def as_dataclass(cls: type, values, prefix: str = "", *, source: str = "the shipped config"):
    """``cls(**values)`` for a frozen settings dataclass, nested sections recursively.

    The config is read once, when a run starts: a field the dataclass lacks (misspelt) or
    a field the config lacks is a ValueError naming its dotted path, so nothing runs on a
    default the shipped config does not share; every value must be hashable (the settings
    are static arguments of jitted code).

    Args:
      cls: the dataclass; fields typed with another dataclass are sections.
      values: a ConfigDict or mapping (`plain` is applied).
      prefix: dotted path of ``values`` in the config, for messages.
      source: where the complete field list lives, for the missing-field message.
    """
    values = plain(values)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"unknown config field(s) {', '.join(prefix + u for u in unknown)}"
                         f"; the fields there are {', '.join(names)}")
    missing = [name for name in names if name not in values]
    if missing:
        raise ValueError(f"config field(s) {', '.join(prefix + m for m in missing)} "
                         f"missing; {source} has every field with its value")
    kwargs = {}
    for name in names:
        value = values[name]
        if dataclasses.is_dataclass(hints[name]):
            if not isinstance(value, Mapping):
                raise ValueError(f"config field {prefix + name} must be a section of fields, "
                                 f"got {value!r}")
            value = as_dataclass(hints[name], value, f"{prefix}{name}.", source=source)
        else:
            try:
                hash(value)
            except TypeError:
                raise ValueError(f"config field {prefix + name} must be a number, string or "
                                 f"tuple, got {value!r}") from None
        kwargs[name] = value
    return cls(**kwargs)


def load(name_or_path: str | pathlib.Path,
         overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
    """A fresh config: a shipped one by name, or a ``get_config()`` file / JSON by path,
    with ``KEY=VALUE`` overrides applied.

    Raises:
      ValueError: an unknown name, a missing or broken file, or a bad override (the message
        names it).
    """
    if isinstance(name_or_path, str) and name_or_path in NAMES:
        config = importlib.import_module(f"{__name__}.{name_or_path}").get_config()
    else:
        config = _from_file(pathlib.Path(name_or_path))
    return apply_overrides(config, overrides)
