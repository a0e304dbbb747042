"""LaViDa-8B at full shape on one accelerator: forward, attribution, sampling, TFLOP/s and peak memory.

The model is the ``lavida`` preset (LLaDA-8B LM: 32 blocks of width 4096, 32 heads, MLP 12288, vocabulary
126464; SigLIP so400m/14 tower, 26 layers of width 1152; mlp2x_gelu projector; bilinear 27 -> 14 pooling;
Prefix-DLM attention) with random weights in ``--dtype``, created on the device by a jitted init (nothing is
downloaded or copied from the host). The sequence is the real token layout of a ``--image`` picture (768 x 768:
a base view and a 2 x 2 grid of 384 px views, 1,008 image tokens) spliced into ``--text_tokens`` random prompt
tokens, followed by the sampled answer (64 tokens, 32 steps, LaViDa's shift schedule): 1,112 tokens.

Rows, each timed as the median of ``--repeats`` calls after a first call (``jax.block_until_ready``); the first
call's wall time and the XLA compile time inside it are printed separately:
  - image tokens: tower + projector + pooling on the views (``mllm.image_tokens``);
  - forward: image tokens spliced into the prompt, then the LM over [prompt | answer], logits at every position
    (``mllm.mllm_logits``, jitted whole);
  - sampling without and with the prefix cache (``sampling.sample`` with the model's sampling defaults);
  - attribution of one answer token, and of every answer token in one call (``cam.explain.raw_token_maps``, the
    ``diffusion_cam`` preset: decision probe, conservative gradient rule, gradient x activation at the model's
    layer; raw maps, no refinement), the probe states taken from the sampled answer's trajectory.
For each row: FLOPs counted from the shapes (see ``_flops.py``), achieved TFLOP/s, its fraction of the
card's bf16 dense peak (H100 SXM and H200: 989 TFLOP/s; 'unknown' for other devices) and the device's peak
memory so far (``memory_stats()['peak_bytes_in_use']``; 'n/a' where the backend keeps none). Rows run in the
order printed, so the peak column grows with the row that needed it.

Usage:
  python benchmarks/gpu_scale.py                                   # full shape, bfloat16, on one GPU
  python benchmarks/gpu_scale.py --scale=64 --repeats=1            # widths, depths and vocabulary / 64: CPU
  python benchmarks/gpu_scale.py --json_out=gpu_scale.json         # also write every figure as JSON
At full shape it is sized to finish inside 8 minutes on one H100: seven compilations, then 1 + ``--repeats``
calls of each row; the longest row, the 64-token attribution call, is 0.61 PFLOP by the count below (its
32 decision states share the prompt's forward under LaViDa's prefix-LM attention; 1.6 PFLOP without). The
attribution holds ``--batch_size`` probe states' activations at once: lower it if the device runs out of memory.
"""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import _lm_bench
from _flops import image_flops, lm_flops, raw_token_maps_flops, sampling_flops
from dcam_jax import api, fileio
from dcam_jax import sampling as gen
from dcam_jax.cam import config as cam_config
from dcam_jax.cam import explain as ex
from dcam_jax.models import config as C
from dcam_jax.models import mllm
from dcam_jax.processing import image as pimg

FLAGS = flags.FLAGS
flags.DEFINE_integer("scale", 1, "Divide every width, head count, depth and the vocabulary by this power of two "
                     "(1: the real LaViDa-8B shape; 64: a CPU-sized model of the same sequence).")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Parameter and compute dtype.")
flags.DEFINE_string("image", "768x768", "Image size WIDTHxHEIGHT whose LaViDa token layout is used.")
flags.DEFINE_integer("text_tokens", 40, "Prompt text tokens besides the image.")
flags.DEFINE_integer("answer_len", None, "Answer length G (default: the model's, 64).")
flags.DEFINE_integer("steps", None, "Sampling steps (default: the model's, 32).")
flags.DEFINE_integer("layer", None, "Hooked block L (default: the model's CAM layer, n_layers // 3).")
flags.DEFINE_integer("batch_size", 8, "Probe states per vmapped chunk of the attribution (CamConfig.batch_size; "
                     "its memory grows with it).")
flags.DEFINE_integer("repeats", 3, "Timed repeats after the first call (median reported).")
flags.DEFINE_string("json_out", None, "Also write the figures to this JSON file.")
flags.register_validator("scale", lambda s: s >= 1 and s & (s - 1) == 0, "--scale must be a power of two >= 1")

# bf16 dense (no sparsity) tensor-core peak in TFLOP/s, from the vendor's data sheets
BF16_DENSE_PEAK_TFLOPS = {"H100 SXM": 989.0, "H200": 989.0}


