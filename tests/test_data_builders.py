"""TFDS builders of the real data sets, on tiny fake trees in their documented layouts.

Every fake pair encodes its identity in the pixels: blurry = id, sharp = id + 100 (uint8), so
reading one record back checks the pairing as well as the split sizes.
"""

import pathlib
import subprocess
import sys

import numpy as np
import pytest
import scipy.io
from PIL import Image

from data_pipelines import build, paired, pipeline

H, W = 6, 8


def _png(path: pathlib.Path, value: int, shape=(H, W, 3)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(shape, value, np.uint8).squeeze()).save(path)


class _Ids:
    """Hands out pixel ids 1, 2, ... for blurry images (sharp = id + 100)."""

    def __init__(self):
        self.value = 0

    def __call__(self):
        self.value += 1
        return self.value


def _pair(blurry: pathlib.Path, sharp: pathlib.Path, ids: _Ids) -> None:
    value = ids()
    _png(blurry, value)
    _png(sharp, value + 100)


def gopro_tree(root, ids):
    for split, sequences in (("train", 2), ("test", 1)):
        for sequence in range(sequences):
            for frame in range(2):
                folder = root / split / f"GOPR{sequence:04d}_00"
                _pair(folder / "blur" / f"{frame:06d}.png",
                      folder / "sharp" / f"{frame:06d}.png", ids)
                _png(folder / "blur_gamma" / f"{frame:06d}.png", 7)
    return {"train": 4, "test": 2}


def hide_tree(root, ids):
    for folder, count in (("train", 3), ("test/test-close-ups", 2),
                          ("test/test-long-shot", 1)):
        for i in range(count):
            name = f"{folder.split('/')[-1]}{i}fromGOPR0950.png"
            _pair(root / folder / name, root / "GT" / name, ids)
    return {"train": 3, "test_close_ups": 2, "test_long_shot": 1}


def _realblur_tree(variant):
    def tree(root, ids):
        prefix = f"RealBlur-{variant}_ECC_IMCORR_centroid_itensity_ref"
        for split, scenes in (("train", (1, 2)), ("test", (3,))):
            lines = []
            for scene in scenes:
                for i in (1, 2):
                    gt = f"{prefix}/scene{scene:03d}/gt/gt_{i}.png"
                    blur = f"{prefix}/scene{scene:03d}/blur/blur_{i}.png"
                    _pair(root / blur, root / gt, ids)
                    lines.append(f"{gt} {blur}")
            (root / f"RealBlur_{variant}_{split}_list.txt").write_text("\n".join(lines) + "\n")
        return {"train": 4, "test": 2}
    return tree


def kohler_tree(root, ids):
    for image in (1, 2):
        for shake in (1, 2, 3):
            value = ids()
            _png(root / "BlurryImages" / f"Blurry{image}_{shake}.png", value)
            for frame in range(1, 6):
                _png(root / "GroundTruth" / f"GroundTruth{image}_{shake}_{frame}.png",
                     value + 100 + frame)
    return {"test": 6}


def lai_tree(root, ids):
    for name in ("manmade_01", "text_1", "text_10"):
        _png(root / "ground_truth" / f"{name}.png", 0)
    kernels = {1: np.eye(5, dtype=np.uint8) * 255, 2: np.pad(np.full((1, 3), 255, np.uint8),
                                                             ((1, 1), (0, 0)))}
    for kk, kernel in kernels.items():
        (root / "kernel").mkdir(parents=True, exist_ok=True)
        Image.fromarray(kernel).save(root / "kernel" / f"kernel_{kk:02d}.png")
    for name in ("manmade_01", "text_1", "text_10"):
        value = ids()
        _png(root / "ground_truth" / f"{name}.png", value + 100)
        for kk in kernels:
            _png(root / "uniform" / f"{name}_kernel_{kk:02d}.png", value)
        _png(root / "nonuniform" / f"{name}_kernel_01.png", value)
    _png(root / "real" / "boat.png", 3)
    return {"uniform": 6, "nonuniform": 3, "real": 1}


