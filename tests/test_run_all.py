"""benchmarks/run_all.py: the quick table runs end to end on the CPU, and ``--device gpu``
without a GPU stops with a clear message instead of measuring the CPU."""

import importlib.util
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "run_all.py"
ROWS = ("blur per_pixel_blur k=19 fwd", "blur per_pixel_blur k=19 fwd+bwd",
        "blur filter_flow_blur 48×31² (auto) fwd",
        "blur filter_flow_blur 48×31² (auto) fwd+bwd",
        "flow latent_to_kernel", "flow log_prob", "UFPNet tiny train step (stage III)",
        "UFPNet official inference (TLC, row blocks)", "Deep EM E-step lax.scan, 1/call",
        "Deep EM E-step unrolled, 1/call", "Deep EM M-step (1 Adam step)",
        "Deep EM whole run, estimate", "photo deblur (Deep EM command")


@pytest.mark.slow
def test_quick_table_on_the_cpu():
    """50 s of wall time, 65 CPU-seconds on the 2-core development machine (180 s while
    other jobs held its load average at 12)."""
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    table = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert table[0] == "| row | size | time | memory | reference |"
    cells = [[cell.strip() for cell in line.split("|")[1:-1]] for line in table[2:]]
    assert all(len(row) == 5 for row in cells), table
    names = [row[0] for row in cells]
    for name in ROWS:
        assert any(n.startswith(name) for n in names), (name, names)
    inference = next(row for row in cells if row[0].startswith("UFPNet official inference"))
    assert inference[1] == "1280×720"
    gib = float(re.match(r"([\d.]+) GiB", inference[3]).group(1))
    assert gib <= 4.0


def test_gpu_without_a_gpu_fails_clearly():
    if any(importlib.util.find_spec(f"jax_cuda{v}_plugin") for v in (12, 13)):
        pytest.skip("a CUDA plugin is installed: --device gpu would run the whole GPU table")
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "gpu"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "found no GPU" in done.stderr and "JAX_PLATFORMS=cuda" in done.stderr
    assert "| row |" not in done.stdout
