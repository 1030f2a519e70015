"""Reading and writing images as float32 ``(H, W, C)`` arrays in [0, 1].

Conversions (all documented here once):

* integers are divided by their full scale: 8-bit by 255, 16-bit by 65535; bilevel
  images give 0 or 1; 32-bit float TIFFs are returned as stored (no rescaling, no clip);
* grayscale stays one channel (``C = 1``) unless ``channels=3`` replicates it; colour
  becomes gray with ``channels=1`` using ITU-R BT.601 luma ``0.299 R + 0.587 G + 0.114 B``
  (what ``PIL.Image.convert("L")`` does, but on the full-precision values);
* palette images are expanded to RGB (RGBA when they carry transparency); CMYK, YCbCr and
  LAB files are converted to RGB by Pillow;
* an alpha channel (LA, RGBA, transparency) is never mixed into the colour channels: it is
  dropped by `read_image`, or returned separately with ``return_alpha=True``;
* the EXIF orientation tag is applied (``PIL.ImageOps.exif_transpose``; TIFF orientation
  tags likewise), so the array is upright as a viewer shows it;
* multi-frame files (animated PNG/GIF, multi-page TIFF) give their first frame.

Pillow reads 16-bit colour PNGs as 8-bit, so those are decoded here from the PNG chunks
(zlib + scanline filters, non-interlaced); TIFFs are read with ``tifffile`` (a dependency
of scikit-image), which keeps 16-bit colour and float samples. 16-bit PNGs are written by
the same small PNG encoder.
"""

import glob
import os
import pathlib
import struct
import zlib
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".ppm",
                    ".pgm", ".gif")

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PNG colour types: number of samples per pixel.
_PNG_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}
# ITU-R BT.601 luma, as PIL's convert("L").
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
_TIFF_SUFFIXES = (".tif", ".tiff")
# Lossily compressed formats (`ImageInfo.format`, Pillow's names; MPO is a camera's
# multi-picture JPEG): their errors are not white noise (`photo.restoration_weight`).
LOSSY_FORMATS = ("JPEG", "MPO", "WEBP")


class ImageReadError(ValueError, OSError):
    """An image file is missing, unreadable, corrupt or of an unsupported kind."""


class ImageInfo(NamedTuple):
    """What a file holds, before any conversion.

    Attributes:
      height, width: size after the EXIF orientation is applied.
      channels: colour channels (1 gray, 3 colour), alpha not counted.
      has_alpha: whether the file carries an alpha channel or transparency.
      bit_depth: bits per sample (1, 8, 16 or 32).
      mode: Pillow's mode (``"L"``, ``"RGB"``, ``"I;16"``, ...), or ``"tiff:<dtype>x<n>"``
        for TIFFs read with tifffile, ``"png16:<colour type>"`` for 16-bit colour PNGs.
      format: the file format (``"PNG"``, ``"JPEG"``, ``"TIFF"``, ...).
      orientation: the EXIF orientation tag (1 = upright), applied by `read_image`.
    """
    height: int
    width: int
    channels: int
    has_alpha: bool
    bit_depth: int
    mode: str
    format: str
    orientation: int


class _Decoded(NamedTuple):
    color: np.ndarray  # (H, W, C) float32, C in {1, 3}
    alpha: np.ndarray | None  # (H, W) float32
    info: ImageInfo


def _check_path(path) -> pathlib.Path:
    path = pathlib.Path(path)
    if not path.exists():
        raise ImageReadError(f"image file {str(path)!r} does not exist")
    if path.is_dir():
        raise ImageReadError(f"{str(path)!r} is a directory, not an image file; use "
                             "list_images to find the images in it")
    if not os.access(path, os.R_OK):
        raise ImageReadError(f"image file {str(path)!r} is not readable (permissions)")
    return path


# ---------------------------------------------------------------------------- PNG 16 bit


def _png_chunks(data: bytes, path):
    if not data.startswith(_PNG_SIGNATURE):
        raise ImageReadError(f"{str(path)!r} is not a PNG file")
    position = len(_PNG_SIGNATURE)
    while position + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        body = data[position + 8:position + 8 + length]
        crc = data[position + 8 + length:position + 12 + length]
        if len(body) != length or len(crc) != 4:
            raise ImageReadError(f"PNG file {str(path)!r} is truncated in chunk {kind!r}")
        if struct.unpack(">I", crc)[0] != zlib.crc32(kind + body) & 0xFFFFFFFF:
            raise ImageReadError(f"PNG file {str(path)!r} is corrupt (bad CRC in {kind!r})")
        yield kind, body
        if kind == b"IEND":
            return
        position += 12 + length
    raise ImageReadError(f"PNG file {str(path)!r} is truncated (no IEND chunk)")


