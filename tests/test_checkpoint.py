"""dcam_jax.checkpoint: save/load round trips, atomic replacement, and clear refusals of foreign or corrupt dirs."""

import json
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from dcam_jax import checkpoint as ck
from dcam_jax.models import config as C
from dcam_jax.models.llada import init_lm_params
from dcam_jax.models.projector import init_projector_params
from dcam_jax.models.siglip import init_vision_params

CFG = C.tiny_mllm()


def _numpy_params(cfg, dtype=np.float32, seed=0):
    """Random host params for ``cfg`` (numpy, so building them costs no compilation)."""
    rng = np.random.default_rng(seed)
    return ck.unflatten({p: rng.standard_normal(s).astype(dtype) for p, s in ck.param_shapes(cfg).items()})


def _assert_tree_equal(a, b):
    fa, fb = ck.flatten(a), ck.flatten(b)
    assert fa.keys() == fb.keys()
    for p in fa:
        assert np.asarray(fb[p]).dtype == np.asarray(fa[p]).dtype, p
        np.testing.assert_array_equal(np.asarray(fb[p]), np.asarray(fa[p]), err_msg=str(p))


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["fp32", "bf16"])
def test_round_trip_mllm(tmp_path, dtype):
    params = _numpy_params(CFG, dtype)
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text('{"model": {}}')
    (tok / "unrelated.bin").write_bytes(b"x")
    path = ck.save_checkpoint(tmp_path / "ckpt", CFG, params, tokenizer_dir=tok, info={"note": "test"})
    config, loaded, tok_dir = ck.load_checkpoint(path)
    assert config == CFG
    _assert_tree_equal(params, loaded)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(loaded))
    assert sorted(p.name for p in tok_dir.iterdir()) == ["tokenizer.json"]
    marker = ck.read_marker(path)
    assert marker["param_dtype"] == np.dtype(dtype).name and marker["num_params"] == CFG.num_params
    assert marker["info"] == {"note": "test"} and marker["config_kind"] == "mllm"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "tok"]  # no temporary directory left


def test_round_trip_lm_only_from_jax_arrays_and_dtype_cast(tmp_path):
    cfg = C.tiny_lm()
    params = jax.tree.map(jnp.asarray, _numpy_params(cfg, ml_dtypes.bfloat16, seed=1))  # jax.Array leaves
    ck.save_checkpoint(tmp_path / "lm", cfg, params)
    config, loaded, tok = ck.load_checkpoint(tmp_path / "lm")
    assert config == cfg and tok is None
    _assert_tree_equal(params, loaded)
    _, as_f32, _ = ck.load_checkpoint(tmp_path / "lm", dtype="float32")
    for p, x in ck.flatten(as_f32).items():
        assert x.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(x), np.asarray(ck.flatten(params)[p], np.float32))
    with pytest.raises(ValueError, match="floating dtype"):
        ck.load_checkpoint(tmp_path / "lm", dtype="int32")


def test_load_from_a_relative_path(tmp_path, monkeypatch):
    # orbax wants absolute paths; a relative one used to fail with a misleading "not a parameter tree" error
    cfg = C.tiny_lm()
    params = _numpy_params(cfg, seed=2)
    ck.save_checkpoint(tmp_path / "sub" / "lm", cfg, params)
    monkeypatch.chdir(tmp_path)
    config, loaded, _ = ck.load_checkpoint("sub/lm")
    assert config == cfg
    _assert_tree_equal(params, loaded)
    assert set(ck.stored_param_shapes("sub/lm")) == set(ck.flatten(params))


def test_post_layernorm_is_part_of_the_layout_when_the_config_says_so(tmp_path):
    cfg = CFG.replace(has_post_layernorm=True)
    params = _numpy_params(cfg)
    assert params["vision"]["post_ln"]["scale"].shape == (cfg.vision.width,)
    ck.save_checkpoint(tmp_path / "c", cfg, params)
    _assert_tree_equal(params, ck.load_checkpoint(tmp_path / "c").params)
    with pytest.raises(ck.CheckpointError, match=r"unexpected \['vision/post_ln/bias', 'vision/post_ln/scale'\]"):
        ck.save_checkpoint(tmp_path / "d", CFG, params)


