"""Tests for the jaxdeblur command (jaxdeblur.cli).

End-to-end runs go through ``python -m jaxdeblur.cli`` in a subprocess on files written
here with PIL / imageio (independently of jaxdeblur.io), with tiny MCEM configurations or
tiny UFPNet weights. Bad-input checks call ``cli.main`` in-process (faster; same code).
"""

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import tifffile
from PIL import Image

from jaxdeblur import cli, kernels, metrics
from jaxdeblur.train import checkpoint as checkpoint_lib
from jaxdeblur.train import mcem as mcem_runs
from jaxdeblur.train import ufpnet as ufpnet_runs

REPO = pathlib.Path(__file__).resolve().parents[1]

# A tiny, fast MCEM: small networks, one filter-flow cell, a few EM iterations.
TINY_MCEM = ["--set", "kernel_size=9", "--set", "grid=(1,1)",
             "--set", "image_net.features=(8,8)", "--set", "image_net.skip_features=4",
             "--set", "image_net.num_groups=4", "--set", "kernel_net.features=(8,8)",
             "--set", "kernel_net.skip_features=4", "--set", "kernel_net.num_groups=4",
             "--set", "em_iterations=2", "--set", "warmup_iterations=1",
             "--set", "e_step_steps=2", "--set", "e_step_burn_in=1", "--set", "log_every=1"]


def run_cli(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "jaxdeblur.cli", *map(str, args)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)