def _png_header(data: bytes):
    """(width, height, bit depth, colour type, interlace) of a PNG, or None."""
    if not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR" or len(data) < 29:
        return None
    width, height, depth, color_type, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
    return width, height, depth, color_type, interlace


def _unfilter_row(kind, row, previous, bpp):
    """Reverses one PNG scanline filter (PNG spec §9); rows are uint8 arrays."""
    if kind == 0:
        return row
    if kind == 2:
        return row + previous  # uint8 arithmetic wraps modulo 256 as the spec requires
    if kind == 1:
        pixels = row.reshape(-1, bpp).astype(np.uint32)
        return (np.cumsum(pixels, axis=0) % 256).astype(np.uint8).reshape(-1)
    # Average and Paeth depend on the reconstructed left neighbour: a sequential loop.
    out = bytearray(row.tobytes())
    above = previous.tolist()
    for i in range(len(out)):
        left = out[i - bpp] if i >= bpp else 0
        if kind == 3:
            out[i] = (out[i] + ((left + above[i]) >> 1)) & 0xFF
        elif kind == 4:
            upper_left = above[i - bpp] if i >= bpp else 0
            estimate = left + above[i] - upper_left
            pa, pb, pc = abs(estimate - left), abs(estimate - above[i]), abs(
                estimate - upper_left)
            predictor = left if pa <= pb and pa <= pc else (above[i] if pb <= pc else
                                                            upper_left)
            out[i] = (out[i] + predictor) & 0xFF
        else:
            raise ValueError(f"unknown PNG filter type {kind}")
    return np.frombuffer(bytes(out), np.uint8)


def _decode_png16(path, data: bytes) -> np.ndarray:
    """Decodes a non-interlaced 16-bit PNG to ``(H, W, samples)`` uint16."""
    header = _png_header(data)
    width, height, _, color_type, interlace = header
    if interlace:
        raise ImageReadError(f"16-bit interlaced PNG {str(path)!r} is not supported; "
                             "re-save it without interlacing")
    compressed = b"".join(body for kind, body in _png_chunks(data, path) if kind == b"IDAT")
    try:
        raw = zlib.decompress(compressed)
    except zlib.error as error:
        raise ImageReadError(f"PNG file {str(path)!r} is corrupt: {error}") from error
    samples = _PNG_CHANNELS[color_type]
    bpp = 2 * samples
    stride = 1 + width * bpp
    if len(raw) < stride * height:
        raise ImageReadError(f"PNG file {str(path)!r} is truncated (image data too short)")
    rows = np.frombuffer(raw[:stride * height], np.uint8).reshape(height, stride)
    previous = np.zeros(width * bpp, np.uint8)
    out = np.empty((height, width * bpp), np.uint8)
    for r in range(height):
        try:
            previous = _unfilter_row(int(rows[r, 0]), rows[r, 1:], previous, bpp)
        except ValueError as error:
            raise ImageReadError(f"PNG file {str(path)!r} is corrupt: {error}") from error
        out[r] = previous
    return out.view(">u2").reshape(height, width, samples).astype(np.uint16)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return (struct.pack(">I", len(body)) + kind + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))


def _encode_png16(samples: np.ndarray) -> bytes:
    """Encodes ``(H, W, S)`` uint16, S in {1, 2, 3, 4}, as a 16-bit PNG (filter 0)."""
    height, width, count = samples.shape
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[count]
    big_endian = samples.astype(">u2").reshape(height, width * count)
    scanlines = np.concatenate([np.zeros((height, 1), np.uint8),
                                big_endian.view(np.uint8).reshape(height, -1)], axis=1)
    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return (_PNG_SIGNATURE + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(scanlines.tobytes(), 6))
            + _png_chunk(b"IEND", b""))


# ------------------------------------------------------------------------------- decode


def _split_samples(samples: np.ndarray, scale: float, has_alpha: bool):
    values = samples.astype(np.float32)
    if scale != 1.0:
        values = values / np.float32(scale)
    if values.ndim == 2:
        values = values[..., None]
    if has_alpha:
        return values[..., :-1], values[..., -1]
    return values, None