def test_param_shapes_match_the_init_functions():
    key = jax.random.key(0)
    abstract = {"lm": jax.eval_shape(lambda: init_lm_params(key, CFG.lm)),
                "vision": jax.eval_shape(lambda: init_vision_params(key, CFG.vision)),
                "projector": jax.eval_shape(lambda: init_projector_params(key, CFG.vision.width, CFG.lm.d_model)),
                "image_newline": jax.ShapeDtypeStruct((CFG.lm.d_model,), jnp.float32)}
    assert {p: tuple(x.shape) for p, x in ck.flatten(abstract).items()} == ck.param_shapes(CFG)


def test_save_refuses_params_that_do_not_match_the_config(tmp_path):
    params = _numpy_params(CFG)
    params["lm"]["layers"]["q"] = params["lm"]["layers"]["q"][:, :, :4]
    del params["image_newline"]
    params["extra"] = np.zeros(3, np.float32)
    with pytest.raises(ck.CheckpointError, match=r"missing \['image_newline'\]; unexpected \['extra'\]; wrong shape "
                                                 r"\['lm/layers/q: \(2, 32, 4\) \(config implies \(2, 32, 32\)\)'\]"):
        ck.save_checkpoint(tmp_path / "c", CFG, params)
    assert list(tmp_path.iterdir()) == []


def test_existing_path_force_and_atomic_replacement(tmp_path):
    cfg = C.tiny_lm()
    a, b = _numpy_params(cfg, seed=1), _numpy_params(cfg, seed=2)
    ck.save_checkpoint(tmp_path / "c", cfg, a)
    with pytest.raises(FileExistsError, match="already exists; pass force=True"):
        ck.save_checkpoint(tmp_path / "c", cfg, b)
    _assert_tree_equal(a, ck.load_checkpoint(tmp_path / "c").params)
    # a writer that fails half way leaves the old checkpoint and no temporary directory
    with pytest.raises(RuntimeError, match="boom"):
        with ck.CheckpointWriter(tmp_path / "c", cfg, force=True) as w:
            w.add({"lm": {"embed": b["lm"]["embed"]}})
            raise RuntimeError("boom")
    with pytest.raises(ck.CheckpointError, match=r"parameter\(s\) never written: \['lm/final_norm'"):
        with ck.CheckpointWriter(tmp_path / "c", cfg, force=True) as w:
            w.add({"lm": {"embed": b["lm"]["embed"]}})
    _assert_tree_equal(a, ck.load_checkpoint(tmp_path / "c").params)
    ck.save_checkpoint(tmp_path / "c", cfg, b, force=True)
    _assert_tree_equal(b, ck.load_checkpoint(tmp_path / "c").params)
    assert [p.name for p in tmp_path.iterdir()] == ["c"]
    # force never deletes a directory that is not ours
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data.txt").write_text("precious")
    with pytest.raises(ck.CheckpointError, match="not a dcam_jax checkpoint"):
        ck.save_checkpoint(foreign, cfg, a, force=True)
    assert (foreign / "data.txt").read_text() == "precious"


def test_partials_of_killed_writes_are_removed_by_the_next_write(tmp_path):
    import os
    import subprocess
    import sys

    cfg = C.tiny_lm()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".c.tmp-{dead}-0123456789ab"
    live = tmp_path / f".c.tmp-{os.getppid()}-0123456789ab"  # a running process: kept
    other = tmp_path / f".d.tmp-{dead}-0123456789ab"  # another checkpoint's partial: not ours to judge
    for d in (stale, live, other):
        d.mkdir()
        (d / "data").write_bytes(b"0" * 64)
    ck.save_checkpoint(tmp_path / "c", cfg, _numpy_params(cfg, seed=1))
    assert not stale.exists() and live.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["c", live.name, other.name])


