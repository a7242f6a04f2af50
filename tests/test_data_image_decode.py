"""Every image kind an image folder may hold decodes to uint8 [H, W, 3] RGB with the right pixels.

The expected pixels are computed independently (numbers written into the file), not by asking Pillow,
because Pillow itself gets some of these wrong (it clips 16-bit grey to 255).
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tfl.data.decode import decode_files
from tfl.data.image_check import BadImage, inspect_image, pillow_rgb

H, W = 6, 5
COLOUR = (200, 60, 30)


def _png16(path, array: np.ndarray) -> None:
    """A 16-bit PNG written by hand: Pillow cannot write 16-bit RGB(A)."""
    h, w, c = array.shape
    colour_type = {1: 0, 3: 2, 4: 6}[c]
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunks)


def _solid(mode, value):
    return Image.new(mode, (W, H), value)


def _palette(transparent: bool = False) -> Image.Image:
    # Index 0 is a dark colour, index 1 COLOUR; the top half uses index 1.
    indices = np.zeros((H, W), np.uint8)
    indices[: H // 2] = 1
    image = Image.fromarray(indices, "P")
    image.putpalette([10, 20, 30, *COLOUR] + [0] * (256 * 3 - 6))
    if transparent:
        image.info["transparency"] = 0
    return image


def _palette_expected() -> np.ndarray:
    out = np.zeros((H, W, 3), np.uint8)
    out[: H // 2] = COLOUR
    out[H // 2 :] = (10, 20, 30)  # transparent pixels keep their stored colour: alpha is dropped
    return out


def _full(colour) -> np.ndarray:
    return np.broadcast_to(np.array(colour, np.uint8), (H, W, 3)).copy()


# name -> (writer(path), expected uint8 [H, W, 3], max abs error, decoded via Pillow?)
CASES = {
    "rgb.jpg": (lambda p: _solid("RGB", COLOUR).save(p, quality=95), _full(COLOUR), 3, False),
    "grey.jpg": (lambda p: _solid("L", 77).save(p, quality=95), _full((77, 77, 77)), 2, False),
    "cmyk.jpg": (lambda p: _solid("RGB", COLOUR).convert("CMYK").save(p, quality=95), _full(COLOUR), 4, False),
    "grey.png": (lambda p: _solid("L", 77).save(p), _full((77, 77, 77)), 0, False),
    "rgba.png": (lambda p: _solid("RGBA", (*COLOUR, 128)).save(p), _full(COLOUR), 0, False),
    "grey_alpha.png": (lambda p: _solid("LA", (90, 0)).save(p), _full((90, 90, 90)), 0, False),
    "palette.png": (lambda p: _palette().save(p), _palette_expected(), 0, False),
    "palette_transparent.png": (lambda p: _palette().save(p, transparency=0), _palette_expected(), 0, False),
    "bilevel.png": (lambda p: _solid("1", 1).save(p), _full((255, 255, 255)), 0, False),
    # 16-bit values keep their high byte: 40000 >> 8 = 156; 51400 >> 8 = 200, 15420 >> 8 = 60, 7710 >> 8 = 30.
    "grey16.png": (lambda p: Image.fromarray(np.full((H, W), 40000, np.uint16)).save(p), _full((156,) * 3), 0, False),
    "rgb16.png": (lambda p: _png16(p, np.dstack([np.full((H, W), v, np.uint16) for v in (51400, 15420, 7710)])),
                  _full(COLOUR), 0, False),
    "rgba16.png": (lambda p: _png16(p, np.dstack([np.full((H, W), v, np.uint16) for v in (51400, 15420, 7710, 0)])),
                   _full(COLOUR), 0, False),
    "rgb.gif": (lambda p: _palette().save(p), _palette_expected(), 0, False),
    "transparent.gif": (lambda p: _palette().save(p, transparency=0), _palette_expected(), 0, True),
    "rgb.bmp": (lambda p: _solid("RGB", COLOUR).save(p), _full(COLOUR), 0, False),
    "rgba.bmp": (lambda p: _solid("RGBA", (*COLOUR, 128)).save(p), _full(COLOUR), 0, False),
    "grey.bmp": (lambda p: _solid("L", 77).save(p), _full((77, 77, 77)), 0, False),
    "palette.bmp": (lambda p: _palette().save(p), _palette_expected(), 0, True),
    "bilevel.bmp": (lambda p: _solid("1", 1).save(p), _full((255, 255, 255)), 0, True),
    # A TIFF behind a .png name: content decides, and TF cannot read TIFF.
    "tiff_inside.png": (lambda p: _solid("RGB", COLOUR).save(p, format="TIFF"), _full(COLOUR), 0, True),
}  # fmt: skip


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    folder = tmp_path_factory.mktemp("decode")
    paths = {}
    for name, (write, *_rest) in CASES.items():
        paths[name] = folder / name
        write(paths[name])
    return paths


@pytest.mark.parametrize("name", sorted(CASES))
def test_inspect_flags_only_what_tf_gets_wrong(written, name):
    info = inspect_image(str(written[name]))
    assert (info.height, info.width) == (H, W)
    assert info.needs_pillow is CASES[name][3]


def test_every_kind_decodes_to_rgb_uint8_with_the_right_pixels(written):
    names = sorted(CASES)
    paths = [str(written[n]) for n in names]
    flags = [inspect_image(p).needs_pillow for p in paths]
    ds = decode_files(paths, list(range(len(names))), flags)
    assert ds.element_spec[0].shape.as_list() == [None, None, 3]
    for name, (image, label) in zip(names, ds.as_numpy_iterator()):
        _, expected, tolerance, _ = CASES[name]
        assert image.dtype == np.uint8 and image.shape == (H, W, 3), name
        assert np.abs(image.astype(int) - expected).max() <= tolerance, (name, image[0, 0], image[-1, -1])
        assert label == names.index(name)


@pytest.mark.parametrize("name", sorted(n for n, case in CASES.items() if not case[3]))
def test_native_files_decode_the_same_through_the_pillow_fallback(written, name):
    # The fallback must follow the same policy (drop alpha, 16-bit high byte), or a dataset's pixels
    # would depend on which decoder a file happened to get.
    native = tf.io.decode_image(tf.io.read_file(str(written[name])), channels=3, expand_animations=False).numpy()
    assert np.abs(pillow_rgb(str(written[name])).astype(int) - native).max() <= 1, name


def test_noise_png_round_trips_exactly(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (17, 11, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "noise.png")
    (image, _), = decode_files([str(tmp_path / "noise.png")], [0], [False]).as_numpy_iterator()
    np.testing.assert_array_equal(image, pixels)


def test_inspect_rejects_non_images_and_truncated_files(tmp_path):
    (tmp_path / "text.jpg").write_text("not an image")
    noise = np.random.default_rng(1).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    png = tmp_path / "crc.png"
    Image.fromarray(noise).save(png)
    broken = bytearray(png.read_bytes())
    broken[40] ^= 0xFF  # inside the first IDAT chunk: its CRC no longer matches
    png.write_bytes(bytes(broken))
    for name in ("text.jpg", "cut.jpg", "crc.png"):
        with pytest.raises(BadImage):
            inspect_image(str(tmp_path / name))
    inspect_image(str(tmp_path / "full.jpg"))