_ORIENT_OPS = {
    2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
    5: lambda a: np.swapaxes(a, 0, 1), 6: lambda a: np.swapaxes(a, 0, 1)[:, ::-1],
    7: lambda a: np.swapaxes(a, 0, 1)[::-1, ::-1], 8: lambda a: np.swapaxes(a, 0, 1)[::-1],
}


def _orient(array, orientation):
    """Applies an EXIF/TIFF orientation (the same transposes as PIL.ImageOps.exif_transpose)."""
    op = _ORIENT_OPS.get(orientation)
    return array if op is None or array is None else np.ascontiguousarray(op(array))


def _decode_tiff(path) -> _Decoded:
    import tifffile  # pylint: disable=import-outside-toplevel

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            samples = page.asarray()
            photometric = page.photometric.name if page.photometric is not None else ""
            extra = len(page.extrasamples) if page.extrasamples else 0
            tag = page.tags.get("Orientation")
            orientation = int(tag.value) if tag is not None else 1
    except (tifffile.TiffFileError, ValueError, OSError, struct.error, IndexError) as error:
        raise ImageReadError(f"TIFF file {str(path)!r} is corrupt or unreadable: "
                             f"{error}") from error
    if photometric not in ("MINISBLACK", "MINISWHITE", "RGB"):
        raise ImageReadError(f"TIFF file {str(path)!r} has unsupported photometric "
                             f"interpretation {photometric!r}; convert it to RGB or gray")
    if samples.ndim == 3 and samples.shape[0] < samples.shape[-1] and samples.shape[0] <= 4 \
            and page.planarconfig.name == "SEPARATE":
        samples = np.moveaxis(samples, 0, -1)
    if samples.ndim not in (2, 3):
        raise ImageReadError(f"TIFF file {str(path)!r} has unsupported sample layout "
                             f"{samples.shape}")
    dtype = samples.dtype
    if dtype == np.uint8:
        scale, depth = 255.0, 8
    elif dtype == np.uint16:
        scale, depth = 65535.0, 16
    elif dtype == np.bool_:
        scale, depth = 1.0, 1
    elif dtype in (np.float32, np.float64, np.float16):
        scale, depth = 1.0, 8 * dtype.itemsize
    else:
        raise ImageReadError(f"TIFF file {str(path)!r} holds {dtype} samples; only 8/16-bit "
                             "unsigned integers and floats are supported")
    count = 1 if samples.ndim == 2 else samples.shape[-1]
    has_alpha = extra > 0 and count in (2, 4)
    if count - (1 if has_alpha else 0) not in (1, 3):
        raise ImageReadError(f"TIFF file {str(path)!r} has {count} samples per pixel; "
                             "expected gray or RGB with optional alpha")
    color, alpha = _split_samples(samples, scale, has_alpha)
    if photometric == "MINISWHITE":
        # 0 is white: invert to the usual black-is-zero convention (floats assumed in [0, 1]).
        color = 1.0 - color
    color, alpha = _orient(color, orientation), _orient(alpha, orientation)
    info = ImageInfo(color.shape[0], color.shape[1], color.shape[-1], has_alpha, depth,
                     f"tiff:{dtype}x{count}", "TIFF", orientation)
    return _Decoded(color, alpha, info)


def _pil_samples(image: Image.Image, path):
    """(samples array, scale, bit depth, has_alpha) of a Pillow image in a supported mode."""
    mode = image.mode
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode == "PA":
        image = image.convert("RGBA")
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        image = image.convert("RGB")
    elif mode in ("L", "RGB") and "transparency" in image.info:
        image = image.convert("LA" if mode == "L" else "RGBA")
    mode = image.mode
    if mode == "1":
        return np.asarray(image, np.float32), 1.0, 1, False
    if mode in ("L", "LA", "RGB", "RGBA"):
        return np.asarray(image), 255.0, 8, mode.endswith("A")
    if mode.startswith("I;16"):
        return np.asarray(image).astype(np.uint16), 65535.0, 16, False
    if mode == "I" and image.format == "PNG":
        # Older Pillow versions open 16-bit gray PNGs in 32-bit mode "I".
        return np.asarray(image).astype(np.uint16), 65535.0, 16, False
    if mode == "F":
        return np.asarray(image, np.float32), 1.0, 32, False
    raise ImageReadError(f"image {str(path)!r} has unsupported mode {mode!r}; convert it to "
                         "8/16-bit gray or RGB(A)")


