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
from typing import Iterable

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


def as_dataclass(section, cls, name: str, **replace):
    """``cls(**section)`` for a frozen settings dataclass, with ``replace`` fields given
    directly; a missing or unknown field is a ValueError naming it and ``config.<name>``."""
    fields = {f.name for f in dataclasses.fields(cls)}
    given = set(section.keys()) | set(replace)
    if given - fields:
        raise ValueError(f"unknown field(s) in config.{name}: {sorted(given - fields)}")
    if fields - given:
        raise ValueError(f"missing field(s) in config.{name}: {sorted(fields - given)}")
    values = {key: section[key] for key in section.keys()}
    values.update(replace)
    return cls(**values)


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
