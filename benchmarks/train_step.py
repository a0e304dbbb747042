"""Toy training step time: the 2-D ``layers.linear`` against a plain 3-D ``x @ w`` in every dense layer.

Times, on one ShapesWorld batch, the jitted value-and-gradient of the two training losses of
``dcam_jax.toy.train``: the masked-diffusion captioning loss (tower and projector frozen, as in the recipe) and the
tower-pretraining object loss on whole images. Each is compiled once per variant (compile time excluded), then run
``--repeats`` times; prints the medians and the ratio 3-D / 2-D, and checks the two variants give the same loss.

Usage: python benchmarks/train_step.py [--batch 32] [--lm_layers 4] [--repeats 10]
"""

import argparse
import dataclasses
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from dcam_jax.data import shapes
from dcam_jax.models import llada, projector, siglip
from dcam_jax.models.layers import linear
from dcam_jax.processing import image as pimg
from dcam_jax.processing import text as ptext
from dcam_jax.toy import model as tm
from dcam_jax.toy import tokenizer as toy_tok
from dcam_jax.toy import tower_heads as th

MODULES = (llada, siglip, projector)


def matmul_3d(x, w):
    return x @ w.astype(x.dtype)


def use(fn):
    for m in MODULES:
        m.linear = fn


def median_ms(fn, args, repeats):
    jax.block_until_ready(fn(*args))  # compile
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t)
    return 1000 * float(np.median(ts))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lm_layers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=10)
    a = p.parse_args()
    cfg = tm.toy_config()
    cfg = cfg.replace(lm=dataclasses.replace(cfg.lm, n_layers=a.lm_layers))
    with tempfile.TemporaryDirectory() as tmp:
        tok = ptext.load_tokenizer(toy_tok.save_tokenizer(f"{tmp}/tok"))
    geom, ids = tm.toy_geometry(cfg), tm.prompt_ids(cfg, tok)
    params = tm.init_toy_params(jax.random.key(0), cfg)
    heads = th.init_object_heads(jax.random.key(1), cfg.lm.d_model)
    b = shapes.batch("train", range(a.batch), shapes.preset("default"))
    hb = tm.make_host_batch(b, cfg, tok, pimg.ImageProcessor(cfg), 32)

    def lm_loss(p):
        return tm.diffusion_loss(p, cfg, geom, ids, hb.pixel_values, hb.answers, hb.token_class, jax.random.key(2),
                                 freeze_tower=True, pad_weight=0.05).loss

    def tower_loss(p, h):
        return th.object_losses(p, h, cfg, geom, hb.pixel_values, hb.obj_weights_base, hb.obj_weights_hi,
                                hb.obj_shape, hb.obj_colour, hb.obj_centre, hb.obj_relation).loss

    results = {}
    for name, fn in (("3-D x @ w", matmul_3d), ("2-D linear", linear)):
        use(fn)  # the functions are traced anew under each variant (fresh jit wrappers)
        lm = jax.jit(jax.value_and_grad(lm_loss))
        tw = jax.jit(jax.value_and_grad(tower_loss, argnums=(0, 1)))
        results[name] = (median_ms(lm, (params,), a.repeats), median_ms(tw, (params, heads), a.repeats),
                         float(lm(params)[0]), float(tw(params, heads)[0]))
    use(linear)
    print(f"toy training step, batch {a.batch}, LM {a.lm_layers} layers, median of {a.repeats} "
          f"({jax.devices()[0].platform})")
    for name, (t_lm, t_tw, l_lm, l_tw) in results.items():
        print(f"  {name:11s} captioning loss+grad {t_lm:7.1f} ms   tower loss+grad {t_tw:7.1f} ms   "
              f"(losses {l_lm:.6f}, {l_tw:.6f})")
    (a3, b3, la3, lb3), (a2, b2, la2, lb2) = results.values()
    print(f"  ratio 3-D / 2-D: captioning x{a3 / a2:.2f}, tower x{b3 / b2:.2f}; "
          f"loss difference {abs(la3 - la2):.1e}, {abs(lb3 - lb2):.1e}")


if __name__ == "__main__":
    main()
