"""The small public API: load a model, generate an answer, explain it.

>>> import dcam_jax as dj, jax
>>> m = dj.load_pretrained("toy")
>>> g = dj.generate(m, "image.png", None, key=jax.random.key(0))     # g.text, g.tokens, g.commit_step
>>> e = dj.explain(m, "image.png", None, targets="content")          # e.maps [T, H, W] in [0, 1]
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dcam_jax import checkpoint as ckpt
from dcam_jax import sampling as gen
from dcam_jax.cam import attribution as attr
from dcam_jax.cam import probes
from dcam_jax.cam import config as cam_config
from dcam_jax.cam import explain as ex
from dcam_jax.cam import targets as cam_targets
from dcam_jax.cam import methods
from dcam_jax.models import mllm
from dcam_jax.models.config import MLLMConfig
from dcam_jax.processing import image as pimg
from dcam_jax.processing import text as ptext

ASSETS = Path(__file__).parent / "assets"
BUILTIN = {"toy": ASSETS / "toy"}


@dataclasses.dataclass
class Model:
    """A loaded dMLLM: ``config`` (MLLMConfig), ``params`` (pytree), ``tokenizer`` (or None),
    ``image_processor`` (:class:`~dcam_jax.processing.image.ImageProcessor`), ``path`` it was loaded from."""

    config: MLLMConfig
    params: Any
    tokenizer: Any
    image_processor: pimg.ImageProcessor
    path: Path | None = None

    def __repr__(self):
        n = self.config.num_params
        return (f"Model({self.config.name!r}, {n / 1e6:.2f}M params, dtype={self.config.lm.dtype}, "
                f"layout={self.config.image_aspect_ratio}, path={str(self.path) if self.path else None})")


def load_pretrained(name_or_path: str | os.PathLike = "toy", *, dtype: str | None = None, mesh=None) -> Model:
    """Load a model: ``"toy"`` (the embedded ShapesWorld model) or a converted checkpoint directory.

    dtype: cast parameters (e.g. "float32") and compute in that dtype; None keeps the stored dtype.
    mesh: optional ``jax.sharding.Mesh`` with a ``model`` axis: the LM's big matrices are sharded over it
      (dcam_jax.sharding rules), everything else replicated.
    """
    path = BUILTIN.get(str(name_or_path), Path(name_or_path))
    if str(name_or_path) in BUILTIN and not path.is_dir():
        raise FileNotFoundError(f"the embedded {name_or_path!r} checkpoint is missing from {path}; reinstall "
                                "dcam_jax or train it with `python -m dcam_jax.toy.train`")
    sharding = None
    if mesh is not None:
        from dcam_jax import sharding as shd
        sharding = shd.lm_sharding_rules(mesh)
    config, params, tok_dir = ckpt.load_checkpoint(path, dtype=dtype, sharding=sharding)
    if not isinstance(config, MLLMConfig):
        raise ValueError(f"{path} holds a language model only ({type(config).__name__}); dcam_jax explanations need "
                         "a multimodal checkpoint (LaViDa, LLaDA-V or the toy model)")
    if dtype is not None:
        config = dataclasses.replace(config, lm=dataclasses.replace(config.lm, dtype=str(np.dtype(dtype))),
                                     vision=dataclasses.replace(config.vision, dtype=str(np.dtype(dtype))))
    tokenizer = ptext.load_tokenizer(tok_dir) if tok_dir is not None else None
    return Model(config, params, tokenizer, pimg.ImageProcessor(config), path)


# ----------------------------------------------------------------------------------------------------------
# generation


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Masked-diffusion sampling settings (see dcam_jax.sampling.sample). ``None`` fields use the model's."""

    gen_length: int = 32
    block_length: int | None = None
    steps: int | None = None
    temperature: float = 0.0
    remasking: str = "low_confidence"
    schedule: str = "uniform"
    shift: float = 3.0
    prefix_cache: bool | None = None
    suppress_ids: tuple[int, ...] = ()


def default_sampling(config: MLLMConfig) -> SamplingConfig:
    """SamplingConfig with the model's own defaults (``config.sampling_defaults``) applied."""
    names = {f.name for f in dataclasses.fields(SamplingConfig)}
    unknown = [k for k, _ in config.sampling_defaults if k not in names]
    if unknown:
        raise ValueError(f"model config has unknown sampling defaults {unknown}; known: {sorted(names)}")
    return SamplingConfig(**dict(config.sampling_defaults))


