"""One validation for configs, used by the dataclasses, the loader and the converter: finite, positive, typed."""

import json

import pytest

from dcam_jax.models import config as C


@pytest.mark.parametrize("field, value, match", [
    ("rms_eps", -1.0, "rms_eps=-1.0 must be a finite positive number"),
    ("rms_eps", float("nan"), "rms_eps=nan must be a finite positive number"),
    ("rope_theta", "fast", "rope_theta='fast' must be a finite positive number"),
    ("rope_theta", float("inf"), "rope_theta=inf"),
    ("remat", 1, "remat=1 must be true or false"),
    ("mask_id", 1.5, "mask_id=1.5 must be an int id"),
    ("d_model", 0, "d_model=0 must be a positive integer"),
])
def test_lm_config_rejects_bad_values(field, value, match):
    with pytest.raises(C.ConfigError, match=match):
        C.tiny_lm(**{field: value})


@pytest.mark.parametrize("field, value, match", [
    ("ln_eps", 0.0, "ln_eps=0.0 must be a finite positive number"),
    ("image_std", (0.5, 0.0, 0.5), "must be positive"),
    ("image_mean", (0.5, float("nan"), 0.5), "three finite numbers"),
    ("image_mean", (0.5, 0.5), "three finite numbers"),
])
def test_vision_config_rejects_bad_values(field, value, match):
    import dataclasses

    base = C.tiny_mllm().vision
    with pytest.raises(C.ConfigError, match=match):
        dataclasses.replace(base, **{field: value})


def test_bad_values_in_a_config_file_are_refused_when_read():
    data = json.loads(C.to_json(C.tiny_lm()))
    data["config"]["rms_eps"] = -1
    with pytest.raises(C.ConfigError, match="rms_eps=-1"):
        C.from_json(json.dumps(data))
    # Integers are fine where a real number is meant, and stored as floats.
    data["config"]["rms_eps"] = 1
    assert C.from_json(json.dumps(data)).rms_eps == 1.0
