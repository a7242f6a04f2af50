"""Checking one image file with Pillow before training, and decoding the few kinds TF's decoder gets wrong.

Policy for transparency: alpha is dropped (the stored colour under it is kept), as Pillow's
`convert("RGB")`, `tf.io.decode_image(channels=3)` and Keras' image_dataset_from_directory all do,
so training pixels match what a user's own inference code most likely feeds the model.
"""

from __future__ import annotations

import dataclasses
import io
import os
import stat
import struct
import warnings

import numpy as np
from PIL import Image

from tfl.data import pixel_limit
from tfl.data.fingerprint import bytes_digest, file_digest
from tfl.options import IMAGE_EXTENSIONS  # noqa: E402 - re-exported: the one list, for training and predict


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    height: int
    width: int
    # True when tf.io.decode_image would fail on this file or give different pixels from the policy above.
    needs_pillow: bool
    digest: str | None = None  # of the file's bytes, when inspect_image was asked for it


_READ_WHOLE = 16 << 20  # bytes: a file up to this size is read into memory once for all checks


class BadImage(Exception):
    """The file is not a readable image; str() is the reason."""


def file_problem(path: str) -> str | None:
    """Why `path` cannot be an image without opening it, or None: only regular files with an image extension are.

    stat, never open: opening a FIFO blocks until a writer appears, and a device or socket is no image either.
    A symbolic link counts as the file it points to (os.stat follows it).
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        if os.path.islink(path):
            return f"a broken symbolic link to {os.readlink(path)}"
        return f"cannot be read ({error.strerror or error})"
    if not stat.S_ISREG(mode):
        return f"not a regular file ({_file_kind(mode)}); only regular files are read as images"
    if os.path.splitext(path)[1].lower() not in IMAGE_EXTENSIONS:
        return f"not an image file type; expected one of {' '.join(IMAGE_EXTENSIONS)}"
    return None


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    return next((name for test, name in kinds if test(mode)), "not a plain file")


def inspect_image(path: str, max_pixels: int | None = None, digest: bool = False) -> ImageInfo:
    """Fully decode `path` once with Pillow; raise BadImage with the reason if that fails (or it is no file, or its
    header says more pixels than `max_pixels`, default $TFL_MAX_PIXELS: then nothing is decoded). `digest`: also
    hash the file's bytes (ImageInfo.digest, tfl.data.fingerprint.file_digest) from the same read."""
    problem = file_problem(path)
    if problem:
        raise BadImage(problem)
    try:
        # Read once (a small file, as nearly all are): the header check, both Pillow passes and the digest see the
        # same bytes, for one open instead of three or four. A large file is read from disk each time.
        data = None
        if os.stat(path).st_size <= _READ_WHOLE:
            with open(path, "rb") as f:
                data = f.read()
        problem = pixel_limit.problem(io.BytesIO(data) if data is not None else path, max_pixels)
        hashed = (bytes_digest(data) if data is not None else file_digest(path)) if digest else None
    except OSError as error:
        raise BadImage(f"cannot be read ({error.strerror or error})") from None
    if problem:
        raise BadImage(problem)
    source = None
    try:
        # verify() catches what load() lets through (PNG chunk CRCs); load() catches what verify() cannot
        # (truncated JPEG data). A file needs both, and verify() leaves the image unusable, hence two opens.
        source = io.BytesIO(data) if data is not None else path
        with Image.open(source) as image:
            image.verify()
        source = io.BytesIO(data) if data is not None else path
        with Image.open(source) as image:
            image.load()
            return ImageInfo(image.height, image.width, _needs_pillow(path, image), hashed)
    except Exception as error:  # noqa: BLE001 - any failure to read means the file cannot be trained on
        reason = str(error).replace(repr(source), repr(path)) if source is not path else str(error)
        raise BadImage(f"{type(error).__name__}: {reason}") from None


def _needs_pillow(path: str, image: Image.Image) -> bool:
    # Measured against Pillow on TF 2.21 (tests/test_data_image_decode.py): TF decodes every JPEG
    # (incl. grayscale and Adobe CMYK) and every PNG (palette, tRNS, grey+alpha, 16-bit) correctly.
    # It returns black for transparent GIF pixels, ignores BMP palettes, rejects 1/4-bit and compressed
    # BMPs, and cannot read other formats that may hide behind an image extension (TIFF, WebP, ...).
    fmt = image.format
    if fmt in ("JPEG", "MPO", "PNG"):
        return False
    if fmt == "GIF":
        return "transparency" in image.info
    if fmt == "BMP":
        return not _is_plain_bmp(path, image.mode)
    return True


def _is_plain_bmp(path: str, mode: str) -> bool:
    """Uncompressed 24/32-bit BMP, or 8-bit with a grey palette: the layouts TF's BMP decoder reads right."""
    with open(path, "rb") as f:
        header = f.read(34)
    if len(header) < 34 or struct.unpack("<I", header[14:18])[0] < 40:  # OS/2 core header
        return False
    bits_per_pixel = struct.unpack("<H", header[28:30])[0]
    compression = struct.unpack("<I", header[30:34])[0]
    if compression != 0:
        return False
    return bits_per_pixel in (24, 32) or (bits_per_pixel == 8 and mode == "L")


def pillow_rgb(path: bytes | str) -> np.ndarray:
    """uint8 [H, W, 3] RGB of the first frame, by the same rules TF's decoder follows for the other files."""
    with Image.open(os.fsdecode(path)) as image:
        image.load()
        if image.mode == "I" or image.mode.startswith("I;16"):
            # Pillow's convert("RGB") clips 16-bit values to 255; keep the high byte, as TF does for PNG.
            grey = (np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8)
            return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "palette images with transparency ..." - dropping it is the policy
            return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
