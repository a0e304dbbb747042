"""dcam_jax.sharding: the partition table, and a sharded forward on 4 fake CPU devices equal to the unsharded one."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from dcam_jax import sharding as sh
from dcam_jax.checkpoint import param_shapes, unflatten
from dcam_jax.models import config as C

REPO = Path(__file__).resolve().parents[1]


def test_partition_table_for_the_full_size_model():
    specs = {p: sh.partition_spec(p, s, "model", 8) for p, s in param_shapes(C.lavida()).items()}
    assert specs[("lm", "embed")] == P("model", None)
    assert specs[("lm", "lm_head")] == P(None, "model")
    for name in ("q", "k", "v", "gate", "up"):
        assert specs[("lm", "layers", name)] == P(None, None, "model")
    for name in ("o", "down"):
        assert specs[("lm", "layers", name)] == P(None, "model", None)
    replicated = {p for p, s in specs.items() if s == P()}
    assert replicated == set(specs) - {("lm", "embed"), ("lm", "lm_head")} - {
        ("lm", "layers", n) for n in ("q", "k", "v", "gate", "up", "o", "down")}
    assert ("lm", "layers", "attn_norm") in replicated and ("vision", "layers", "q", "kernel") in replicated


def test_indivisible_split_and_missing_axis_are_errors():
    with pytest.raises(ValueError, match=r"cannot split param lm/layers/gate \(2, 32, 50\) along dim 2 \(50\) over "
                                         r"mesh axis 'model' of size 4"):
        sh.partition_spec(("lm", "layers", "gate"), (2, 32, 50), "model", 4)
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    with pytest.raises(ValueError, match="no axis named 'model'"):
        sh.lm_sharding_rules(mesh)


def test_param_shardings_accepts_lm_only_trees():
    mesh = Mesh(np.array(jax.devices()[:1]), ("model",))
    lm = unflatten({p[1:]: np.zeros(s) for p, s in param_shapes(C.tiny_lm()).items()})  # without the "lm" level
    shardings = sh.param_shardings(lm, mesh)
    assert shardings["embed"].spec == P("model", None) and shardings["layers"]["down"].spec == P(None, "model", None)
    assert shardings["final_norm"].spec == P()


_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh
    from dcam_jax import sharding as sh
    from dcam_jax import checkpoint as ck
    from dcam_jax.models import config as C
    from dcam_jax.models import lm_logits

    assert len(jax.devices()) == 4, jax.devices()
    cfg = C.tiny_lm(n_kv_heads=2)
    rng = np.random.default_rng(0)
    params = ck.unflatten({p: (0.3 * rng.standard_normal(s)).astype(np.float32)
                           for p, s in ck.param_shapes(cfg).items()})
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 12)))
    fwd = jax.jit(lm_logits, static_argnums=1)
    ref_full = np.asarray(fwd(params, cfg, ids))
    out = {}
    for name, mesh in {"model4": Mesh(np.array(jax.devices()), ("model",)),
                       "data2_model2": Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))}.items():
        sharded = sh.shard_params(params, mesh)
        full = np.asarray(fwd(sharded, cfg, ids))
        embed, down = sharded["lm"]["embed"], sharded["lm"]["layers"]["down"]
        out[name] = {"full": float(np.abs(full - ref_full).max()),
                     "embed_shard": list(embed.addressable_shards[0].data.shape),
                     "down_shard": list(down.addressable_shards[0].data.shape),
                     "norm_shard": list(sharded["lm"]["final_norm"].addressable_shards[0].data.shape)}
    # loading straight into the sharded layout
    mesh = Mesh(np.array(jax.devices()), ("model",))
    ck.save_checkpoint(sys.argv[1], cfg, params)
    _, loaded, _ = ck.load_checkpoint(sys.argv[1], sharding=sh.lm_sharding_rules(mesh))
    want = sh.param_shardings(params, mesh)
    out["load_same_sharding"] = all(a.sharding == b for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(want)))
    out["load_equal"] = all(np.array_equal(np.asarray(a), b)
                            for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)))
    out["load_full"] = float(np.abs(np.asarray(fwd(loaded, cfg, ids)) - ref_full).max())
    print("RESULT " + json.dumps(out))
""")


def test_sharded_forward_equals_unsharded_on_4_fake_devices(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", _SCRIPT, str(tmp_path / "ckpt")], capture_output=True, text=True,
                       cwd=REPO, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("RESULT "))[7:])
    cfg = C.tiny_lm(n_kv_heads=2)
    for name in ("model4", "data2_model2"):
        m = 4 if name == "model4" else 2
        assert res[name]["full"] <= 1e-5, res
        assert res[name]["embed_shard"] == [cfg.vocab_size // m, cfg.d_model]
        assert res[name]["down_shard"] == [cfg.n_layers, cfg.mlp_hidden // m, cfg.d_model]
        assert res[name]["norm_shard"] == [cfg.d_model]  # replicated
    assert res["load_same_sharding"] and res["load_equal"] and res["load_full"] <= 1e-5