@dataclasses.dataclass(frozen=True)
class Generation:
    """One generated answer.

    Attributes:
      text: decoded answer up to the end-of-turn / EOS token. tokens: [G] all answer ids (the sampler's length).
      token_strings: decoded string of every answer token. num_valid: tokens before the first stop id.
      commit_step: [G] the step each position was committed at. confidence: [G].
      num_steps: denoising steps. layout: the ImageLayout. prompt_ids: host ids [P_text] with the placeholder.
    """

    text: str
    tokens: np.ndarray
    token_strings: list[str]
    num_valid: int
    commit_step: np.ndarray
    confidence: np.ndarray
    num_steps: int
    layout: mllm.ImageLayout
    prompt_ids: np.ndarray


@dataclasses.dataclass(frozen=True)
class Prepared:
    """Host + device inputs of one (image, prompt): embeddings [P, D], layout, ids, image size."""

    prompt_embeds: jax.Array
    layout: mllm.ImageLayout
    prompt_ids: np.ndarray
    image_size: tuple[int, int]


def prepare(model: Model, image, prompt: str | None) -> Prepared:
    """Preprocess the image, build the chat prompt, run the tower and splice the image tokens in."""
    proc = model.image_processor(image)
    ids = ptext.build_prompt_ids(prompt, model.config, model.tokenizer)
    emb, layout = mllm.multimodal_embeddings(model.params, model.config, ids, proc.pixel_values, proc.geometry)
    if emb.shape[0] > model.config.lm.max_seq_len:
        raise ValueError(f"the prompt with its image is {emb.shape[0]} tokens, more than the model's "
                         f"max_seq_len={model.config.lm.max_seq_len}; use a smaller image")
    return Prepared(emb, layout, ids, proc.geometry.image_size)


def _stop_ids(model: Model) -> tuple[int, ...]:
    return (model.config.lm.eot_id, model.config.lm.eos_id)


def generate(model: Model, image, prompt: str | None = None, *, key: jax.Array | None = None,
             sampling: SamplingConfig | None = None, prepared: Prepared | None = None, **overrides) -> Generation:
    """Generate an answer with the masked-diffusion sampler and record its trajectory.

    image: path, PIL image or uint8 array; prompt: None uses the model's default prompt.
    sampling / overrides: sampling settings (e.g. ``gen_length=64, steps=32, schedule="shift"``).
    """
    s = dataclasses.replace(sampling or default_sampling(model.config), **overrides)
    if key is None:
        key = jax.random.key(0)
    pre = prepared or prepare(model, image, prompt)
    block = s.block_length or s.gen_length
    steps = s.steps or s.gen_length
    prefix_cache = (model.config.attention == "prefix_lm") if s.prefix_cache is None else s.prefix_cache
    res = gen.sample(model.params, model.config, key=key, gen_length=s.gen_length, block_length=block, steps=steps,
                     temperature=s.temperature, remasking=s.remasking, schedule=s.schedule, shift=s.shift,
                     attention=model.config.attention, prefix_cache=prefix_cache,
                     prompt_embeds=pre.prompt_embeds[None], suppress_ids=tuple(s.suppress_ids))
    tokens = np.asarray(res.tokens[0])
    if model.tokenizer is not None:
        text, n = ptext.decode_answer(model.tokenizer, tokens, _stop_ids(model))
        strings = ptext.token_strings(model.tokenizer, tokens)
    else:
        n = _valid_length(tokens, _stop_ids(model))
        text, strings = " ".join(str(t) for t in tokens[:n]), [str(t) for t in tokens]
    return Generation(text, tokens, strings, n, np.asarray(res.commit_step[0]), np.asarray(res.confidence[0]),
                      int(res.num_steps), pre.layout, pre.prompt_ids)


def _valid_length(tokens: np.ndarray, stop_ids: Sequence[int]) -> int:
    return int(ptext.answer_length(np.asarray(tokens), stop_ids))


# ----------------------------------------------------------------------------------------------------------
# explanation