def _decode(path) -> _Decoded:
    path = _check_path(path)
    if path.suffix.lower() in _TIFF_SUFFIXES:
        return _decode_tiff(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise ImageReadError(f"cannot read image file {str(path)!r}: {error}") from error
    header = _png_header(data)
    try:
        with Image.open(path) as image:
            image_format = image.format
            orientation = int(image.getexif().get(0x0112, 1) or 1)
            if header is not None and header[2] == 16 and header[3] != 0:
                samples = _decode_png16(path, data)
                count = samples.shape[-1]
                color, alpha = _split_samples(samples, 65535.0, count in (2, 4))
                color, alpha = _orient(color, orientation), _orient(alpha, orientation)
                info = ImageInfo(color.shape[0], color.shape[1], color.shape[-1],
                                 alpha is not None, 16, f"png16:{header[3]}", "PNG",
                                 orientation)
                return _Decoded(color, alpha, info)
            image.load()
            mode = image.mode
            upright = ImageOps.exif_transpose(image)
            samples, scale, depth, has_alpha = _pil_samples(upright, path)
    except ImageReadError:
        raise
    except UnidentifiedImageError as error:
        raise ImageReadError(f"{str(path)!r} is not a recognised image file (Pillow cannot "
                             "identify it)") from error
    except (OSError, SyntaxError, ValueError, struct.error, zlib.error) as error:
        raise ImageReadError(f"image file {str(path)!r} is corrupt or truncated: "
                             f"{error}") from error
    color, alpha = _split_samples(samples, scale, has_alpha)
    info = ImageInfo(color.shape[0], color.shape[1], color.shape[-1], has_alpha, depth, mode,
                     image_format or "", orientation)
    return _Decoded(color, alpha, info)


def _convert_channels(color: np.ndarray, channels):
    if channels is None or channels == color.shape[-1]:
        return color
    if channels == 3:
        return np.repeat(color, 3, axis=-1)
    if channels == 1:
        return (color @ _LUMA)[..., None].astype(np.float32)
    raise ValueError(f"channels must be None, 1 or 3, got {channels!r}")


def read_image(path, *, channels=None, return_alpha=False):
    """Reads an image file as float32 ``(H, W, C)`` in [0, 1].

    PNG, JPEG, TIFF (and BMP/WebP/PPM/GIF through Pillow); 1-, 8- and 16-bit, gray, gray +
    alpha, RGB, RGBA and palette files. Conversions are listed in the module docstring:
    integers divided by full scale (16-bit by 65535), EXIF orientation applied, alpha
    split off.

    Args:
      path: file path.
      channels: None keeps the file's colour channels (1 or 3); 1 converts colour to
        BT.601 luma; 3 replicates gray.
      return_alpha: also return the alpha channel, ``(H, W)`` float32 in [0, 1], or None
        when the file has none.

    Returns:
      ``image`` (``(H, W, C)`` float32), or ``(image, alpha)`` with ``return_alpha``.

    Raises:
      ImageReadError: missing, unreadable, corrupt or truncated files, files that are not
        images, unsupported modes.
      ValueError: a bad ``channels`` value.
    """
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be None, 1 or 3, got {channels!r}")
    decoded = _decode(path)
    image = _convert_channels(decoded.color, channels)
    return (image, decoded.alpha) if return_alpha else image


def read_image_info(path) -> ImageInfo:
    """The `ImageInfo` of an image file (size, channels, alpha, bit depth, mode, orientation).

    The pixels are decoded too, so a corrupt file raises `ImageReadError` here as in
    `read_image`. To get pixels and metadata from one decode, use `load_image`.
    """
    return _decode(path).info


class LoadedImage(NamedTuple):
    """Pixels, alpha and metadata of one file (`load_image`)."""
    image: np.ndarray
    alpha: np.ndarray | None
    info: ImageInfo


def load_image(path, *, channels=None) -> LoadedImage:
    """`read_image` with ``return_alpha=True`` and `read_image_info` in one decode.

    Args:
      path: file path.
      channels: None, 1 or 3, as in `read_image`.

    Returns:
      `LoadedImage` ``(image (H, W, C) float32, alpha (H, W) float32 or None, info)``.
    """
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be None, 1 or 3, got {channels!r}")
    decoded = _decode(path)
    return LoadedImage(_convert_channels(decoded.color, channels), decoded.alpha, decoded.info)


def _quantize(values: np.ndarray, bit_depth: int) -> np.ndarray:
    full = (1 << bit_depth) - 1
    dtype = np.uint8 if bit_depth == 8 else np.uint16
    return np.round(np.clip(values, 0.0, 1.0) * full).astype(dtype)


def write_image(path, image, *, bit_depth=8, alpha=None):
    """Writes a float image in [0, 1] to PNG, JPEG, TIFF (or BMP/WebP through Pillow).

    Values are clipped to [0, 1] and rounded to ``round(x · (2^b − 1))``; the format comes
    from the file suffix. 16-bit output is PNG or TIFF only; JPEG has no alpha.

    Args:
      path: destination; parent folders must exist.
      image: ``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)`` float (any array-like, e.g. a jax
        array), or ``(H, W, 2)`` / ``(H, W, 4)`` with the alpha channel last.
      bit_depth: 8 or 16.
      alpha: optional ``(H, W)`` or ``(H, W, 1)`` alpha in [0, 1] for a 1/3-channel image.

    Raises:
      ValueError: bad shapes, bit depth, or a format that cannot hold the request.
    """
    path = pathlib.Path(path)
    values = np.asarray(image, np.float32)
    if values.ndim == 2:
        values = values[..., None]
    if values.ndim != 3 or values.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(f"image must be (H, W) or (H, W, C) with C in 1..4, got shape "
                         f"{np.shape(image)}")
    if alpha is not None:
        if values.shape[-1] not in (1, 3):
            raise ValueError("alpha given for an image that already has an alpha channel "
                             f"(shape {values.shape})")
        alpha = np.asarray(alpha, np.float32)
        alpha = alpha[..., 0] if alpha.ndim == 3 and alpha.shape[-1] == 1 else alpha
        if alpha.shape != values.shape[:2]:
            raise ValueError(f"alpha must be (H, W) = {values.shape[:2]}, got {alpha.shape}")
        values = np.concatenate([values, alpha[..., None]], axis=-1)
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth!r}")
    suffix = path.suffix.lower()
    samples = _quantize(values, bit_depth)
    if suffix in _TIFF_SUFFIXES:
        import tifffile  # pylint: disable=import-outside-toplevel

        count = samples.shape[-1]
        tifffile.imwrite(path, samples[..., 0] if count == 1 else samples,
                         photometric="minisblack" if count <= 2 else "rgb",
                         extrasamples=("unassalpha",) if count in (2, 4) else None,
                         compression="zlib")
        return
    if bit_depth == 16:
        if suffix != ".png":
            raise ValueError(f"16-bit images can be written as PNG or TIFF, not {suffix!r}")
        path.write_bytes(_encode_png16(samples))
        return
    if suffix in (".jpg", ".jpeg") and samples.shape[-1] in (2, 4):
        raise ValueError("JPEG cannot store alpha; write a PNG or TIFF")
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[samples.shape[-1]]
    pil_image = Image.fromarray(samples[..., 0] if mode == "L" else samples, mode=mode)
    options = {"quality": 95} if suffix in (".jpg", ".jpeg") else {}
    pil_image.save(path, **options)


def list_images(folder_or_glob, *, extensions=IMAGE_EXTENSIONS, recursive=False):
    """Sorted image files of a folder, or the files a glob pattern matches.

    Args:
      folder_or_glob: a folder (its files with an image suffix, case-insensitive), a glob
        pattern such as ``"data/*/blur/*.png"`` (every matching file), or a single file.
      extensions: suffixes counted as images when listing a folder.
      recursive: list sub-folders too (folder) / let ``**`` match across folders (glob).

    Returns:
      A sorted list of ``pathlib.Path``.

    Raises:
      FileNotFoundError: the folder or file does not exist.
    """
    text = str(folder_or_glob)
    if any(char in text for char in "*?["):
        return sorted(pathlib.Path(p) for p in glob.glob(text, recursive=recursive)
                      if os.path.isfile(p))
    path = pathlib.Path(text)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{text!r} is neither a folder, an image file nor a glob "
                                "pattern that could match files")
    suffixes = {e.lower() for e in extensions}
    candidates = path.rglob("*") if recursive else path.iterdir()
    return sorted(p for p in candidates if p.is_file() and p.suffix.lower() in suffixes)