def levin_tree(root, ids):
    root.mkdir(parents=True, exist_ok=True)
    sizes = (3, 5)
    for i in (5, 6):
        for j, size in enumerate(sizes, 1):
            value = ids()
            kernel = np.zeros((size, size))
            kernel[size // 2] = 2.0
            scipy.io.savemat(root / f"im{i:02d}_flit{j:02d}.mat",
                             {"x": np.full((H, W), (value + 100) / 255.0),
                              "y": np.full((H, W), value / 255.0), "f": kernel})
    return {"test": 4}


def paired_folder_tree(root, ids):
    for split, count in (("train", 3), ("test", 1)):
        for i in range(count):
            _pair(root / split / "blurry" / f"{i}.png", root / split / "sharp" / f"{i}.png", ids)
    return {"train": 3, "test": 1}


TREES = {"gopro": gopro_tree, "hide": hide_tree, "realblur_j": _realblur_tree("J"),
         "realblur_r": _realblur_tree("R"), "kohler": kohler_tree, "lai": lai_tree,
         "levin": levin_tree, "paired_folder": paired_folder_tree}


@pytest.mark.parametrize("name", sorted(TREES))
def test_builder_prepares_and_reads_fake_tree(name, tmp_path):
    manual, data = tmp_path / "manual", tmp_path / "data"
    sizes = TREES[name](manual, _Ids())
    config = "every_10th_frame" if name == "kohler" else None
    build.build_dataset(name, data_dir=data, manual_dir=manual, config=config)
    assert sorted(p.name for p in data.iterdir()) == [name]  # Nothing else left behind.
    channels = 1 if name == "levin" else 3
    for split, size in sizes.items():
        source = pipeline.load_split(name, split, data)
        assert len(source) == size, split
        for record in source:
            blurry, sharp = record["blurry"], record["sharp"]
            assert blurry.dtype == np.uint8 and blurry.shape == (H, W, channels)
            if split == "real":
                assert sharp.shape == (0, 0, 3)
                continue
            assert sharp.shape == blurry.shape
            # Köhler: every 10th of 5 frames keeps frame 1 only, which is then `sharp`.
            offset = 101 if name == "kohler" else 100
            np.testing.assert_array_equal(sharp.astype(int) - blurry.astype(int), offset)


def test_kohler_keeps_all_frames_in_order(tmp_path):
    kohler_tree(tmp_path / "manual", _Ids())
    build.build_dataset("kohler", data_dir=tmp_path / "data", manual_dir=tmp_path / "manual",
                        config="all_frames")
    record = pipeline.load_split("kohler", "test", tmp_path / "data", config="all_frames")[0]
    frames = record["sharp_frames"]
    assert frames.shape == (5, H, W, 3)
    np.testing.assert_array_equal(frames[:, 0, 0, 0] - record["blurry"][0, 0, 0],
                                  [101, 102, 103, 104, 105])


def test_kernels_of_lai_and_levin(tmp_path):
    lai_tree(tmp_path / "lai", _Ids())
    levin_tree(tmp_path / "levin", _Ids())
    for name in ("lai", "levin"):
        build.build_dataset(name, data_dir=tmp_path / "data", manual_dir=tmp_path / name)
    uniform = pipeline.load_split("lai", "uniform", tmp_path / "data")
    by_name = {r["name"].decode(): r["kernel"] for r in uniform}
    np.testing.assert_allclose(by_name["uniform/text_10_kernel_01.png"], np.eye(5) / 5,
                               atol=1e-7)
    assert by_name["uniform/text_1_kernel_02.png"].shape == (3, 3)
    for record in pipeline.load_split("lai", "nonuniform", tmp_path / "data"):
        assert record["kernel"].shape == (0, 0)
    for record in pipeline.load_split("levin", "test", tmp_path / "data"):
        kernel = record["kernel"]
        assert kernel.dtype == np.float32 and kernel.shape[0] in (3, 5)
        np.testing.assert_allclose(kernel.sum(), 1.0, atol=1e-6)


def test_hide_test_splits_combine(tmp_path):
    hide_tree(tmp_path / "manual", _Ids())
    build.build_dataset("hide", data_dir=tmp_path / "data", manual_dir=tmp_path / "manual")
    both = pipeline.load_split("hide", "test_close_ups+test_long_shot", tmp_path / "data")
    assert len(both) == 3


def test_paired_folder_flat_layout_matches_by_stem(tmp_path):
    manual = tmp_path / "manual"
    _png(manual / "blurry" / "a.png", 1)
    _png(manual / "sharp" / "a.png", 101)
    _png(manual / "blurry" / "b.jpg", 2)
    _png(manual / "sharp" / "b.png", 102)
    build.build_dataset("paired_folder", data_dir=tmp_path / "data", manual_dir=manual)
    assert len(pipeline.load_split("paired_folder", "train", tmp_path / "data")) == 2


def _assert_nothing_written(data: pathlib.Path) -> None:
    assert not data.exists() or not any(data.iterdir()), sorted(data.rglob("*"))


def test_missing_manual_dir_says_where_to_download(tmp_path):
    data = tmp_path / "data"
    with pytest.raises(paired.DatasetLayoutError,
                       match=r"(?s)does not exist.*seungjunnah\.github\.io.*blur/<frame>\.png"):
        build.build_dataset("gopro", data_dir=data, manual_dir=tmp_path / "nowhere")
    _assert_nothing_written(data)
    with pytest.raises(paired.DatasetLayoutError, match="needs manual_dir"):
        build.build_dataset("levin", data_dir=data)
    _assert_nothing_written(data)


def test_wrong_layout_finds_no_images(tmp_path):
    _png(tmp_path / "manual" / "somewhere" / "x.png", 1)
    with pytest.raises(paired.DatasetLayoutError, match=r"(?s)no blurry images.*GT/<name>"):
        build.build_dataset("hide", data_dir=tmp_path / "data", manual_dir=tmp_path / "manual")
    _assert_nothing_written(tmp_path / "data")


def test_blurry_without_sharp_partner_are_listed(tmp_path):
    manual = tmp_path / "manual"
    gopro_tree(manual, _Ids())
    (manual / "train" / "GOPR0000_00" / "sharp" / "000001.png").unlink()
    (manual / "test" / "GOPR0000_00" / "sharp" / "000000.png").unlink()
    (tmp_path / "data").mkdir()
    with pytest.raises(paired.DatasetLayoutError) as error:
        build.build_dataset("gopro", data_dir=tmp_path / "data", manual_dir=manual)
    message = str(error.value)
    assert "2 blurry image(s)" in message
    assert "train/GOPR0000_00/blur/000001.png" in message
    assert "test/GOPR0000_00/blur/000000.png" in message
    _assert_nothing_written(tmp_path / "data")


def test_realblur_list_naming_missing_blurry(tmp_path):
    manual = tmp_path / "manual"
    _realblur_tree("J")(manual, _Ids())
    with open(manual / "RealBlur_J_test_list.txt", "a") as listing:
        listing.write("x/gt/gt_9.png x/blur/blur_9.png\n")
    with pytest.raises(paired.DatasetLayoutError, match="(?s)missing.*x/blur/blur_9.png"):
        build.build_dataset("realblur_j", data_dir=tmp_path / "data", manual_dir=manual)
    _assert_nothing_written(tmp_path / "data")


def test_mismatched_sizes_are_listed(tmp_path):
    manual = tmp_path / "manual"
    paired_folder_tree(manual, _Ids())
    _png(manual / "train" / "sharp" / "1.png", 0, shape=(H + 2, W, 3))
    with pytest.raises(paired.DatasetLayoutError,
                       match=r"(?s)1 blurry/sharp pair\(s\) differ in size.*train/blurry/1\.png "
                             r"\(6, 8\) vs .*sharp/1\.png \(8, 8\)"):
        build.build_dataset("paired_folder", data_dir=tmp_path / "data", manual_dir=manual)
    _assert_nothing_written(tmp_path / "data")


def test_unreadable_files(tmp_path):
    manual = tmp_path / "manual"
    paired_folder_tree(manual, _Ids())
    (manual / "train" / "sharp" / "0.png").write_bytes(b"not an image")
    with pytest.raises(paired.DatasetLayoutError, match=r"cannot read image .*sharp/0\.png"):
        build.build_dataset("paired_folder", data_dir=tmp_path / "data", manual_dir=manual)
    _assert_nothing_written(tmp_path / "data")


def test_truncated_file_fails_while_writing_and_leaves_nothing(tmp_path):
    manual = tmp_path / "manual"
    paired_folder_tree(manual, _Ids())
    target = manual / "test" / "blurry" / "0.png"
    target.write_bytes(target.read_bytes()[:40])  # PNG signature + IHDR intact, no data.
    data = tmp_path / "data"
    data.mkdir()
    (data / "other_dataset").mkdir()  # Someone else's data must survive.
    with pytest.raises(paired.DatasetLayoutError, match=r"cannot read image .*blurry/0\.png"):
        build.build_dataset("paired_folder", data_dir=data, manual_dir=manual)
    assert sorted(p.name for p in data.iterdir()) == ["other_dataset"]


def test_rebuild_needs_overwrite(tmp_path):
    manual, data = tmp_path / "manual", tmp_path / "data"
    paired_folder_tree(manual, _Ids())
    build.build_dataset("paired_folder", data_dir=data, manual_dir=manual)
    with pytest.raises(FileExistsError, match="overwrite"):
        build.build_dataset("paired_folder", data_dir=data, manual_dir=manual)
    _png(manual / "test" / "blurry" / "5.png", 9)
    _png(manual / "test" / "sharp" / "5.png", 109)
    build.build_dataset("paired_folder", data_dir=data, manual_dir=manual, overwrite=True)
    assert len(pipeline.load_split("paired_folder", "test", data)) == 2
    assert sorted(p.name for p in data.iterdir()) == ["paired_folder"]


def test_unknown_name_and_missing_data():
    with pytest.raises(ValueError, match="unknown data set 'gopr'"):
        build.builder_class("gopr")
    with pytest.raises(FileNotFoundError, match="python -m data_pipelines.build gopro"):
        pipeline.load_split("gopro", "train", "/nonexistent")


def test_command_line(tmp_path):
    manual, data = tmp_path / "manual", tmp_path / "data"
    paired_folder_tree(manual, _Ids())
    result = subprocess.run(
        [sys.executable, "-m", "data_pipelines.build", "paired_folder", "--data_dir",
         str(data), "--manual_dir", str(manual)], capture_output=True, text=True,
        cwd=pathlib.Path(__file__).resolve().parents[1], check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"prepared {data}/paired_folder/1.0.0" in result.stdout
    assert len(pipeline.load_split("paired_folder", "train", data)) == 3


def test_dataset_dir_resolves_configs_and_versions(tmp_path):
    for folder in ("synthetic_blur/default/1.0.0", "synthetic_blur/default/1.10.0",
                   "synthetic_blur/tiny/1.2.0", "gopro/1.0.0"):
        (tmp_path / folder).mkdir(parents=True)
    assert pipeline.dataset_dir("gopro", tmp_path) == tmp_path / "gopro/1.0.0"
    assert pipeline.dataset_dir("synthetic_blur", tmp_path, config="default") == \
        tmp_path / "synthetic_blur/default/1.10.0"
    assert pipeline.dataset_dir("synthetic_blur", tmp_path, config="default",
                                version="1.0.0") == tmp_path / "synthetic_blur/default/1.0.0"
    with pytest.raises(FileNotFoundError, match=r"configs \['default', 'tiny'\]; pass config="):
        pipeline.dataset_dir("synthetic_blur", tmp_path)
    with pytest.raises(FileNotFoundError, match="no prepared version 2.0.0"):
        pipeline.dataset_dir("gopro", tmp_path, version="2.0.0")
