"""Shared test helpers: locating the parity fixtures of the authors' code."""

import os
import pathlib

import numpy as np
import pytest

_REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES_DIR = pathlib.Path(
    os.environ.get("JAXDEBLUR_FIXTURES", _REPO.parent / "shared" / "fixtures"))


def load_fixture(name: str) -> dict:
    """Loads `shared/fixtures/<name>` as a dict of arrays, or skips the test with a reason."""
    path = FIXTURES_DIR / name
    if not path.exists():
        pytest.skip(f"parity fixture {path} is absent (it lives in ../shared/fixtures beside "
                    "the repository; set JAXDEBLUR_FIXTURES to point elsewhere)")
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def config_flags(overrides: dict) -> list[str]:
    """``--config.key=value`` flags of a train script (tuples written as Python tuples)."""
    flags = []
    for key, value in overrides.items():
        if isinstance(value, tuple):
            value = "(" + ",".join(str(v) for v in value) + ",)"
        flags.append(f"--config.{key}={value}")
    return flags


# Hypothesis draws the same examples on every CI run (a failure found once is found again,
# and a green run cannot turn red by chance); locally it explores new examples.
import hypothesis  # noqa: E402

hypothesis.settings.register_profile("ci", derandomize=True, deadline=None,
                                     print_blob=True)
hypothesis.settings.register_profile("dev", deadline=None)
hypothesis.settings.load_profile("ci" if os.environ.get("CI") else "dev")