def explain(model: Model, image, prompt: str | None = None, *, answer: str | Sequence[int] | None = None,
            targets: Any = "all", config: cam_config.CamConfig | None = None, key: jax.Array | None = None,
            sampling: SamplingConfig | None = None, generation: Generation | None = None) -> ex.Explanation:
    """Explain the answer tokens of ``model`` for ``image`` and ``prompt`` with one heat map per target.

    answer: None generates it (and records the trajectory that probe "decision" needs); a string or ids explains
      a given answer (then use probe "clean" or "noise"). generation: reuse a :class:`Generation`.
    targets: "all", "content" (content words, sub-tokens together), answer positions, or words.
    config: a :class:`CamConfig` (default: Diffusion-CAM). key: PRNG key for sampling and noise probes.
    Returns an :class:`~dcam_jax.cam.explain.Explanation` (maps [T, H, W] in [0, 1]).
    """
    cam = cam_config.resolve(config or cam_config.CamConfig(), model.config)
    key = jax.random.key(0) if key is None else key
    gkey, nkey = jax.random.split(key)
    pre = prepare(model, image, prompt)
    commit_step = None
    num_steps = None
    if generation is not None:
        tokens, strings, n_valid = generation.tokens, generation.token_strings, generation.num_valid
        commit_step, num_steps = generation.commit_step, generation.num_steps
    elif answer is None:
        g = generate(model, image, prompt, key=gkey, sampling=sampling, prepared=pre)
        tokens, strings, n_valid, commit_step, num_steps = g.tokens, g.token_strings, g.num_valid, g.commit_step, \
            g.num_steps
    else:
        if isinstance(answer, str):
            if model.tokenizer is None:
                raise ValueError("a text answer needs the model's tokenizer; pass token ids instead")
            tokens = np.asarray(model.tokenizer(answer).input_ids, np.int32)
        else:
            tokens = np.asarray(answer, np.int32)
        if tokens.ndim != 1 or tokens.size == 0:
            raise ValueError("the given answer is empty")
        strings = (ptext.token_strings(model.tokenizer, tokens) if model.tokenizer is not None
                   else [str(t) for t in tokens])
        n_valid = _valid_length(tokens, _stop_ids(model))
    text = ("".join(strings[:n_valid]).strip() if model.tokenizer is None
            else model.tokenizer.decode([int(t) for t in tokens[:n_valid]], skip_special_tokens=True).strip())
    return explain_prepared(model, pre, tokens, strings, n_valid, targets, cam, commit_step=commit_step,
                            num_steps=num_steps, key=nkey, text=text)


def explain_trajectory(model: Model, image, prompt: str | None = None, *, targets: Any = "content",
                       config: cam_config.CamConfig | None = None, num_states: int = 8, key: jax.Array | None = None,
                       sampling: SamplingConfig | None = None,
                       generation: Generation | None = None) -> ex.TrajectoryExplanation:
    """Each target's map at ``num_states`` states along the denoising trajectory, from the all-masked start to the
    state that decided the token (the ``trajectory`` probe, kept per state instead of averaged).

    config: the gradient method (default Diffusion-CAM; its probe is replaced by ``trajectory``; TAM has no
      gradient and is refused). generation: reuse a :class:`Generation` (else the answer is generated with
      ``key`` and ``sampling``, as :func:`explain` does). For a word of several sub-tokens the maps of its
      sub-tokens are averaged state by state, and the steps and state texts are those of its first sub-token.
    Returns a :class:`~dcam_jax.cam.explain.TrajectoryExplanation` (maps [T, K, H, W], steps [T, K]).
    """
    cam = cam_config.resolve(config or cam_config.CamConfig(), model.config)
    if not methods.get(cam.method).has_states:
        raise ValueError(f"method {cam.method!r} is gradient-free and has no probe states; use a gradient method")
    if not isinstance(num_states, (int, np.integer)) or num_states < 1:
        raise ValueError(f"num_states={num_states!r} must be an int >= 1")
    cam = dataclasses.replace(cam, probe="trajectory", num_trajectory_states=int(num_states))
    key = jax.random.key(0) if key is None else key
    gkey, _ = jax.random.split(key)
    pre = prepare(model, image, prompt)
    g = generation if generation is not None else generate(model, image, prompt, key=gkey, sampling=sampling,
                                                           prepared=pre)
    labels = cam_targets.resolve_targets(targets, g.token_strings, g.num_valid)
    flat = sorted({p for _, ps in labels for p in ps})
    index = {p: i for i, p in enumerate(flat)}
    valid = np.arange(len(g.tokens)) < g.num_valid
    maps, _ = ex.raw_token_maps(model.params, model.config, cam, pre.prompt_embeds, pre.layout, g.tokens, flat,
                                commit_step=g.commit_step, answer_valid=valid, per_state=True)
    maps = np.asarray(maps)  # [len(flat), K, H, W]
    words = np.stack([maps[[index[p] for p in ps]].mean(0) for _, ps in labels])  # [T, K, H, W]
    T, K, H, W = words.shape
    norm = np.asarray(attr.normalize_maps(jnp.asarray(words.reshape(T * K, H, W)))).reshape(T, K, H, W)
    first = [ps[0] for _, ps in labels]
    steps = probes.trajectory_steps(g.commit_step, first, K)  # [T, K]
    commit = np.asarray(g.commit_step)
    texts = [["".join(s if commit[i] < st else " [MASK]" for i, s in enumerate(g.token_strings[:g.num_valid])).strip()
              for st in row] for row in steps]
    return ex.TrajectoryExplanation(
        maps=norm.astype(np.float32), steps=steps, commit_steps=commit[first], state_texts=texts,
        tokens=[l for l, _ in labels], positions=[ps for _, ps in labels], text=g.text, num_steps=int(g.num_steps),
        layout=pre.layout, view=cam.view or pre.layout.default_view, image_size=pre.image_size, config=cam)


