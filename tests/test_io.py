"""Tests for jaxdeblur.io: reading and writing images of every supported kind."""

import numpy as np
import pytest
from PIL import Image

from jaxdeblur import io


def _rgb8(h=6, w=7):
    return np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_reads_8bit_rgb_png(tmp_path):
    pixels = _rgb8()
    Image.fromarray(pixels).save(tmp_path / "a.png")
    image = io.read_image(tmp_path / "a.png")
    assert image.shape == (6, 7, 3) and image.dtype == np.float32
    np.testing.assert_allclose(image, pixels / 255.0, atol=1e-7)
    info = io.read_image_info(tmp_path / "a.png")
    assert info == io.ImageInfo(6, 7, 3, False, 8, "RGB", "PNG", 1)


def test_reads_16bit_gray_png(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 65536, (5, 4), dtype=np.uint16)
    Image.fromarray(pixels).save(tmp_path / "g16.png")
    image = io.read_image(tmp_path / "g16.png")
    assert image.shape == (5, 4, 1)
    np.testing.assert_allclose(image[..., 0], pixels / 65535.0, atol=1e-7)
    assert io.read_image_info(tmp_path / "g16.png").bit_depth == 16
    assert io.read_image(tmp_path / "g16.png", channels=3).shape == (5, 4, 3)


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_16bit_png_round_trip_keeps_every_bit(tmp_path, channels):
    values = np.random.default_rng(channels).integers(0, 65536, (9, 5, channels)) / 65535.0
    io.write_image(tmp_path / "x.png", values, bit_depth=16)
    image, alpha = io.read_image(tmp_path / "x.png", return_alpha=True)
    color = channels - (1 if channels in (2, 4) else 0)
    np.testing.assert_allclose(image, values[..., :color], atol=1e-7)
    if channels in (2, 4):
        np.testing.assert_allclose(alpha, values[..., -1], atol=1e-7)
    else:
        assert alpha is None
    info = io.read_image_info(tmp_path / "x.png")
    assert info.bit_depth == 16 and info.channels == color
    # Pillow agrees on the 8-bit view of the same file.
    with Image.open(tmp_path / "x.png") as pil:
        if pil.mode in ("RGB", "RGBA"):
            np.testing.assert_array_equal(np.asarray(pil)[..., :color],
                                          np.round(values[..., :color] * 65535).astype(
                                              np.uint16) >> 8)


