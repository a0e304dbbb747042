"""The bundled demo samples are what dcam_jax.data.shapes_samples writes with the current generator."""

import io
import json

import numpy as np
from PIL import Image

from dcam_jax import api
from dcam_jax.data import shapes, shapes_samples


def test_bundled_samples_match_the_generator():
    folder = api.ASSETS / "samples"
    shipped = sorted(p.name for p in folder.iterdir())
    want = {}
    for k in range(shapes_samples.DEFAULT_COUNT):
        want.update(shapes_samples.sample_files(shapes_samples.DEFAULT_START + k, k))
    assert shipped == sorted(want)
    for name, data in want.items():
        if name.endswith(".json"):
            assert json.loads((folder / name).read_text()) == json.loads(data)
        else:
            got = np.asarray(Image.open(folder / name))
            np.testing.assert_array_equal(got, np.asarray(Image.open(io.BytesIO(data))), err_msg=name)
    meta = json.loads((folder / "shapes_0.json").read_text())
    assert meta["generator"] == shapes.GENERATOR_VERSION


def test_write_samples(tmp_path):
    paths = shapes_samples.write_samples(tmp_path, start=5, count=2)
    assert sorted(p.name for p in paths) == sorted(
        f"shapes_{k}{suffix}" for k in range(2) for suffix in (".png", "_labels.png", ".json"))
    e = shapes.make_example(shapes.split_seed("test", 6), shapes.preset("default"))
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "shapes_1.png")), e.image)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "shapes_1_labels.png")), e.label_map)
