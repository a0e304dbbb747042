r"""Caption accuracy of a toy checkpoint on ShapesWorld.

    python -m dcam_jax.toy.evaluate --checkpoint=toy --num_examples=500

Generates a caption for each of the first N examples of a split (default: the *test* split of the ``default``
preset) with the masked-diffusion sampler at the default settings (T = 0, low-confidence remasking, one block,
steps = gen_length) and compares the objects it names with the true ones:

* **objects all right** (the issue's target, >= 90%): the generated caption names exactly the true objects, each
  with its own colour and shape (colour-shape pairs bound correctly), in any order;
* **in order**: the same, and in the caption's left-to-right order;
* **colour / shape accuracy per object** (target >= 97% each): each true object is matched to a generated object
  phrase (an assignment maximising the number of agreeing colour and shape words); the object's colour (shape)
  is right when its matched phrase has the same colour (shape). Unmatched true objects count as wrong.
* **exact caption**: the generated caption equals the true one word for word (relations included);
* **ended**: the answer contains the end token (``<|eot_id|>`` or ``<|endoftext|>``) within ``gen_length``;
* **well formed**: it ended, and its words are a sentence of the caption grammar
  (:func:`dcam_jax.data.shapes.is_well_formed`: no repeated articles, no dangling relations).

``--pil_sets=dark:128x128,light:160x96`` captions images drawn by a different program instead
(:mod:`dcam_jax.data.pil_shapes`, PIL's ImageDraw on dark, light or white backgrounds at any size), each set
``--num_examples`` images, and reports every set and all of them together.

The decoder is :func:`dcam_jax.sampling.sample`; ``--decoder=interim`` uses a small built-in greedy LLaDA decoder
with the same semantics instead (:func:`greedy_decode`, written before the sampler existed and kept as an
independent check: both give the same captions).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dcam_jax.data import shapes
from dcam_jax.models.config import MLLMConfig
from dcam_jax.processing import image as pimg
from dcam_jax.processing import text as ptext
from dcam_jax.toy import model as tm

Params = dict[str, Any]


# ----------------------------------------------------------------------------------------------------------
# decoding


def num_transfer_tokens(gen_length: int, steps: int) -> np.ndarray:
    """Tokens committed per step in one block, LLaDA's uniform schedule: [steps] ints summing to gen_length
    (the remainder goes to the first steps)."""
    if steps <= 0 or steps > gen_length:
        raise ValueError(f"steps={steps} must be in [1, gen_length={gen_length}]")
    base, rem = divmod(gen_length, steps)
    return np.array([base + (1 if k < rem else 0) for k in range(steps)], np.int32)


def greedy_decode(params: Params, config: MLLMConfig, prefix: jax.Array, gen_length: int, steps: int) -> jax.Array:
    """Interim decoder (an independent check of ``dcam_jax.sampling.sample``; ``--decoder=interim``).

    LLaDA low-confidence remasking at temperature 0, one block: start from G masks; at each step predict every
    position (never [MASK] itself), and commit the ``num_transfer_tokens`` still-masked positions whose argmax
    probability is highest (ties: the lower position first).
    prefix: [B, P, D] prompt embeddings (image spliced in) -> tokens [B, G] int32.
    """
    return _greedy_jit(params, config, prefix, gen_length, steps)


def _greedy(params, config, prefix, gen_length, steps):
    B = prefix.shape[0]
    mask_id = config.lm.mask_id
    quota = jnp.asarray(num_transfer_tokens(gen_length, steps))

    def body(k, x):
        logits = tm.answer_logits(params, config, prefix, x, attention=config.attention)
        logits = logits.at[..., mask_id].set(-jnp.inf)  # never predict [MASK] itself
        probs = jax.nn.softmax(logits, -1)
        pred = jnp.argmax(logits, -1).astype(jnp.int32)
        conf = jnp.take_along_axis(probs, pred[..., None], -1)[..., 0]
        is_mask = x == mask_id
        conf = jnp.where(is_mask, conf, -jnp.inf)
        # rank of each position by confidence (0 = most confident); commit the top quota[k]
        order = jnp.argsort(-conf, axis=-1)
        rank = jnp.argsort(order, axis=-1)
        commit = is_mask & (rank < quota[k])
        return jnp.where(commit, pred, x)

    x0 = jnp.full((B, gen_length), mask_id, jnp.int32)
    return jax.lax.fori_loop(0, steps, body, x0)


_greedy_jit = jax.jit(_greedy, static_argnums=(1, 3, 4))
_image_blocks_jit = jax.jit(tm.image_blocks, static_argnums=(1, 3))


def decode(params: Params, config: MLLMConfig, prefix: jax.Array, gen_length: int, steps: int | None = None,
           decoder: str = "sampler", block_length: int | None = None) -> np.ndarray:
    """Answer tokens [B, G] for prompt embeddings ``prefix`` [B, P, D] at the default sampling settings.

    decoder: "sampler" (dcam_jax.sampling.sample at temperature 0, low-confidence remasking, one block) or
    "interim" (:func:`greedy_decode`, an independent implementation of the same rule kept as a cross-check).
    block_length: semi-autoregressive blocks of this many tokens (sampler only; None = one block of
    ``gen_length``, the default); ``steps`` are then shared equally by the blocks.
    """
    steps = steps or gen_length
    if decoder not in ("sampler", "interim"):
        raise ValueError(f"decoder={decoder!r}, expected 'sampler' or 'interim'")
    if decoder == "interim" and block_length not in (None, gen_length):
        raise ValueError("decoder='interim' decodes one block only; use decoder='sampler' for block_length="
                         f"{block_length}")
    if decoder == "sampler":
        from dcam_jax import sampling

        res = sampling.sample(params, config, key=jax.random.key(0), gen_length=gen_length,
                              block_length=block_length or gen_length,
                              steps=steps, temperature=0.0, remasking="low_confidence", schedule="uniform",
                              attention=config.attention, prefix_cache=False, prompt_embeds=prefix)
        return np.asarray(res.tokens)
    return np.asarray(greedy_decode(params, config, prefix, gen_length, steps))


# ----------------------------------------------------------------------------------------------------------
# scoring


@dataclasses.dataclass(frozen=True)
class CaptionScore:
    """How one generated caption names the true objects (see the module docstring)."""

    objects_right: bool
    in_order: bool
    exact: bool
    colour_right: tuple[bool, ...]
    shape_right: tuple[bool, ...]
    num_generated: int
    ended: bool = True
    well_formed: bool = True


def score_caption(generated: str, colours: Sequence[str], shapes_: Sequence[str], caption: str,
                  ended: bool = True) -> CaptionScore:
    """Score ``generated`` against the true objects (``colours``, ``shapes_`` in caption order) and ``caption``;
    ``ended`` says whether the answer held an end token."""
    truth = list(zip(colours, shapes_))
    gen = [(c, s) for _, c, s in shapes.parse_caption(generated)]
    assign = shapes.match_phrases(colours, shapes_, [(None, c, s) for c, s in gen])
    colour_right = tuple(j >= 0 and gen[j][0] == truth[i][0] for i, j in enumerate(assign))
    shape_right = tuple(j >= 0 and gen[j][1] == truth[i][1] for i, j in enumerate(assign))
    objects_right = sorted(gen, key=str) == sorted(truth, key=str)
    return CaptionScore(objects_right, gen == truth, generated.split() == caption.split(), colour_right,
                        shape_right, len(gen), bool(ended), bool(ended) and shapes.is_well_formed(generated))


@dataclasses.dataclass
class EvalReport:
    """Per-example results and their summary."""

    split: str
    preset: str
    captions: list[str]
    generated: list[str]
    scores: list[CaptionScore]

    sets: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """{"examples", "objects_all_right", "in_order", "exact_caption", "colour_acc", "shape_acc",
        "ended", "well_formed", "objects"} as fractions (per example, or per true object for the accuracies);
        with several image sets, also "per_set": the same per set."""
        out = {"split": self.split, "preset": self.preset, **_summarise(self.scores)}
        if len(set(self.sets)) > 1:
            out["per_set"] = {name: _summarise([x for x, n in zip(self.scores, self.sets) if n == name])
                              for name in dict.fromkeys(self.sets)}
        return out


def _summarise(s: Sequence[CaptionScore]) -> dict[str, Any]:
    colour = [c for x in s for c in x.colour_right]
    shape = [c for x in s for c in x.shape_right]
    return {"examples": len(s),
            "objects_all_right": float(np.mean([x.objects_right for x in s])),
            "in_order": float(np.mean([x.in_order for x in s])),
            "exact_caption": float(np.mean([x.exact for x in s])),
            "colour_acc": float(np.mean(colour)), "shape_acc": float(np.mean(shape)),
            "ended": float(np.mean([x.ended for x in s])),
            "well_formed": float(np.mean([x.well_formed for x in s])), "objects": len(colour)}


def parse_pil_sets(text: str) -> list[tuple[str, int, int]]:
    """``"dark:128x128,light:160x96"`` -> [("dark", 128, 128), ("light", 160, 96)] (background, width,
    height); a set without ``:SIZE`` is 128 x 128."""
    from dcam_jax.data import pil_shapes

    out = []
    for item in [t.strip() for t in text.split(",") if t.strip()]:
        background, _, size = item.partition(":")
        if background not in pil_shapes.BACKGROUND_KINDS:
            raise ValueError(f"PIL set {item!r}: background must be one of {pil_shapes.BACKGROUND_KINDS}")
        w, h = pil_shapes.parse_size(size) if size else (128, 128)
        out.append((background, w, h))
    if not out:
        raise ValueError(f"no PIL sets in {text!r}; expected e.g. 'dark:128x128,light:160x96'")
    return out


def evaluate(params: Params, config: MLLMConfig, tokenizer, *, num_examples: int = 500, split: str = "test",
             preset: str = "default", start: int = 0, batch_size: int = 50, gen_length: int = tm.TOY_GEN_LENGTH,
             steps: int | None = None, decoder: str = "sampler", progress: bool = True,
             block_length: int | None = None, pil_sets: Sequence[tuple[str, int, int]] = ()) -> EvalReport:
    """Generate captions for examples ``start .. start + num_examples - 1`` of ``split`` and score them
    (decoding as :func:`decode`). With ``pil_sets`` ((background, width, height) triples), caption that many
    PIL-drawn examples of each set instead of ShapesWorld ``preset``."""
    from tqdm.auto import tqdm

    if num_examples <= 0:
        raise ValueError(f"num_examples={num_examples} must be positive")
    processor = pimg.ImageProcessor(config)
    ids = tm.prompt_ids(config, tokenizer)
    stop = (config.lm.eot_id, config.lm.eos_id)
    if pil_sets:
        from dcam_jax.data import pil_shapes

        sources = []
        for background, w, h in pil_sets:
            pcfg = pil_shapes.PilShapesConfig(width=w, height=h, background=background)
            sources.append((f"{background}:{w}x{h}",
                            lambda i, pcfg=pcfg: pil_shapes.make_example(shapes.split_seed(split, i), pcfg)))
        label = "pil_shapes"
    else:
        cfg = shapes.preset(preset)
        sources = [(preset, lambda i: shapes.make_example(shapes.split_seed(split, i), cfg))]
        label = preset
    report = EvalReport(split, label, [], [], [])
    for name, make in sources:
        for lo in tqdm(range(start, start + num_examples, batch_size), desc=f"captioning {split} {name}",
                       disable=not progress, dynamic_ncols=True):
            hi = min(lo + batch_size, start + num_examples)
            examples = [make(i) for i in range(lo, hi)]
            processed = [processor(e.image) for e in examples]
            pix = np.stack([p.pixel_values for p in processed])
            blocks = _image_blocks_jit(params, config, jnp.asarray(pix), processed[0].geometry)
            prefix = tm.prefix_embeddings(params, config, ids, blocks)
            tokens = decode(params, config, prefix, gen_length, steps, decoder, block_length)
            for e, t in zip(examples, tokens):
                text, kept = ptext.decode_answer(tokenizer, t, stop)
                report.captions.append(e.caption)
                report.generated.append(text)
                report.scores.append(score_caption(text, e.colours, e.shapes, e.caption, ended=kept < len(t)))
                report.sets.append(name)
    return report


# ----------------------------------------------------------------------------------------------------------
# command line


def _flags():
    from absl import flags

    flags.DEFINE_string("checkpoint", "toy", "'toy' (the embedded model) or a checkpoint directory.")
    flags.DEFINE_integer("num_examples", 500, "Number of examples to caption.")
    flags.DEFINE_enum("split", "test", list(shapes.SPLITS), "ShapesWorld split.")
    flags.DEFINE_enum("preset", "default", list(shapes.PRESETS), "ShapesWorld preset.")
    flags.DEFINE_string("pil_sets", None, "Caption PIL-drawn images instead of ShapesWorld: comma-separated "
                        "BACKGROUND:WIDTHxHEIGHT sets (background dark, light or white), --num_examples each, "
                        "e.g. 'dark:128x128,light:128x128,white:160x96'.")
    flags.DEFINE_integer("start", 0, "Index of the first example.")
    flags.DEFINE_integer("batch_size", 50, "Examples decoded together.")
    flags.DEFINE_integer("gen_length", tm.TOY_GEN_LENGTH, "Answer length.")
    flags.DEFINE_integer("steps", None, "Denoising steps (default: gen_length).")
    flags.DEFINE_integer("block_length", None, "Semi-autoregressive block length (sampler only; default: one "
                         "block of gen_length, the model's default setting).")
    flags.DEFINE_enum("decoder", "sampler", ["sampler", "interim"],
                      "dcam_jax.sampling.sample ('sampler', greedy low-confidence remasking) or the independent "
                      "greedy decoder kept as a cross-check ('interim').")
    flags.DEFINE_string("json_out", None, "Write the summary and every generated caption to this JSON file.")
    flags.DEFINE_integer("show", 5, "Print this many (true, generated) caption pairs.")
    return flags.FLAGS


def main(argv):
    del argv
    from dcam_jax import api

    F = _FLAGS
    try:
        pil_sets = parse_pil_sets(F.pil_sets) if F.pil_sets else ()
    except ValueError as e:
        raise SystemExit(f"error: --pil_sets: {e}")
    model = api.load_pretrained(F.checkpoint)
    rep = evaluate(model.params, model.config, model.tokenizer, num_examples=F.num_examples, split=F.split,
                   preset=F.preset, start=F.start, batch_size=F.batch_size, gen_length=F.gen_length, steps=F.steps,
                   decoder=F.decoder, block_length=F.block_length, pil_sets=pil_sets)
    summary = rep.summary()
    summary["decoder"] = F.decoder
    summary["block_length"] = F.block_length or F.gen_length
    for t, g in list(zip(rep.captions, rep.generated))[:F.show]:
        print(f"  true: {t}\n  gen : {g}")
    print(json.dumps(summary, indent=2))
    if F.json_out:
        from dcam_jax import fileio

        fileio.write_text(F.json_out, json.dumps({"summary": summary, "captions": rep.captions,
                                                  "generated": rep.generated}, indent=1))


_FLAGS = None

if __name__ == "__main__":
    from absl import app

    _FLAGS = _flags()
    from dcam_jax.tool import run_tool

    run_tool(main)