def test_png16_decoder_reverses_every_scanline_filter():
    rng = np.random.default_rng(2)
    previous = rng.integers(0, 256, 12, dtype=np.uint8)
    original = rng.integers(0, 256, 12, dtype=np.uint8)
    bpp = 6

    def paeth(a, b, c):
        p = a + b - c
        pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
        return a if pa <= pb and pa <= pc else (b if pb <= pc else c)

    left = lambda i: int(original[i - bpp]) if i >= bpp else 0
    upper_left = lambda i: int(previous[i - bpp]) if i >= bpp else 0
    predictors = {
        1: [left(i) for i in range(12)],
        2: [int(previous[i]) for i in range(12)],
        3: [(left(i) + int(previous[i])) // 2 for i in range(12)],
        4: [paeth(left(i), int(previous[i]), upper_left(i)) for i in range(12)],
    }
    for kind, predictor in predictors.items():
        filtered = ((original.astype(int) - np.array(predictor)) % 256).astype(np.uint8)
        np.testing.assert_array_equal(io._unfilter_row(kind, filtered, previous, bpp), original)


def test_reads_jpeg_and_grayscale_conversions(tmp_path):
    pixels = np.full((8, 8, 3), (200, 100, 50), np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.jpg", quality=100)
    image = io.read_image(tmp_path / "a.jpg")
    assert image.shape == (8, 8, 3)
    np.testing.assert_allclose(image, pixels / 255.0, atol=3 / 255)
    gray = io.read_image(tmp_path / "a.jpg", channels=1)
    np.testing.assert_allclose(gray[..., 0], image @ np.array([0.299, 0.587, 0.114]),
                               atol=1e-6)
    with pytest.raises(ValueError, match="channels"):
        io.read_image(tmp_path / "a.jpg", channels=2)


def test_reads_rgba_and_gray_alpha(tmp_path):
    rgba = np.random.default_rng(3).integers(0, 256, (4, 5, 4), dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    image, alpha = io.read_image(tmp_path / "a.png", return_alpha=True)
    np.testing.assert_allclose(image, rgba[..., :3] / 255.0, atol=1e-7)
    np.testing.assert_allclose(alpha, rgba[..., 3] / 255.0, atol=1e-7)
    assert io.read_image(tmp_path / "a.png").shape == (4, 5, 3)
    assert io.read_image_info(tmp_path / "a.png").has_alpha
    loaded = io.load_image(tmp_path / "a.png", channels=1)
    assert loaded.image.shape == (4, 5, 1) and loaded.info.mode == "RGBA"
    np.testing.assert_array_equal(loaded.alpha, alpha)
    Image.fromarray(rgba[..., :2], mode="LA").save(tmp_path / "la.png")
    image, alpha = io.read_image(tmp_path / "la.png", return_alpha=True)
    assert image.shape == (4, 5, 1)
    np.testing.assert_allclose(alpha, rgba[..., 1] / 255.0, atol=1e-7)


def test_reads_palette_and_bilevel(tmp_path):
    pixels = _rgb8()
    Image.fromarray(pixels).convert("P").save(tmp_path / "p.png")
    assert io.read_image(tmp_path / "p.png").shape == (6, 7, 3)
    Image.fromarray(pixels[..., 0] > 128).save(tmp_path / "b.png")
    bilevel = io.read_image(tmp_path / "b.png")
    assert bilevel.shape == (6, 7, 1)
    np.testing.assert_array_equal(bilevel[..., 0], (pixels[..., 0] > 128).astype(np.float32))


@pytest.mark.parametrize("bit_depth", [8, 16])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_tiff_round_trip(tmp_path, bit_depth, channels):
    full = (1 << bit_depth) - 1
    values = np.random.default_rng(4).integers(0, full + 1, (6, 5, channels)) / full
    io.write_image(tmp_path / "x.tif", values, bit_depth=bit_depth)
    image, alpha = io.read_image(tmp_path / "x.tif", return_alpha=True)
    color = 3 if channels == 4 else channels
    np.testing.assert_allclose(image, values[..., :color], atol=1e-7)
    if channels == 4:
        np.testing.assert_allclose(alpha, values[..., 3], atol=1e-7)
    assert io.read_image_info(tmp_path / "x.tif").bit_depth == bit_depth


def test_reads_tiff_written_by_pillow(tmp_path):
    pixels = _rgb8()
    Image.fromarray(pixels).save(tmp_path / "p.tiff")
    np.testing.assert_allclose(io.read_image(tmp_path / "p.tiff"), pixels / 255.0, atol=1e-7)


def test_exif_orientation_is_applied(tmp_path):
    pixels = _rgb8(4, 6)
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90° clockwise
    Image.fromarray(pixels).save(tmp_path / "o.png", exif=exif)
    image = io.read_image(tmp_path / "o.png")
    np.testing.assert_allclose(image, np.rot90(pixels, k=-1) / 255.0, atol=1e-7)
    assert io.read_image_info(tmp_path / "o.png").orientation == 6
    Image.fromarray(pixels).save(tmp_path / "o.jpg", exif=exif)
    assert io.read_image(tmp_path / "o.jpg").shape == (6, 4, 3)


def test_write_image_8bit_round_trip_and_alpha(tmp_path):
    values = np.random.default_rng(5).integers(0, 256, (5, 6, 3)) / 255.0
    alpha = np.linspace(0, 1, 30).reshape(5, 6)
    io.write_image(tmp_path / "w.png", values, alpha=alpha)
    image, read_alpha = io.read_image(tmp_path / "w.png", return_alpha=True)
    np.testing.assert_allclose(image, values, atol=1e-7)
    np.testing.assert_allclose(read_alpha, np.round(alpha * 255) / 255, atol=1e-7)
    io.write_image(tmp_path / "g.png", values[..., 0])
    assert io.read_image(tmp_path / "g.png").shape == (5, 6, 1)


def test_write_image_rejects_bad_requests(tmp_path):
    with pytest.raises(ValueError, match="bit_depth"):
        io.write_image(tmp_path / "a.png", np.zeros((4, 4, 3)), bit_depth=12)
    with pytest.raises(ValueError, match="16-bit"):
        io.write_image(tmp_path / "a.jpg", np.zeros((4, 4, 3)), bit_depth=16)
    with pytest.raises(ValueError, match="alpha"):
        io.write_image(tmp_path / "a.jpg", np.zeros((4, 4, 4)))
    with pytest.raises(ValueError, match="shape"):
        io.write_image(tmp_path / "a.png", np.zeros((4, 4, 5)))


def test_read_errors_are_clear(tmp_path):
    with pytest.raises(io.ImageReadError, match="does not exist"):
        io.read_image(tmp_path / "missing.png")
    with pytest.raises(io.ImageReadError, match="directory"):
        io.read_image(tmp_path)
    (tmp_path / "notes.png").write_text("not an image at all")
    with pytest.raises(io.ImageReadError, match="not a recognised image"):
        io.read_image(tmp_path / "notes.png")
    Image.fromarray(_rgb8(64, 64)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[:len(data) // 2])
    with pytest.raises(io.ImageReadError, match="corrupt or truncated"):
        io.read_image(tmp_path / "cut.png")
    Image.fromarray(_rgb8(64, 64)).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[:len(data) // 2])
    with pytest.raises(io.ImageReadError, match="corrupt or truncated"):
        io.read_image(tmp_path / "cut.jpg")
    io.write_image(tmp_path / "c16.png", np.full((8, 8, 3), 0.5), bit_depth=16)
    data = bytearray((tmp_path / "c16.png").read_bytes())
    data[50] ^= 0xFF  # inside the IDAT payload: the CRC no longer matches
    (tmp_path / "c16_bad.png").write_bytes(bytes(data))
    with pytest.raises(io.ImageReadError, match="corrupt"):
        io.read_image(tmp_path / "c16_bad.png")
    (tmp_path / "bad.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(io.ImageReadError, match="TIFF"):
        io.read_image(tmp_path / "bad.tif")
    # The error is both a ValueError and an OSError, so either handler catches it.
    assert issubclass(io.ImageReadError, ValueError) and issubclass(io.ImageReadError, OSError)


def test_unsupported_mode_is_reported(tmp_path):
    Image.fromarray(np.zeros((4, 4), np.int32), mode="I").save(tmp_path / "i.tif")
    with pytest.raises(io.ImageReadError, match="int32"):
        io.read_image(tmp_path / "i.tif")


def test_list_images(tmp_path):
    for name in ("b.png", "a.JPG", "c.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.tif").write_bytes(b"x")
    assert [p.name for p in io.list_images(tmp_path)] == ["a.JPG", "b.png"]
    assert [p.name for p in io.list_images(tmp_path, recursive=True)] == [
        "a.JPG", "b.png", "d.tif"]
    assert [p.name for p in io.list_images(str(tmp_path / "*.png"))] == ["b.png"]
    assert io.list_images(tmp_path / "b.png") == [tmp_path / "b.png"]
    with pytest.raises(FileNotFoundError):
        io.list_images(tmp_path / "nowhere")
