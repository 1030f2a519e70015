"""Shared test helpers: locating the parity fixtures of the authors' code."""

import os
import pathlib

import numpy as np
import pytest

_REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES_DIR = pathlib.Path(
    os.environ.get("JAXDEBLUR_FIXTURES", _REPO.parent / "shared" / "fixtures"))

# One persistent XLA compilation cache for the whole run, set before jax is imported: the
# two pytest-xdist workers and the subprocesses tests start (the command, the launcher,
# 8-device runs) compile many of the same programs, and compilation, not computing, is most
# of the MCEM tests' time (tests/test_mcem.py::test_deblur_result_shapes_and_ranges: 88 s
# with a cold cache, 28 s with a warm one, on the 2-core machine). Kept under .pytest_cache
# (git-ignored) between local runs; CI's fresh clone starts it empty. Tests that need a
# cache of their own (tests/test_multiprocess.py) pass one to their processes.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(_REPO / ".pytest_cache" / "jax_compilation_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

#: XLA_FLAGS of the Deep EM subprocesses whose checks compare runs made under the same
#: flags (2 processes against 1, sharded against unsharded): LLVM's optimisations off
#: roughly halve their compilation. Not for checks of measured figures (the rounding, and a
#: Langevin chain with it, changes) nor for the UFPNet runs (no faster): DEVELOPERS.md,
#: "Tests", has the measurements.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0"


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
