"""Every PIL mode reaches RGB by the documented rule; bad and huge images give ImageError.

References are closed forms: a 16-bit ramp scaled by 255 / 65535, alpha composited onto black by hand,
an EXIF-rotated file compared with the rotated array.
"""

import warnings

import numpy as np
import pytest
from PIL import Image

from dcam_jax.processing import image as pimg


def _load(x, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.asarray(pimg.load_image(x, **kw))


def test_16_bit_png_is_scaled_not_saturated(tmp_path):
    ramp = (np.arange(64 * 32, dtype=np.uint32).reshape(32, 64) * 32).astype(np.uint16)  # 0 .. 65504
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    with pytest.warns(UserWarning, match="mode I;16"):
        rgb = np.asarray(pimg.load_image(path))
    want = np.rint(ramp.astype(np.float64) * 255.0 / 65535.0).astype(np.uint8)
    assert rgb.shape == (32, 64, 3)
    np.testing.assert_array_equal(rgb[..., 0], want)
    np.testing.assert_array_equal(rgb[..., 1], want)
    # Not the saturated picture a plain convert("RGB") gives: most pixels stay below white.
    assert (rgb[..., 0] < 255).mean() > 0.99 and rgb.std() > 50


def test_int32_and_float_modes_follow_the_rule():
    small = Image.fromarray(np.array([[0, 100, 255]], np.int32), "I")
    np.testing.assert_array_equal(_load(small)[0, :, 0], [0, 100, 255])
    wide = Image.fromarray(np.array([[0, 1000, 65535]], np.int32), "I")
    np.testing.assert_array_equal(_load(wide)[0, :, 0], [0, 4, 255])
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F")
    np.testing.assert_array_equal(_load(unit)[0, :, 0], [0, 128, 255])
    bytes_range = Image.fromarray(np.array([[0.0, 17.0, 200.0]], np.float32), "F")
    np.testing.assert_array_equal(_load(bytes_range)[0, :, 0], [0, 17, 200])
    for bad, match in ((np.array([[-1.0, 2.0]], np.float32), "values in"),
                       (np.array([[np.nan, 1.0]], np.float32), "NaN")):
        with pytest.raises(pimg.ImageError, match=match):
            _load(Image.fromarray(bad, "F"))
    with pytest.raises(pimg.ImageError, match="32-bit integer"):
        _load(Image.fromarray(np.array([[-5, 70000]], np.int32), "I"))


def test_alpha_palette_and_cmyk():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[..., 3] = (255, 128)[0]
    rgba[1, 1, 3] = 128
    out = _load(Image.fromarray(rgba, "RGBA")).astype(int)
    assert tuple(out[0, 0]) == (200, 100, 50)
    np.testing.assert_allclose(out[1, 1], np.array([200, 100, 50]) * 128 / 255, atol=1)
    la = Image.fromarray(np.dstack([np.full((2, 2), 240, np.uint8), np.zeros((2, 2), np.uint8)]), "LA")
    assert _load(la).max() == 0  # fully transparent -> black
    pal = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    pal.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    np.testing.assert_array_equal(_load(pal)[0], [[10, 20, 30], [40, 50, 60]])
    cmyk = Image.new("CMYK", (3, 3), (0, 255, 255, 0))  # pure red in CMYK
    assert tuple(_load(cmyk)[1, 1]) == (255, 0, 0)


def test_exif_orientation_turns_the_picture_upright(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:5, :10] = 255  # a bright top-left corner
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    path = tmp_path / "rotated.jpg"
    img.save(path, quality=95, exif=exif)
    out = _load(path)
    assert out.shape == (40, 20, 3)
    ref = np.rot90(arr, k=-1)
    assert np.abs(out.astype(int) - ref.astype(int)).mean() < 8


def test_huge_images_are_refused_before_decoding(tmp_path):
    with pytest.raises(pimg.ImageError, match="more than the limit"):
        pimg.load_image(np.zeros((300, 400, 3), np.uint8), max_pixels=100_000)
    path = tmp_path / "big.png"
    Image.new("L", (500, 400)).save(path)
    with pytest.raises(pimg.ImageError, match="500x400 pixels, more than the limit"):
        pimg.load_image(path, max_pixels=100_000)
    # Under the limit the same file loads.
    assert pimg.load_image(path, max_pixels=200_000).size == (500, 400)


def test_truncated_and_random_files_give_image_error(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(good)
    data = good.read_bytes()
    rng = np.random.default_rng(1)
    cases = [data[: len(data) // 2], data[:40], bytes(rng.integers(0, 256, 300, dtype=np.uint8)), b""]
    for k, blob in enumerate(cases):
        path = tmp_path / f"bad{k}.png"
        path.write_bytes(blob)
        with pytest.raises(pimg.ImageError, match="cannot read image"):
            pimg.load_image(path)