def _photo(shape, seed=0):
    """A smooth-ish test picture (gradients + a few edges) in [0, 1]."""
    h, w = shape[:2]
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = 0.5 + 0.3 * np.sin(6 * xx) * np.cos(5 * yy)
    base[h // 4: h // 2, w // 3: 2 * w // 3] += 0.2
    rng = np.random.default_rng(seed)
    channels = shape[2] if len(shape) == 3 else 1
    out = np.stack([np.roll(base, 3 * c, axis=1) for c in range(channels)], -1)
    return np.clip(out + 0.02 * rng.standard_normal(out.shape), 0, 1)


def write_inputs(folder: pathlib.Path, size=(24, 32)):
    """One file per supported layout; returns {name: (expected mode, pixels or None)}."""
    folder.mkdir(parents=True, exist_ok=True)
    h, w = size
    rgb8 = (_photo((h, w, 3)) * 255).round().astype(np.uint8)
    Image.fromarray(rgb8).save(folder / "rgb8.png")
    rgb16 = (_photo((h, w, 3), 1) * 65535).round().astype(np.uint16)
    tifffile.imwrite(folder / "rgb16.tif", rgb16, photometric="rgb")
    gray16 = (_photo((h, w), 2) * 65535).round().astype(np.uint16)[..., 0]
    Image.fromarray(gray16).save(folder / "gray16.png")
    Image.fromarray(rgb8).save(folder / "photo.jpg", quality=95)
    rgba = np.concatenate([rgb8, np.full((h, w, 1), 0, np.uint8)], -1)
    rgba[..., 3] = np.linspace(0, 255, w).round().astype(np.uint8)[None, :]
    Image.fromarray(rgba).save(folder / "rgba.png")
    gray = (_photo((h, w)) * 255).round().astype(np.uint8)[..., 0]
    Image.fromarray(gray).save(folder / "gray.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation: the viewer rotates the stored image 90 deg clockwise
    Image.fromarray(rgb8).save(folder / "rotated.jpg", quality=95, exif=exif)
    return {"rgb8.png": ("RGB", rgb8), "rgb16.tif": ("RGB16", rgb16),
            "gray16.png": ("I;16", gray16),
            "photo.jpg": ("RGB", rgb8), "rgba.png": ("RGBA", rgba), "gray.png": ("L", gray),
            "rotated.jpg": ("RGB", None)}


# --------------------------------------------------------------------------------------
# Help and parser.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["deblur", "kernels", "convert", "evaluate"])
def test_help_has_a_worked_example(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and f"jaxdeblur {command}" in text


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["deblur", "x.png"])  # no --output, no --method
    assert exit_info.value.code == 2


# --------------------------------------------------------------------------------------
# Bad inputs: clear message, non-zero exit, nothing written.
# --------------------------------------------------------------------------------------


def _deblur(args, capsys):
    code = cli.main(["deblur", *map(str, args), "--method", "mcem-paper", *TINY_MCEM])
    return code, capsys.readouterr().err


def test_unreadable_file(tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not a PNG file")
    out = tmp_path / "out"
    code, err = _deblur([bad, "-o", out], capsys)
    assert code == 1
    assert "cannot read" in err and "broken.png" in err
    assert not any(out.iterdir())  # nothing written


def test_missing_file_and_empty_folder_and_glob(tmp_path, capsys):
    code, err = _deblur([tmp_path / "nope.png", "-o", tmp_path / "out"], capsys)
    assert code == 1 and "no such file" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    code, err = _deblur([empty, "-o", tmp_path / "out"], capsys)
    assert code == 1 and "contains no images" in err
    code, err = _deblur([str(tmp_path / "*.png"), "-o", tmp_path / "out"], capsys)
    assert code == 1 and "matches no images" in err


def test_output_folder_cannot_be_written(tmp_path, capsys):
    write_inputs(tmp_path / "in")
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    code, err = _deblur([tmp_path / "in" / "gray.png", "-o", blocker], capsys)
    assert code == 1 and "not a folder" in err
    code, err = _deblur([tmp_path / "in" / "gray.png", "-o", blocker / "sub"], capsys)
    assert code == 1 and "cannot write to the output folder" in err


def test_existing_outputs_need_overwrite(tmp_path, capsys):
    write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    (out / "gray.png").write_bytes(b"precious")
    code, err = _deblur([tmp_path / "in" / "gray.png", "-o", out], capsys)
    assert code == 1 and "--overwrite" in err
    assert (out / "gray.png").read_bytes() == b"precious"


def test_checkpoint_for_another_method(tmp_path, capsys):
    write_inputs(tmp_path / "in")
    image = tmp_path / "in" / "rgb8.png"
    # An official-format file that is not UFPNet (a flow-only state dict).
    np.savez(tmp_path / "flow.npz", **{"flow.0.weight": np.zeros((3, 3), np.float32)})
    code = cli.main(["deblur", str(image), "-o", str(tmp_path / "o"), "--method", "ufpnet",
                     "--checkpoint", str(tmp_path / "flow.npz")])
    err = capsys.readouterr().err
    assert code == 1 and "not a UFPNet checkpoint" in err
    # A converted checkpoint directory that declares another method.
    other = tmp_path / "other"
    other.mkdir()
    (other / checkpoint_lib.CONVERTED_META).write_text(json.dumps({"method": "mcem"}))
    code = cli.main(["deblur", str(image), "-o", str(tmp_path / "o"), "--method", "ufpnet",
                     "--checkpoint", str(other)])
    err = capsys.readouterr().err
    assert code == 1 and "'mcem' checkpoint, not 'ufpnet'" in err
    # UFPNet without a checkpoint, MCEM with one.
    code = cli.main(["deblur", str(image), "-o", str(tmp_path / "o"), "--method", "ufpnet"])
    assert code == 1 and "needs --checkpoint" in capsys.readouterr().err
    code = cli.main(["deblur", str(image), "-o", str(tmp_path / "o"), "--method", "mcem-paper",
                     "--checkpoint", str(other)])
    assert code == 1 and "needs no checkpoint" in capsys.readouterr().err


def test_bad_config_override(tmp_path, capsys):
    write_inputs(tmp_path / "in")
    code = cli.main(["deblur", str(tmp_path / "in" / "gray.png"), "-o", str(tmp_path / "o"),
                     "--method", "mcem-paper", "--set", "no_such_field=3"])
    assert code == 1 and "no field 'no_such_field'" in capsys.readouterr().err


def test_collect_inputs_order_and_dedup(tmp_path):
    write_inputs(tmp_path)
    found = cli.collect_inputs([str(tmp_path / "gray.png"), str(tmp_path),
                                str(tmp_path / "*.jpg")])
    names = [p.name for p in found]
    assert names[0] == "gray.png" and len(names) == len(set(names)) == 7


# --------------------------------------------------------------------------------------
# End to end.
# --------------------------------------------------------------------------------------


TINY_UFPNET = dict(img_channel=3, width=8, enc_blk_nums=(1, 1, 1, 2), middle_blk_num=1,
                   dec_blk_nums=(1, 1, 1, 1), kernel_size=19)


@pytest.fixture(scope="module")
def tiny_ufpnet_checkpoint(tmp_path_factory):
    """Random tiny UFPNet weights saved in the layout 'jaxdeblur convert' writes."""
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from jaxdeblur.nets.ufpnet import UFPNet

    module = UFPNet(**TINY_UFPNET)
    key = jax.random.key(0)
    # Shapes only (module.init of the 5.6 M-parameter KE-Net costs ~50 s of CPU); small
    # random weights keep the flow's couplings near the identity, so outputs are finite.
    shapes = jax.eval_shape(lambda: module.init({"params": key}, jnp.zeros((1, 16, 16, 3)),
                                                key=key))
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if name.startswith("['batch_stats']"):  # flow running statistics: mean 0, var 1
            return np.full(leaf.shape, 1.0 if name.endswith("['var']") else 0.0, np.float32)
        return (0.02 * rng.standard_normal(leaf.shape)).astype(np.float32)

    variables = jax.tree_util.tree_map_with_path(fill, shapes)
    folder = tmp_path_factory.mktemp("tiny_ufpnet")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save((folder / "variables").resolve(), variables)
    checkpointer.wait_until_finished()
    (folder / checkpoint_lib.CONVERTED_META).write_text(json.dumps(
        {"method": "ufpnet", "model_config": TINY_UFPNET}))
    return folder


def test_deblur_end_to_end_keeps_size_mode_and_depth(tmp_path, tiny_ufpnet_checkpoint):
    """Every layout through the command: 8/16-bit PNG, 16-bit TIFF, JPEG, RGBA, gray."""
    expected = write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    result = run_cli("deblur", tmp_path / "in", "--method", "ufpnet", "--checkpoint",
                     tiny_ufpnet_checkpoint, "--train-size", "16", "--tile", "32",
                     "--overlap", "16", "-o", out, "--figures", "--grid", "1", "2",
                     "--linear", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    for name, (mode, _) in expected.items():
        path = out / name
        assert path.exists(), (name, result.stderr)
        if mode == "RGB16":
            array = tifffile.imread(path)
            assert array.dtype == np.uint16 and array.shape == (24, 32, 3)
        else:
            with Image.open(path) as im:
                # EXIF orientation is applied on reading: the result is stored upright.
                assert im.size == ((24, 32) if name == "rotated.jpg" else (32, 24)), \
                    (name, im.size)
                assert im.mode == mode or (mode == "I;16" and im.mode.startswith("I")), \
                    (name, im.mode)
        for figure in ("_compare.png", "_kernels.png", "_kernels.npz"):
            assert (out / (path.stem + figure)).exists()
    # Alpha is carried through bit for bit.
    with Image.open(out / "rgba.png") as im:
        np.testing.assert_array_equal(np.asarray(im)[..., 3], expected["rgba.png"][1][..., 3])
    # A second run refuses to overwrite, and leaves the file alone.
    before = (out / "gray.png").read_bytes()
    again = run_cli("deblur", tmp_path / "in" / "gray.png", "--method", "ufpnet",
                    "--checkpoint", tiny_ufpnet_checkpoint, "-o", out)
    assert again.returncode == 1 and "--overwrite" in again.stderr
    assert (out / "gray.png").read_bytes() == before


def test_convert_official_weights_then_kernels(tmp_path):
    """Official tiny UFPNet weights (the parity fixture) -> orbax -> the kernels command."""
    from conftest import FIXTURES_DIR, load_fixture

    load_fixture("ufpnet_tiny.npz")  # skips with a reason when ../shared is absent
    weights = tmp_path / "ufpnet"
    result = run_cli("convert", FIXTURES_DIR / "ufpnet_tiny.npz", weights)
    assert result.returncode == 0, result.stderr
    meta = json.loads((weights / checkpoint_lib.CONVERTED_META).read_text())
    assert meta["method"] == "ufpnet" and meta["model_config"]["width"] == 8
    again = run_cli("convert", FIXTURES_DIR / "ufpnet_tiny.npz", weights)
    assert again.returncode == 1 and "--overwrite" in again.stderr

    write_inputs(tmp_path / "in")
    result = run_cli("kernels", tmp_path / "in" / "rgb8.png", "--method", "ufpnet",
                     "--checkpoint", weights, "--grid", "2", "2", "-o", tmp_path / "k")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "k" / "rgb8_kernels.png").exists()
    with np.load(tmp_path / "k" / "rgb8_kernels.npz") as data:
        assert data["kernels"].shape == (4, 19, 19) and data["centres"].shape == (4, 2)
        assert np.all(data["kernels"] >= 0) and np.all(np.isfinite(data["kernels"]))


def test_evaluate_paired_folders_identity_baseline(tmp_path, capsys):
    blurry, sharp = tmp_path / "blurry", tmp_path / "sharp"
    blurry.mkdir()
    sharp.mkdir()
    rng = np.random.default_rng(0)
    expected = []
    for i in range(2):
        clean = (rng.uniform(size=(20, 24, 3)) * 255).round().astype(np.uint8)
        noisy = np.clip(clean.astype(int) + rng.integers(-8, 9, clean.shape), 0, 255)
        Image.fromarray(clean).save(sharp / f"{i}.png")
        Image.fromarray(noisy.astype(np.uint8)).save(blurry / f"{i}.png")
        mse = np.mean((noisy.astype(float) - clean) ** 2)
        expected.append(10 * np.log10(255.0 ** 2 / mse))
    table = tmp_path / "eval.json"
    code = cli.main(["evaluate", "--pairs", str(blurry), str(sharp), "--method", "none",
                     "--output", str(table)])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "PSNR" in printed and "mean" in printed
    rows = json.loads(table.read_text())
    np.testing.assert_allclose([r["psnr"] for r in rows["images"]], expected, atol=1e-3)
    assert all(0 < r["ssim"] <= 1 for r in rows["images"])
    code = cli.main(["evaluate", "--pairs", str(blurry), str(sharp), "--method", "none",
                     "--output", str(table)])
    assert code == 1 and "--overwrite" in capsys.readouterr().err
    (sharp / "1.png").unlink()
    code = cli.main(["evaluate", "--pairs", str(blurry), str(sharp), "--method", "none"])
    assert code == 1 and "no sharp image" in capsys.readouterr().err


def test_mcem_command_tells_the_deblurrer_which_photos_are_jpeg(tmp_path, monkeypatch):
    """`--method mcem` passes ``lossy`` for JPEG inputs only (their compression errors are
    not the white noise `photo.restoration_weight` measures); the deblurrer is replaced by
    an identity that records it."""
    from jaxdeblur import photo

    seen = {}

    def fake_deblur(self, image, *, key=None, state_file=None, lossy=False):
        seen[pathlib.Path(state_file).name] = lossy
        return {"image": image, "kernels": np.full((1, 5, 5), 0.04, np.float32),
                "centres": np.zeros((1, 2), np.float32), "metrics": [], "kernel_size": 5}

    monkeypatch.setattr(photo.PhotoDeblurrer, "deblur", fake_deblur)
    (tmp_path / "in").mkdir()
    pixels = (np.random.default_rng(0).uniform(size=(40, 48, 3)) * 255).astype(np.uint8)
    for name in ("a.jpg", "b.png"):
        Image.fromarray(pixels).save(tmp_path / "in" / name)
    code = cli.main(["deblur", str(tmp_path / "in"), "-o", str(tmp_path / "out"),
                     "--method", "mcem", "--device", "cpu"])
    assert code == 0 and seen == {"a.jpg.npz": True, "b.png.npz": False}, seen


def test_mcem_by_cells_blends_regions_and_keeps_kernels(monkeypatch):
    """The cell logic of TiledMCEM with MCEM replaced by an identity 'deblurrer' (the real
    MCEM is exercised end to end above; here only tiling, kernel centres and metrics)."""
    from jaxdeblur import mcem

    calls = []

    def fake_deblur(blurry, config, *, key):
        calls.append(blurry.shape)
        k = config.kernel_size
        grid = tuple(config.grid)
        count = grid[0] * grid[1]
        return mcem.MCEMResult(
            image=np.asarray(blurry), kernels=np.full((count, k, k), 1.0 / k ** 2, np.float32),
            uncertainty=np.full(blurry.shape, 0.5, np.float32), grid=grid,
            data_fit=np.float32(0.01), history=[(1, [0.02]), (2, [0.01])])

    import jax

    monkeypatch.setattr(mcem, "deblur", fake_deblur)
    config = cli.load_mcem_config(None, ["kernel_size=5", "grid=(2,2)"])
    runner = mcem_runs.TiledMCEM(config, tile=32, overlap=16)
    image = np.random.default_rng(0).uniform(size=(40, 56, 3)).astype(np.float32)
    result = runner.deblur(image, key=jax.random.key(0))
    assert len(calls) == 6 and all(shape == (32, 32, 3) for shape in calls)
    np.testing.assert_allclose(result["image"], image, atol=1e-6)
    np.testing.assert_allclose(result["uncertainty"], 0.5, atol=1e-6)
    assert result["uncertainty"].shape == (40, 56)
    centres = result["centres"]
    assert result["kernels"].shape == (len(centres), 5, 5) and len(centres) > 4
    assert np.all(centres >= 0) and np.all(centres[:, 0] < 40) and np.all(centres[:, 1] < 56)
    assert result["metrics"][0]["step"] == 1 and "data_fit_cell5" in result["metrics"][1]

    whole = mcem_runs.TiledMCEM(config, tile=0, overlap=16).deblur(image, key=jax.random.key(0))
    assert whole["kernels"].shape == (4, 5, 5) and whole["metrics"][-1] == {
        "step": 2, "data_fit": 0.01}


def test_ufpnet_from_a_training_directory(tmp_path, tiny_ufpnet_checkpoint):
    """A work directory written by jaxdeblur.train.checkpoint (the trainer's layout) loads;
    one whose state holds another method's parameters is refused."""
    import jax
    import orbax.checkpoint as ocp

    from jaxdeblur.train.checkpoint import CheckpointManager

    variables = ocp.StandardCheckpointer().restore(
        (tiny_ufpnet_checkpoint / "variables").resolve())
    state = {"step": np.int32(3), "params": variables["params"],
             "batch_stats": variables["batch_stats"], "opt_state": {"mu": np.zeros(2)}}
    manager = CheckpointManager(tmp_path / "run", model_config=TINY_UFPNET, async_save=False)
    manager.save(3, state)
    manager.close()
    module, loaded, description = ufpnet_runs.load_checkpoint(tmp_path / "run")
    assert "training checkpoint" in description
    for field, value in TINY_UFPNET.items():
        assert getattr(module, field) == value
    flat = jax.tree.leaves(loaded["params"])
    assert len(flat) == len(jax.tree.leaves(variables["params"]))
    np.testing.assert_array_equal(loaded["params"]["intro"]["kernel"],
                                  variables["params"]["intro"]["kernel"])

    other = CheckpointManager(tmp_path / "mcem_run", model_config={"name": "mcem"},
                              async_save=False)
    other.save(1, {"params": {"image_net": {"w": np.ones(3, np.float32)}}})
    other.close()
    with pytest.raises(checkpoint_lib.CheckpointError, match="holds no UFPNet parameters"):
        ufpnet_runs.load_checkpoint(tmp_path / "mcem_run")


def test_mcem_command_makes_a_blurry_photo_sharper(tmp_path):
    """`jaxdeblur deblur --method mcem` with its defaults on a 16-bit gray PNG of a
    motion-blurred camera crop, stderr redirected (not a terminal): progress lines per
    pyramid level with the time left, and a sharper photo of the same size and depth.

    The blur is the valid part of a 12 px line kernel (15x15) applied to a larger crop,
    noise 0.01.
    """
    import skimage.data
    import skimage.transform
    k, size = 15, 64
    photo = skimage.transform.rescale(skimage.data.camera().astype(np.float32) / 255.0, 0.5,
                                      anti_aliasing=True)
    big = photo[90:90 + size + k - 1, 90:90 + size + k - 1]
    kernel = np.asarray(kernels.line_kernel(k, 12, 0.6), np.float64)
    blurry = sum(kernel[i, j] * big[i:i + size, j:j + size] for i in range(k) for j in range(k))
    blurry = np.clip(blurry + 0.01 * np.random.default_rng(0).normal(size=blurry.shape), 0, 1)
    sharp = big[7:7 + size, 7:7 + size]
    (tmp_path / "in").mkdir()
    Image.fromarray((blurry * 65535).round().astype(np.uint16)).save(tmp_path / "in" / "b.png")
    out = tmp_path / "out"
    result = run_cli(
        "deblur", tmp_path / "in" / "b.png", "--method", "mcem", "-o", out, "--device", "cpu",
        "--figures", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "kernel level 1/" in result.stderr and "s left)" in result.stderr, result.stderr
    assert "restoring 64x64x1" in result.stderr and (out / "b_kernels.png").exists()
    # The photo's noise measured and the prior's weight set from it (0.1 σ above the floor).
    found = re.search(r"noise (0\.\d+), prior weight ([\d.e+-]+)", result.stderr)
    assert found and 0.007 < float(found[1]) < 0.013, result.stderr[-3000:]
    assert float(found[2]) == pytest.approx(0.1 * float(found[1]), rel=0.06)
    with Image.open(out / "b.png") as im:
        assert im.size == (size, size) and im.mode.startswith("I")
        restored = np.asarray(im).astype(np.float64) / 65535

    def psnr(x, m=3):
        # Blind deblurring recovers the image up to a shift: best integer shift within
        # +-m px (the evaluation protocols of SPEC.md §5 search up to 10 px).
        x, ref = x[..., None].astype(np.float32), sharp[..., None].astype(np.float32)
        if m == 0:
            return float(metrics.psnr(x, ref))
        return float(metrics.shift_searched_psnr(x, ref, crop=m, max_shift=m, step=1.0))

    print(f"blurry {psnr(blurry):.2f} dB -> restored {psnr(restored):.2f} dB (aligned), "
          f"{psnr(blurry, 0):.2f} -> {psnr(restored, 0):.2f} dB (unaligned)")
    # Measured 18.70 -> 22.14 dB aligned (the paper's MCEM, 400 iterations and hand-set
    # networks, took 3 min for 20.06 dB on this crop).
    assert psnr(restored) > psnr(blurry) + 2.5


def test_mcem_command_resumes_after_sigterm(tmp_path):
    """SIGTERM in the middle of the second of the two kernel estimates (the size is given,
    so the candidates differ only in the non-negative fit) saves the state; the same
    command then goes on from it and writes the photo the uninterrupted run writes, bit for
    bit; a third run skips the finished photo."""
    import signal
    import skimage.data
    k, size = 9, 96
    scene = skimage.data.camera().astype(np.float32)[100:100 + size + k - 1,
                                                     200:200 + size + k - 1] / 255.0
    kernel = np.asarray(kernels.line_kernel(k, 7, 0.3), np.float64)
    blurry = sum(kernel[i, j] * scene[i:i + size, j:j + size]
                 for i in range(k) for j in range(k))
    (tmp_path / "in").mkdir()
    Image.fromarray((np.clip(blurry, 0, 1) * 255).round().astype(np.uint8)).save(
        tmp_path / "in" / "b.png")
    args = ["deblur", tmp_path / "in" / "b.png", "--method", "mcem", "--device", "cpu",
            "--set", "kernel_size=13", "--set", "estimation.iterations=6"]

    whole = run_cli(*args, "-o", tmp_path / "whole", timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]

    out = tmp_path / "resumed"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-m", "jaxdeblur.cli", *map(str, args), "-o",
                             str(out)], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if "estimate 2/2, kernel level 3/" in line:
                proc.send_signal(signal.SIGTERM)
                break
        seen.append(proc.stderr.read())
        proc.wait(timeout=120)
    finally:
        proc.kill()
    stderr = "".join(seen)
    assert proc.returncode == 130, stderr
    assert "run the same command again" in stderr, stderr
    assert (out / ".jaxdeblur-state" / "b.png.npz").exists() and not (out / "b.png").exists()

    again = run_cli(*args, "-o", out, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    # the state holds the first estimate's kernel and the second's progress
    assert "resuming from" in again.stderr and "estimate 2 at level 3" in again.stderr, \
        again.stderr
    with Image.open(out / "b.png") as a, Image.open(tmp_path / "whole" / "b.png") as b:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    third = run_cli(*args, "-o", out, timeout=600)
    assert third.returncode == 0 and "finished by an earlier run; skipped" in third.stderr, \
        third.stderr


def test_stop_signals_are_deferred_only_within_a_resumable_run():
    """Outside a resumable run a signal stops at once; inside, the first only asks the run
    to stop before its next iteration (a KeyboardInterrupt raised inside JAX's C++ code
    would reach the command as another error), and a second stops at once."""
    import signal
    stop = cli._StopSignals()
    with pytest.raises(KeyboardInterrupt):
        stop.handle(signal.SIGTERM, None)
    assert stop.requested()
    stop.reset()
    with stop.deferred():
        stop.handle(signal.SIGTERM, None)
        assert stop.requested()
        with pytest.raises(KeyboardInterrupt):
            stop.handle(signal.SIGINT, None)
    assert stop.requested()
    stop.reset()
    assert not stop.requested()