def test_writer_rejects_unknown_duplicate_and_misshaped_params(tmp_path):
    cfg = C.tiny_lm()
    p = _numpy_params(cfg)
    with ck.CheckpointWriter(tmp_path / "c", cfg) as w:
        with pytest.raises(ck.CheckpointError, match="lm/bogus is not part of the layout"):
            w.add({"lm": {"bogus": np.zeros(2, np.float32)}})
        with pytest.raises(ck.CheckpointError, match=r"lm/embed has shape \(3,\)"):
            w.add({"lm": {"embed": np.zeros(3, np.float32)}})
        with pytest.raises(ck.CheckpointError, match="floating point"):
            w.add({"lm": {"embed": np.zeros(p["lm"]["embed"].shape, np.int32)}})
        w.add({"lm": {"embed": p["lm"]["embed"]}})
        with pytest.raises(ck.CheckpointError, match="lm/embed was already written"):
            w.add({"lm": {"embed": p["lm"]["embed"]}})
        w.add({"lm": {k: v for k, v in p["lm"].items() if k != "embed"}})
    _assert_tree_equal(p, ck.load_checkpoint(tmp_path / "c").params)


@pytest.fixture()
def saved(tmp_path):
    cfg = C.tiny_lm()
    ck.save_checkpoint(tmp_path / "c", cfg, _numpy_params(cfg))
    return tmp_path / "c"


def test_load_refuses_foreign_and_corrupt_directories(tmp_path, saved):
    with pytest.raises(ck.CheckpointError, match="does not exist"):
        ck.load_checkpoint(tmp_path / "nowhere")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    with pytest.raises(ck.CheckpointError, match=r"is not a dcam_jax checkpoint: it has no dcam_checkpoint\.json"):
        ck.load_checkpoint(plain)

    bad = tmp_path / "bad"
    shutil.copytree(saved, bad)
    (bad / "config.json").write_text('{"kind": "lm", "config": {"vocab_size": 64}}')
    with pytest.raises(ck.CheckpointError, match=r"config\.json is corrupt: .*missing field\(s\)"):
        ck.load_checkpoint(bad)
    (bad / "config.json").write_text('{"kind": "lm", "conf')
    with pytest.raises(ck.CheckpointError, match=r"config\.json is corrupt: config JSON does not parse"):
        ck.load_checkpoint(bad)
    (bad / "config.json").unlink()
    with pytest.raises(ck.CheckpointError, match=r"no config\.json"):
        ck.load_checkpoint(bad)

    marker = tmp_path / "marker"
    shutil.copytree(saved, marker)
    (marker / ck.MARKER_FILE).write_text("{not json")
    with pytest.raises(ck.CheckpointError, match=r"dcam_checkpoint\.json is corrupt"):
        ck.load_checkpoint(marker)
    (marker / ck.MARKER_FILE).write_text(json.dumps({"format": ck.FORMAT_NAME, "version": 99}))
    with pytest.raises(ck.CheckpointError, match="format version 99 is not supported"):
        ck.load_checkpoint(marker)

    noparams = tmp_path / "noparams"
    shutil.copytree(saved, noparams)
    shutil.rmtree(noparams / "params")
    with pytest.raises(ck.CheckpointError, match="has no params/ directory"):
        ck.load_checkpoint(noparams)
    (noparams / "params").mkdir()
    with pytest.raises(ck.CheckpointError, match="is not a readable orbax checkpoint"):
        ck.load_checkpoint(noparams)

    # params that disagree with the stored config (e.g. config.json edited by hand)
    edited = tmp_path / "edited"
    shutil.copytree(saved, edited)
    (edited / "config.json").write_text(C.to_json(C.tiny_lm(mlp_hidden=40)))
    with pytest.raises(ck.CheckpointError, match=r"wrong shape \['lm/layers/down: \(2, 48, 32\) \(config implies"):
        ck.load_checkpoint(edited)


