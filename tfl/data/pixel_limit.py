"""A limit on an image's pixels, read from its header before anything decodes it.

A PNG of 13000 x 13000 pixels can be a few kilobytes and decode to 500 MB: one such file in a folder, a predict
list or a request to an exported model would take the memory of the machine that decodes it. Every path into a
decoder therefore reads the width and height from the header first and refuses an image above the limit:

- the folder check before training (tfl.data.image_check.inspect_image, so such a file is listed as bad, and
  skipped with --skip-bad-images), and predict (which reads files through the same check);
- an exported SavedModel's serving signature (`checked_bytes`, built into the graph at export time).

The limit is $TFL_MAX_PIXELS (width x height, default 50 Mpixel; e.g. `TFL_MAX_PIXELS=100000000`), read when a
command starts or an export is written (the export keeps the limit it was made with).
"""

from __future__ import annotations

import contextlib
import os
import re
import struct

from tfl.errors import UsageError

ENV = "TFL_MAX_PIXELS"
DEFAULT_MAX_PIXELS = 50_000_000
_HEAD = 32  # bytes that hold the size in every format read here but JPEG


def max_pixels() -> int:
    """The limit: $TFL_MAX_PIXELS, else DEFAULT_MAX_PIXELS. A value that is no positive integer is refused."""
    raw = os.environ.get(ENV, "").strip().replace("_", "")
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise UsageError(f"{ENV}={os.environ[ENV]!r}: expected a positive whole number of pixels (width x height), "
                         f"e.g. {DEFAULT_MAX_PIXELS}; unset it for the default")
    return value


def describe(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} Mpixel" if pixels >= 100_000 else f"{pixels} pixels"


def problem(path, limit: int | None = None) -> str | None:
    """Why `path` (a file name, or a binary file object at its start) is too large to decode (its size and the
    limit, and what to do), or None. Reads the header only; a file whose header says nothing readable is left to
    the decoder (which then names what is wrong)."""
    limit = max_pixels() if limit is None else limit
    try:
        size = header_size(path)
    except _Huge as huge:
        what = describe(huge.pixels)
    else:
        if size is None or size[0] * size[1] <= limit:
            return None
        what = f"{size[0]}x{size[1]} pixels ({describe(size[0] * size[1])})"
    return (f"{what} is above the limit of {describe(limit)} an image may have before it is decoded; shrink the "
            f"image, or raise ${ENV} (now {limit})")


class _Huge(Exception):
    """Pillow refused to parse the header further: more pixels than twice its own limit."""

    def __init__(self, pixels: int):
        super().__init__(pixels)
        self.pixels = pixels


def header_size(path) -> tuple[int, int] | None:
    """(width, height) from the header of the file `path` (or of a binary file object at its start): PNG IHDR, JPEG
    SOF, GIF screen, BMP, WebP, other formats through Pillow's header parser; nothing is decoded. None when the
    header cannot be read. Raises _Huge when Pillow refuses to open the file for its size."""
    with (open(path, "rb") if isinstance(path, (str, bytes, os.PathLike)) else contextlib.nullcontext(path)) as f:
        head = f.read(_HEAD)
        if head[:2] == b"\xff\xd8":
            return _jpeg_size(f)
        size = bytes_header_size(head)
        if size is not None or head[:8] == b"\x89PNG\r\n\x1a\n" or head[:3] == b"GIF" or head[:2] == b"BM":
            return size
        f.seek(0)
        return _pillow_size(f)


def bytes_header_size(head: bytes) -> tuple[int, int] | None:
    """(width, height) of a PNG, GIF, BMP or WebP from its first 32 bytes; None for anything else."""
    if len(head) >= 24 and head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        return struct.unpack(">II", head[16:24])
    if len(head) >= 10 and head[:6] in (b"GIF87a", b"GIF89a"):
        return struct.unpack("<HH", head[6:10])
    if len(head) >= 26 and head[:2] == b"BM":
        if struct.unpack("<I", head[14:18])[0] == 12:  # OS/2 core header: 16-bit fields
            return struct.unpack("<HH", head[18:22])
        width, height = struct.unpack("<ii", head[18:26])
        return abs(width), abs(height)  # a negative height is a top-down bitmap
    if len(head) >= 30 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        chunk = head[12:16]
        if chunk == b"VP8X":  # 24-bit canvas width - 1 and height - 1
            return 1 + int.from_bytes(head[24:27], "little"), 1 + int.from_bytes(head[27:30], "little")
        if chunk == b"VP8L" and head[20] == 0x2F:  # 14 bits each, minus one
            bits = int.from_bytes(head[21:25], "little")
            return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
        if chunk == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":
            width, height = struct.unpack("<HH", head[26:30])
            return width & 0x3FFF, height & 0x3FFF
    return None


