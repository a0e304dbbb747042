"""Adding an explanation method is one registry entry (plus its raw-map function when it has its own maps);
dcam_jax.api has no branch on method names."""

import inspect

import jax
import numpy as np
import pytest

import dcam_jax as dj
from dcam_jax import api
from dcam_jax.cam import config as cam_config
from dcam_jax.cam import methods


@pytest.fixture
def image():
    return np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def test_a_new_gradient_method_is_one_registry_entry(tiny_model, image):
    m = methods.register(methods.Method(
        "conservative_layercam", dict(methods.GRAD_BASE, probe="decision", grad_rule="conservative",
                                      aggregation="layercam")))
    try:
        assert "conservative_layercam" in cam_config.METHODS
        key = jax.random.key(3)
        got = dj.explain(tiny_model, image, "describe the image", targets="all", key=key,
                         config=dj.CamConfig(method="conservative_layercam", layer=1))
        # the same maps as spelling every field out on an existing method
        want = dj.explain(tiny_model, image, "describe the image", targets="all", key=key,
                          config=dj.CamConfig(method="hirescam", layer=1, grad_rule="conservative",
                                              aggregation="layercam"))
        np.testing.assert_allclose(got.maps, want.maps, atol=1e-6)
        assert got.config.method == m.name and got.config.aggregation == "layercam"
    finally:
        methods.unregister("conservative_layercam")
    with pytest.raises(ValueError, match="expected one of"):
        dj.CamConfig(method="conservative_layercam")


def test_a_method_with_its_own_maps(tiny_model, image):
    def centre_prior(r: methods.MapsRequest):
        """A Gaussian bump at the image centre for every target: a map that ignores the model."""
        H, W = r.layout.positions(r.view).shape
        yy, xx = np.mgrid[:H, :W]
        bump = np.exp(-((yy - (H - 1) / 2) ** 2 + (xx - (W - 1) / 2) ** 2) / (0.1 * H * W))
        return np.repeat(bump[None], len(r.targets), 0).astype(np.float32), np.ones(len(r.targets)), None

    methods.register(methods.Method("centre_prior", dict(methods.GRAD_BASE, probe="clean"),
                                    raw_maps=centre_prior, has_states=False))
    try:
        e = dj.explain(tiny_model, image, "describe the image", targets="all",
                       config=dj.CamConfig(method="centre_prior"))
        H, W = e.maps.shape[1:]
        assert np.unravel_index(e.maps[0].argmax(), e.maps[0].shape) in {((H - 1) // 2 + a, (W - 1) // 2 + b)
                                                                          for a in (0, 1) for b in (0, 1)}
        with pytest.raises(ValueError, match="no probe states"):
            dj.explain_trajectory(tiny_model, image, "describe the image",
                                  config=dj.CamConfig(method="centre_prior"))
    finally:
        methods.unregister("centre_prior")


def test_registry_refuses_bad_entries():
    with pytest.raises(ValueError, match="already registered"):
        methods.register(methods.Method("hirescam", {}))
    with pytest.raises(ValueError, match="not CamConfig fields"):
        methods.Method("x", {"colour": "red"})
    with pytest.raises(ValueError, match="identifier"):
        methods.Method("my cam", {})
    with pytest.raises(TypeError):
        methods.register({"name": "x"})


def test_api_does_not_branch_on_method_names():
    src = inspect.getsource(api)
    for name in methods.names():
        assert f'"{name}"' not in src, name