def test_load_with_explicit_shardings(saved):
    dev = jax.devices()[0]
    one = jax.sharding.SingleDeviceSharding(dev)
    seen = []

    def rule(path, leaf):
        seen.append((path, leaf.shape))
        return one

    _, params, _ = ck.load_checkpoint(saved, sharding=rule)
    assert {p for p, _ in seen} == set(ck.param_shapes(C.tiny_lm()))
    assert all(x.sharding == one for x in jax.tree.leaves(params))
    tree = jax.tree.map(lambda _: one, params)
    _, params2, _ = ck.load_checkpoint(saved, sharding=tree)
    _assert_tree_equal(params, params2)
    with pytest.raises(ValueError, match=r"sharding pytree does not match the parameters: missing \['lm/embed'\]"):
        del tree["lm"]["embed"]
        ck.load_checkpoint(saved, sharding=tree)
    with pytest.raises(ValueError, match="sharding callable returned str"):
        ck.load_checkpoint(saved, sharding=lambda p, x: "cpu")


def _data_files(path):
    """The params' files, smallest to largest (the largest holds the tensor data)."""
    return sorted((f for f in (path / "params").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)


def test_flipped_or_truncated_bytes_are_caught_at_load(tmp_path, saved):
    flipped = tmp_path / "flipped"
    shutil.copytree(saved, flipped)
    target = _data_files(flipped)[-1]
    data = bytearray(target.read_bytes())
    for k in range(64):  # 64 flipped bytes in the middle of a data file, size unchanged
        data[len(data) // 2 + k] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(ck.CheckpointError, match="does not match the SHA-256"):
        ck.load_checkpoint(flipped)
    ck.load_checkpoint(flipped, verify="size")  # the cheap check cannot see it, by design
    truncated = tmp_path / "truncated"
    shutil.copytree(saved, truncated)
    target = _data_files(truncated)[-1]
    target.write_bytes(target.read_bytes()[:100])
    for mode in ("full", "size"):
        with pytest.raises(ck.CheckpointError, match="truncated or corrupt"):
            ck.load_checkpoint(truncated, verify=mode)
    # Without verification orbax fails on its own, and that failure is a CheckpointError too.
    with pytest.raises(ck.CheckpointError, match="failed to read the parameters"):
        ck.load_checkpoint(truncated, verify="none")
    with pytest.raises(ValueError, match="verify="):
        ck.load_checkpoint(saved, verify="sometimes")


def test_manifest_lists_every_file_and_old_markers_warn(tmp_path, saved, caplog):
    marker = json.loads((saved / ck.MARKER_FILE).read_text())
    on_disk = sorted(f.relative_to(saved).as_posix() for f in saved.rglob("*")
                     if f.is_file() and f.name != ck.MARKER_FILE)
    assert marker["version"] == ck.FORMAT_VERSION and sorted(marker["files"]) == on_disk
    old = tmp_path / "old"
    shutil.copytree(saved, old)
    del marker["files"]
    marker["version"] = 1
    (old / ck.MARKER_FILE).write_text(json.dumps(marker))
    with caplog.at_level("WARNING"):
        ck.load_checkpoint(old)
    assert "without a file manifest" in caplog.text


def test_non_finite_parameters_are_refused_at_save(tmp_path):
    cfg = C.tiny_lm()
    params = _numpy_params(cfg, seed=1)
    params["lm"]["final_norm"] = params["lm"]["final_norm"].copy()
    params["lm"]["final_norm"][3] = np.nan
    with pytest.raises(ck.CheckpointError, match="lm/final_norm holds NaN"):
        ck.save_checkpoint(tmp_path / "c", cfg, params)
    assert list(tmp_path.iterdir()) == []