# Start-of-frame markers: every JPEG coding process (not DHT C4, JPG C8, DAC CC).
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def _jpeg_size(f) -> tuple[int, int] | None:
    """Walk the JPEG's marker segments from just after SOI to the first start-of-frame (which holds the size)."""
    f.seek(2)
    for _ in range(10_000):  # a real header has tens of segments; this bounds a hostile one
        if f.read(1) != b"\xff":
            return None
        marker = f.read(1)
        while marker == b"\xff":  # fill bytes before a marker
            marker = f.read(1)
        if not marker:
            return None
        code = marker[0]
        if code == 0x01 or 0xD0 <= code <= 0xD7:  # markers without a length
            continue
        length_bytes = f.read(2)
        if len(length_bytes) < 2:
            return None
        length = struct.unpack(">H", length_bytes)[0]
        if code in _SOF:
            segment = f.read(5)
            if len(segment) < 5:
                return None
            height, width = struct.unpack(">HH", segment[1:5])
            return width, height
        if code == 0xDA or length < 2:  # scan data before any frame header: not a JPEG we can size
            return None
        f.seek(length - 2, os.SEEK_CUR)
    return None


def _pillow_size(path) -> tuple[int, int] | None:
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning: our limit is the one that decides
            with Image.open(path) as image:  # parses the header; pixels are decoded only by load()
                return image.size
    except Image.DecompressionBombError as error:  # above twice Pillow's own limit: say what it measured
        match = re.search(r"\((\d+) pixels\)", str(error))
        raise _Huge(int(match.group(1)) if match else 2 * Image.MAX_IMAGE_PIXELS) from None
    except Exception:  # noqa: BLE001 - unreadable: the decoder's check names the reason
        return None


def checked_bytes(data, limit: int):
    """In a TensorFlow graph: the encoded image `data` (a scalar string) again, to decode in place of `data`: it is
    computed after a check that fails (InvalidArgumentError, naming the size) when the header says more than `limit`
    pixels, so the decoder never sees such an image. JPEG through tf.io.extract_jpeg_shape, PNG, GIF, BMP and WebP
    from their header bytes; bytes of no known format pass (the decoder refuses them)."""
    import tensorflow as tf

    def field(offset, size, dtype, little_endian=True):
        raw = tf.io.decode_raw(tf.strings.substr(data, offset, size), dtype, little_endian=little_endian)
        return tf.cast(tf.reshape(raw, [-1])[0], tf.int64)

    def u24(offset):
        octets = tf.cast(tf.io.decode_raw(tf.strings.substr(data, offset, 3), tf.uint8), tf.int64)
        return octets[0] + octets[1] * 256 + octets[2] * 65536

    def png():
        return field(16, 4, tf.int32, False) % 2**32, field(20, 4, tf.int32, False) % 2**32

    def gif():
        return field(6, 2, tf.uint16), field(8, 2, tf.uint16)

    def bmp():
        return tf.cond(tf.equal(field(14, 4, tf.int32), 12),  # OS/2 core header: 16-bit fields
                       lambda: (field(18, 2, tf.uint16), field(20, 2, tf.uint16)),
                       lambda: (tf.abs(field(18, 4, tf.int32)), tf.abs(field(22, 4, tf.int32))))

    def jpeg():
        shape = tf.cast(tf.io.extract_jpeg_shape(data), tf.int64)
        return shape[1], shape[0]

    def webp():
        chunk = tf.strings.substr(data, 12, 4)

        def vp8l():
            bits = u24(21) + tf.cast(field(24, 1, tf.uint8), tf.int64) * 16777216
            return 1 + bits % 16384, 1 + (bits // 16384) % 16384

        return tf.case([(tf.equal(chunk, "VP8X"), lambda: (1 + u24(24), 1 + u24(27))),
                        (tf.equal(chunk, "VP8L"), vp8l),
                        (tf.equal(chunk, "VP8 "), lambda: (field(26, 2, tf.uint16) % 16384,
                                                           field(28, 2, tf.uint16) % 16384))],
                       default=lambda: (tf.constant(0, tf.int64), tf.constant(0, tf.int64)), exclusive=True)

    def none():
        return tf.constant(0, tf.int64), tf.constant(0, tf.int64)

    long_enough = tf.strings.length(data) >= _HEAD
    head8 = tf.strings.substr(data, 0, 8)
    is_png = tf.logical_and(long_enough, tf.equal(head8, b"\x89PNG\r\n\x1a\n"))
    is_gif = tf.logical_and(long_enough, tf.equal(tf.strings.substr(data, 0, 3), "GIF"))
    is_bmp = tf.logical_and(long_enough, tf.equal(tf.strings.substr(data, 0, 2), "BM"))
    is_jpeg = tf.equal(tf.strings.substr(data, 0, 2), b"\xff\xd8")
    is_webp = tf.logical_and(long_enough, tf.logical_and(tf.equal(tf.strings.substr(data, 0, 4), "RIFF"),
                                                         tf.equal(tf.strings.substr(data, 8, 4), "WEBP")))
    width, height = tf.case([(is_png, png), (is_gif, gif), (is_bmp, bmp), (is_jpeg, jpeg), (is_webp, webp)],
                            default=none, exclusive=False)
    message = tf.strings.format("image_bytes: an image of {}x{} pixels is above the limit of {} pixels this model "
                                "decodes; send a smaller image", (width, height, limit))
    check = tf.debugging.Assert(width * height <= limit, [message])
    with tf.control_dependencies([check]):
        return tf.identity(data)