def scaled_config(scale: int, dtype: str) -> C.MLLMConfig:
    """The ``lavida`` preset with widths, head counts, depths and the vocabulary divided by ``scale`` (depths at
    least 2 LM blocks and 1 tower layer, at least one head); the image geometry (384 px views, 14 px patches,
    pooling to 14 x 14) is unchanged, so the sequence keeps its length. Special ids move to the top of a smaller
    vocabulary."""
    cfg = C.lavida(dtype)
    if scale == 1:
        return cfg
    lm, vis = cfg.lm, cfg.vision
    V, D, H = lm.vocab_size // scale, lm.d_model // scale, max(1, lm.n_heads // scale)
    lm = dataclasses.replace(lm, vocab_size=V, d_model=D, n_layers=max(2, lm.n_layers // scale), n_heads=H,
                             n_kv_heads=H, head_dim=D // H, mlp_hidden=lm.mlp_hidden // scale, mask_id=V - 1,
                             eos_id=V - 2, pad_id=V - 2, bos_id=V - 3, eot_id=V - 4)
    vis = dataclasses.replace(vis, width=vis.width // scale, depth=max(1, vis.depth // scale),
                              num_heads=max(1, vis.num_heads // scale), mlp_dim=vis.mlp_dim // scale)
    return cfg.replace(lm=lm, vision=vis, name=f"lavida/{scale}")


def card_peak(device_kind: str) -> tuple[str, float | None]:
    """(card name, bf16 dense peak TFLOP/s) of a JAX device kind, or ('unknown', None)."""
    k = device_kind.upper()
    if "NVL" in k or "PCIE" in k:
        return "unknown", None
    if "H200" in k:
        return "H200", BF16_DENSE_PEAK_TFLOPS["H200"]
    if "H100" in k and ("SXM" in k or "HBM3" in k):  # the SXM card reports itself as "NVIDIA H100 80GB HBM3"
        return "H100 SXM", BF16_DENSE_PEAK_TFLOPS["H100 SXM"]
    return "unknown", None


def _memory(device) -> dict:
    stats = device.memory_stats() or {}
    return {k: stats.get(k) for k in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")}


def _gib(n) -> str:
    return "n/a" if n is None else f"{n / 2 ** 30:.3g}"


def _image_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise app.UsageError(f"--image={text!r} must look like 768x768 (WIDTHxHEIGHT in pixels)") from None
    return w, h


def main(argv):
    del argv
    cfg = scaled_config(FLAGS.scale, FLAGS.dtype)
    lm, vis = cfg.lm, cfg.vision
    dev = jax.devices()[0]
    card, peak = card_peak(dev.device_kind)
    samp = api.default_sampling(cfg)
    G = FLAGS.answer_len or samp.gen_length
    steps = FLAGS.steps or samp.steps
    cam = cam_config.resolve(cam_config.CamConfig(layer=FLAGS.layer, refine="none", batch_size=FLAGS.batch_size),
                             cfg)

    # ---- weights made on the device, prompt ids on the host, pixels on the device
    init = jax.jit(mllm.init_mllm_params, static_argnums=1)
    params, init_s, init_compile_s = _lm_bench.first_call(lambda: init(jax.random.key(0), cfg))
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    mem_init = _memory(dev)
    geom = pimg.image_geometry(_image_size(FLAGS.image), cfg)
    pixels = jax.random.uniform(jax.random.key(1), (geom.num_views, vis.image_size, vis.image_size, 3), jnp.float32,
                                -1.0, 1.0)
    ids = np.random.default_rng(0).integers(0, lm.vocab_size - 8, FLAGS.text_tokens + 1).astype(np.int32)
    ids[FLAGS.text_tokens // 2] = C.IMAGE_TOKEN_INDEX
    rows = []

    def row(name, fn, flops):
        t = _lm_bench.measure(fn, FLAGS.repeats)
        tflops = flops / t.median_s / 1e12
        rows.append({"name": name, **dataclasses.asdict(t), "tflop": flops / 1e12, "tflops": tflops,
                     "peak_fraction": None if peak is None else tflops / peak,
                     "peak_bytes_in_use": _memory(dev)["peak_bytes_in_use"]})
        return t.median_s

    image_tokens = jax.jit(mllm.image_tokens, static_argnums=(1, 3))
    row(f"image tokens: tower + projector ({geom.num_views} views)", lambda: image_tokens(params, cfg, pixels, geom),
        image_flops(cfg, geom.num_views))
    emb, layout = mllm.multimodal_embeddings(params, cfg, ids, pixels, geom)  # [P, D], its image tokens compiled
    P = int(emb.shape[0])
    S = P + G
    sampled, t_sample = {}, {}
    for cache in (False, True):
        def run_sampler(cache=cache):
            # one block over the whole answer, as LaViDa decodes
            sampled[cache] = gen.sample(
                params, cfg, key=jax.random.key(2), gen_length=G, block_length=G, steps=steps,
                temperature=samp.temperature, remasking=samp.remasking, schedule=samp.schedule, shift=samp.shift,
                attention=cfg.attention, prefix_cache=cache, prompt_embeds=emb[None])
            return sampled[cache]

        t_sample[cache] = row(f"sampling, {steps} steps, {'prefix cache' if cache else 'no prefix cache'}",
                              run_sampler, sampling_flops(lm, P, G, steps, cache))
    answer = np.asarray(sampled[True].tokens[0])
    commit = np.asarray(sampled[True].commit_step[0])
    same_tokens = bool(np.array_equal(answer, np.asarray(sampled[False].tokens[0])))

    forward = jax.jit(lambda p, px: mllm.mllm_logits(p, cfg, ids, px, geom, answer_ids=answer,
                                                     attention=cfg.attention)[0])
    row("forward: image tokens + LM, logits at every position", lambda: forward(params, pixels),
        image_flops(cfg, geom.num_views) + lm_flops(lm, S, S, S))

    def attribute(targets):
        return ex.raw_token_maps(params, cfg, cam, emb, layout, answer, targets, commit_step=commit)

    def work(targets):
        return raw_token_maps_flops(cam, lm, P, answer, targets, commit)

    t_one = row("attribution, 1 token (decision probe)", lambda: attribute([0]), work([0]))
    t_all = row(f"attribution, {G} tokens in one call (decision probe)", lambda: attribute(list(range(G))),
                work(list(range(G))))
    mem = _memory(dev)

    # ---- report
    print(f"device: {dev.platform} ({dev.device_kind}); card: {card}; bf16 dense peak: "
          f"{'unknown' if peak is None else f'{peak:.0f} TFLOP/s'}; jax {jax.__version__}")
    print(f"model: {cfg.name} {lm.dtype}, {cfg.num_params / 1e6:,.1f}M params ({_gib(weight_bytes)} GiB); "
          f"LM {lm.n_layers} x {lm.d_model} ({lm.n_heads} heads x {lm.head_dim}, MLP {lm.mlp_hidden}, vocab "
          f"{lm.vocab_size}); tower {vis.depth} x {vis.width} ({vis.num_heads} heads, MLP {vis.mlp_dim})")
    print(f"init on the device (jit): {init_s:.2f} s, compile {init_compile_s:.2f} s; device memory in use after "
          f"it: {_gib(mem_init['bytes_in_use'])} GiB of {_gib(mem_init['bytes_limit'])}")
    print(f"sequence: {S} tokens = {geom.num_image_tokens} image ({FLAGS.image}, {geom.num_views} views) + "
          f"{FLAGS.text_tokens} text + {G} answer; attention {cfg.attention}; sampling {steps} steps, "
          f"{samp.schedule} schedule; attribution {cam.method} (probe {cam.probe}, rule {cam.grad_rule}, "
          f"{cam.aggregation}, layer {cam.layer}), batch_size {cam.batch_size}; repeats {FLAGS.repeats}")
    print(f"{'row':<56}{'compile s':>10}{'first s':>9}{'median s':>10}{'TFLOP':>9}{'TFLOP/s':>9}{'of peak':>9}"
          f"{'peak GiB':>10}")
    for r in rows:
        frac = "unknown" if r["peak_fraction"] is None else f"{100 * r['peak_fraction']:.1f}%"
        print(f"{r['name']:<56}{r['compile_s']:>10.2f}{r['first_s']:>9.2f}{r['median_s']:>10.4f}{r['tflop']:>9.3g}"
              f"{r['tflops']:>9.3g}{frac:>9}{_gib(r['peak_bytes_in_use']):>10}")
    print(f"attribution per explained token: {t_one:.4f} s alone, {t_all / G:.4f} s in one call of {G} "
          f"({t_one * G / t_all:.2f}x)")
    print(f"prefix cache speedup of sampling: {t_sample[False] / t_sample[True]:.2f}x; identical tokens: "
          f"{same_tokens}")
    print(f"peak device memory: {_gib(mem['peak_bytes_in_use'])} GiB")
    if FLAGS.json_out:
        out = {"device": dev.platform, "device_kind": dev.device_kind, "card": card, "bf16_peak_tflops": peak,
               "config": C.to_dict(cfg), "num_params": cfg.num_params, "weight_bytes": weight_bytes,
               "sequence": {"total": S, "image": geom.num_image_tokens, "text": FLAGS.text_tokens, "answer": G,
                            "views": geom.num_views},
               "steps": steps, "cam": {"method": cam.method, "layer": cam.layer, "probe": cam.probe,
                                       "grad_rule": cam.grad_rule, "batch_size": cam.batch_size},
               "repeats": FLAGS.repeats, "init": {"first_s": init_s, "compile_s": init_compile_s},
               "memory_after_init": mem_init, "memory": mem, "rows": rows,
               "prefix_cache_identical_tokens": same_tokens}
        fileio.write_text(FLAGS.json_out, json.dumps(out, indent=2))
        print(f"wrote {FLAGS.json_out}")
    bad = [r["name"] for r in rows if not all(math.isfinite(r[k]) and r[k] > 0 for k in ("median_s", "tflops"))]
    if bad:
        raise SystemExit(f"non-positive or non-finite timings in rows {bad}")


if __name__ == "__main__":
    from dcam_jax.tool import run_tool

    run_tool(main)