def explain_prepared(model: Model, pre: Prepared, tokens: np.ndarray, strings: Sequence[str], n_valid: int,
                     targets, cam: cam_config.CamConfig, *, commit_step=None, num_steps=None, key=None,
                     text: str = "") -> ex.Explanation:
    """Array-level explanation of an answer whose prompt has been prepared (see :func:`explain`).

    cam: a resolved CamConfig (``dcam_jax.cam.config.resolve``); tokens: [G] answer ids; strings: their G decoded
    strings; n_valid: the answer's length before its stop token; commit_step: [G] or None.
    """
    cam_config.require_resolved(cam, "explain_prepared")
    labels = cam_targets.resolve_targets(targets, strings, n_valid)
    flat = sorted({p for _, ps in labels for p in ps})
    index = {p: i for i, p in enumerate(flat)}
    valid = np.arange(len(tokens)) < n_valid
    view = cam.view or pre.layout.default_view
    method = methods.get(cam.method)
    maps, scores, aux = method.raw_maps(methods.MapsRequest(
        params=model.params, config=model.config, cam=cam, prompt_embeds=pre.prompt_embeds, layout=pre.layout,
        answer=np.asarray(tokens), targets=flat, commit_step=commit_step, answer_valid=valid, key=key, view=view))
    maps, scores = np.asarray(maps), np.asarray(scores)
    # a word made of several sub-tokens: average its sub-tokens' raw maps (like averaging probe states)
    raw = np.stack([maps[[index[p] for p in ps]].mean(0) for _, ps in labels])
    word_scores = np.asarray([scores[[index[p] for p in ps]].mean() for _, ps in labels])
    raw_n = np.asarray(attr.normalize_maps(jnp.asarray(raw)))
    if num_steps is None:  # a given answer: AKD's adaptive kernel uses the model's default number of steps
        d = default_sampling(model.config)
        num_steps = d.steps or d.gen_length
    refined = np.asarray(method.finish(methods.FinishRequest(
        raw=raw, normalized=raw_n, aux=aux, labels=labels, index=index, answer=np.asarray(tokens),
        answer_valid=valid, num_steps=int(num_steps), image_long_side=max(pre.image_size), cam=cam)))
    if cam.threshold is not None:
        mx = refined.max(axis=(-2, -1), keepdims=True)
        refined = np.where(mx > 0, refined / np.where(mx > 0, mx, 1), 0.0)
        refined = np.where(refined < cam.threshold, 0.0, refined)
    return ex.Explanation(maps=refined.astype(np.float32), raw_maps=raw_n.astype(np.float32),
                          tokens=[l for l, _ in labels], positions=[ps for _, ps in labels], scores=word_scores,
                          text=text, answer_ids=np.asarray(tokens), layout=pre.layout, view=view,
                          image_size=pre.image_size, config=cam)
