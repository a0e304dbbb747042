r"""Is channel-weighted Grad-CAM meaningful on this model? Measure how the score's gradient at each image token
relates to that token's hooked activation, per layer.

Usage::

    python -m eval.alignment --checkpoint=toy --num_examples=20 --layers=0,1,2
    python -m eval.alignment --checkpoint=/ckpt/lavida --dataset=coco --data_dir=/data/coco --layers=4,10,20

For each example the model generates its answer; every content word (colour and shape words on ShapesWorld,
non-stop-words elsewhere) is scored (log-probability) with its position masked and the rest of the answer given,
and for each layer L the gradient G_i of that score at each image token's residual state A_i (output of block L,
the SPEC's hook) is compared with A_i. Printed per layer (medians over words):

- ``median |cos|``: median over image tokens of |cos(G_i, A_i)|;
- ``weighted |cos|``: the same averaged with weights |G_i| (the tokens that matter);
- ``norm ratio``: median |A_i| of the tokens with the largest gradients (top 10% by |G_i|) over the median |A_i|
  of all image tokens. Far below 1 means the tokens the score depends on have small states next to the rest
  (e.g. high-norm background tokens), which then dominate sum_c mean(G)_c A_c whatever the weights.

Near 0 means the upper network reads the stream (almost) only through RMSNorm, which is blind to a token's scale:
G_i . A_i ~ 0, so the channel-weighted map sum_c mean(G)_c A_c loses each token's own term and is made of cross
terms (``docs/explanation_quality.md`` has the toy model's numbers). ``--out_json`` keeps every number.
"""

from __future__ import annotations

import json

import numpy as np
from absl import app, flags

from dcam_jax import fileio
from eval import config as eval_config
from eval import sources
from eval import run as run_lib


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
    """Define the flags of ``python -m eval.alignment`` on ``fv``."""
    f = dict(flag_values=fv)
    flags.DEFINE_string("checkpoint", "toy", "'toy' (the embedded model) or a converted checkpoint directory.", **f)
    flags.DEFINE_enum("dataset", "shapes", list(eval_config.DATASETS), "Where the images come from (as eval.run).", **f)
    flags.DEFINE_string("data_dir", None, "Data directory for coco / grandf (as eval.run).", **f)
    flags.DEFINE_string("split", "test", "ShapesWorld split, or the COCO / GranDf split name (as eval.run).", **f)
    flags.DEFINE_integer("num_examples", 20, "Images to use.", **f)
    flags.DEFINE_list("layers", None, "Hooked blocks L (default: every block but the last).", **f)
    flags.DEFINE_integer("max_words", 8, "Content words per answer at most.", **f)
    flags.DEFINE_string("dtype", None, "Cast the checkpoint to this dtype (e.g. float32).", **f)
    flags.DEFINE_string("out_json", None, "Also write every per-word number to this JSON file.", **f)
    flags.DEFINE_bool("progress", True, "Show a progress bar.", **f)


def measure(model, source, indices, layers, *, max_words: int = 8, progress: bool = False) -> dict:
    """{layer: [{"example", "word", "median_abs_cos", "weighted_abs_cos", "norm_ratio"}, ...]} for the content
    words of the model's answers to ``source.item(i)`` for i in ``indices`` (see the module docstring)."""
    import jax
    import jax.numpy as jnp
    from tqdm.auto import tqdm

    from dcam_jax import api
    from dcam_jax.cam import attribution as attr
    from dcam_jax.cam import targets as cam_targets

    cfg = model.config
    out: dict[int, list] = {L: [] for L in layers}
    for i in tqdm(list(indices), desc="alignment", disable=not progress):
        item = source.item(i)
        pre = api.prepare(model, item.image, item.prompt)
        g = api.generate(model, item.image, item.prompt, key=jax.random.fold_in(jax.random.key(0), i), prepared=pre)
        words = [(w, ps) for w, ps in cam_targets.group_words(g.token_strings[:g.num_valid])
                 if cam_targets.is_content_word(w)]
        img = jnp.asarray(pre.layout.positions(pre.layout.default_view))
        tokens = np.asarray(g.tokens, np.int32)
        for w, ps in words[:max_words]:
            p = ps[0]
            state = tokens.copy()
            state[list(ps)] = cfg.lm.mask_id
            for L in layers:
                spec = attr.GradSpec(layer=L, attention=cfg.attention)
                cos, gn, an = attr.grad_activation_alignment(model.params, cfg, spec, pre.prompt_embeds, img,
                                                         jnp.asarray(state), jnp.asarray(tokens),
                                                         jnp.asarray([p], jnp.int32), jnp.asarray(tokens[[p]]))
                c, wts = np.abs(np.asarray(cos[0], np.float64)).ravel(), np.asarray(gn[0], np.float64).ravel()
                an = np.asarray(an, np.float64).ravel()
                top = wts >= np.quantile(wts, 0.9)
                out[L].append({"example": int(i), "word": w, "median_abs_cos": float(np.median(c)),
                               "weighted_abs_cos": float((c * wts).sum() / wts.sum()) if wts.sum() > 0 else 0.0,
                               "norm_ratio": float(np.median(an[top]) / np.median(an)) if np.median(an) > 0
                               else float("nan")})
    return out


def table(result: dict) -> str:
    """Markdown table of :func:`measure`'s result: one row per layer, medians over words."""
    lines = ["| block L | words | median over words of median |cos(G_i, A_i)| | of gradient-weighted |cos| "
             "| of norm ratio (top-gradient tokens / all) |", "|---|---|---|---|---|"]
    for L, recs in result.items():
        if recs:
            lines.append(f"| {L} | {len(recs)} | {np.median([r['median_abs_cos'] for r in recs]):.4f} | "
                         f"{np.median([r['weighted_abs_cos'] for r in recs]):.4f} | "
                         f"{np.nanmedian([r['norm_ratio'] for r in recs]):.3f} |")
        else:
            lines.append(f"| {L} | 0 | - | - | - |")
    return "\n".join(lines)


def main(argv):
    """Entry point of ``python -m eval.alignment``."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    F = flags.FLAGS
    if F.num_examples < 1 or F.max_words < 1:
        raise app.UsageError("--num_examples and --max_words must be >= 1")
    cfg = eval_config.RunConfig(checkpoint=F.checkpoint, out_dir="(none)", dataset=F.dataset, data_dir=F.data_dir,
                            split=F.split, num_examples=F.num_examples, dtype=F.dtype)
    try:
        eval_config.validate(cfg)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    model = run_lib.load_model(cfg)
    n_layers = model.config.lm.n_layers
    try:
        layers = [int(x) for x in F.layers] if F.layers else list(range(n_layers - 1))
    except ValueError:
        raise app.UsageError(f"--layers={','.join(F.layers)}: expected integers") from None
    bad = [L for L in layers if not 0 <= L < n_layers]
    if bad:
        raise app.UsageError(f"--layers {bad}: the model has blocks 0..{n_layers - 1}")
    source = sources.open_source(cfg)
    result = measure(model, source, range(min(F.num_examples, len(source))), layers, max_words=F.max_words,
                     progress=F.progress)
    print(table(result))
    if F.out_json:
        path = fileio.write_text(F.out_json, json.dumps({str(k): v for k, v in result.items()}, indent=1) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    define_flags()
    from dcam_jax.tool import run_tool

    run_tool(main)
