"""Explanations of answer tokens: method presets, probe states, raw maps, refinement, and the result object.

``CamConfig`` chooses a method and its knobs; :func:`explain_answer` works on arrays that the host already
prepared (prompt embeddings with the image spliced in, the ImageLayout, the answer and its trajectory) and
returns an :class:`Explanation`. The user-facing ``dcam_jax.explain(model, image, prompt)`` wraps it.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dcam_jax.cam import attribution as attr
from dcam_jax.models import llada
from dcam_jax.models.config import MLLMConfig
from dcam_jax.models.mllm import ImageLayout

PROBES = ("decision", "trajectory", "noise", "clean", "final")


@dataclasses.dataclass(frozen=True)
class CamConfig:
    """How to explain answer tokens.

    Attributes:
      method: "diffusion_cam" (default: decision probe, conservative gradients, per-token gradient x activation,
        the default refinement), "paper" (the paper's formulas as written: standard gradients, channel-weighted
        Grad-CAM, the full refinement chain), "reference_compat" (the authors' released code), "gradcam" (the
        authors' Grad-CAM baseline), "llava_cam", "tam", "layercam", "gradcam_pp", "hirescam". Fields left as None
        take the method's preset (see :func:`resolve`); anything set explicitly wins.
      layer: hooked block index L (None: :func:`default_layer`: the model's ``cam_layer``, chosen by the protocol
        of SPEC 4.6, else n_layers // 3, i.e. 10 of 32; TAM: the last block).
      probe: "decision" (the state just before the token was committed), "trajectory" (``num_trajectory_states``
        states evenly spaced from the start of generation to the decision state, averaged), "noise" (K random
        re-maskings of the final answer, the target always masked), "clean" (the final answer, teacher-forced),
        "final" (the state before the last denoising step; the authors' Grad-CAM baseline).
      attention: "full" or "prefix_lm"; None: the model's native attention.
      score: "logprob", "logit", "max_logit", "vocab_sum", "sum_logits" (see attribution.GradSpec).
      contrast: "none", "runner_up", or an int answer position whose token is subtracted.
      num_noise_samples / noise_ratios: for probe "noise" (ratios default to an even grid inside (0, 1)).
      num_trajectory_states: for probe "trajectory" (K >= 1 states; K = 1 is the decision state).
      view: "highres" or "base" (the base view of any-resolution layouts); None: high-res when present.
      grad_rule: "standard", "conservative_norm" or "conservative" (see attribution; the backward pass only).
      aggregation: "gxa", "gradcam", "layercam", "gradcam_pp", "channel_relu_mean" (see attribution).
      grad_relu, hook: see attribution.
      refine: a RefineConfig, a preset name of ``refine.PRESET_NAMES`` ("default", "full", "none", "akd", ...),
        or None for the method's default.
      threshold: after max-normalisation, values below it set to 0 (LLaVA-CAM 0.5); None for none.
      batch_size: probe states per vmapped chunk (bounds memory on large models).
    """

    method: str = "diffusion_cam"
    layer: int | None = None
    probe: str | None = None
    attention: str | None = None
    score: str | None = None
    contrast: Any = None
    num_noise_samples: int = 4
    noise_ratios: tuple[float, ...] | None = None
    num_trajectory_states: int = 4
    view: str | None = None
    grad_rule: str | None = None
    aggregation: str | None = None
    grad_relu: bool | None = None
    hook: str | None = None
    refine: Any = None
    threshold: float | None = None
    batch_size: int = 8

    def __post_init__(self):
        from dcam_jax.cam import methods

        methods.get(self.method)  # an unknown name raises, listing the registered ones
        if self.probe is not None and self.probe not in PROBES:
            raise ValueError(f"probe={self.probe!r}; expected one of {PROBES}")
        if self.grad_rule is not None and self.grad_rule not in attr.GRAD_RULES:
            raise ValueError(f"grad_rule={self.grad_rule!r}; expected one of {attr.GRAD_RULES}")
        if self.aggregation is not None and self.aggregation not in attr.AGGREGATIONS:
            raise ValueError(f"aggregation={self.aggregation!r}; expected one of {attr.AGGREGATIONS}")
        if self.hook is not None and self.hook not in attr.HOOKS:
            raise ValueError(f"hook={self.hook!r}; expected one of {attr.HOOKS}")
        if self.score is not None and self.score not in attr.SCORES:
            raise ValueError(f"score={self.score!r}; expected one of {attr.SCORES}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")
        if self.num_noise_samples < 1 or self.num_trajectory_states < 1:
            raise ValueError(f"num_noise_samples={self.num_noise_samples} and num_trajectory_states="
                             f"{self.num_trajectory_states} must be >= 1")
        if self.noise_ratios is not None:
            r = tuple(float(x) for x in self.noise_ratios)
            if not r or any(not 0.0 <= x < 1.0 for x in r):
                raise ValueError(f"noise_ratios={self.noise_ratios} must be a non-empty list of values in [0, 1)")
            object.__setattr__(self, "noise_ratios", r)


def __getattr__(name):
    if name == "METHODS":  # the registered method names (dcam_jax.cam.methods owns them)
        from dcam_jax.cam import methods

        return methods.names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def preset_fields(method: str) -> dict:
    """The fields a method's preset fixes (a copy), e.g. ``preset_fields("diffusion_cam")["grad_rule"]``."""
    from dcam_jax.cam import methods

    return dict(methods.get(method).preset)


def reference_compat() -> CamConfig:
    """The authors' released Diffusion-CAM behaviour (SPEC 4.5): clean teacher-forced forward, vocab-sum score
    contrasted with the previous answer token, ReLU on gradients, mean of per-channel ReLU, and the
    ``reference_compat`` refinement (k = 3, DACG a no-op, SICD always on). Never the default.
    The same as ``CamConfig(method="reference_compat")``."""
    return CamConfig(method="reference_compat")


def paper() -> CamConfig:
    """The paper's formulas as written: decision probe, standard gradients, channel-weighted Grad-CAM, the full
    AKD -> DACG -> CBA -> SICD chain with the paper's constants. The same as ``CamConfig(method="paper")``."""
    return CamConfig(method="paper")


def default_layer(method: str, config: MLLMConfig) -> int:
    """The hooked block of ``method`` when none is given: the last block for methods registered with
    ``layer="last"`` (TAM); otherwise the model's ``cam_layer`` (chosen on ground truth for that model) or else
    n_layers // 3."""
    from dcam_jax.cam import methods

    if methods.get(method).layer == "last":
        return config.lm.n_layers - 1
    return config.cam_layer if config.cam_layer is not None else config.lm.n_layers // 3


def resolve(cam: CamConfig, config: MLLMConfig) -> CamConfig:
    """Fill every None field of ``cam`` from its method's preset and the model config."""
    preset = preset_fields(cam.method)
    changes = {k: v for k, v in preset.items() if getattr(cam, k) is None}
    if cam.layer is None:
        changes["layer"] = default_layer(cam.method, config)
    if cam.attention is None and "attention" not in changes:
        changes["attention"] = config.attention
    out = dataclasses.replace(cam, **changes)
    attr.check_layer(out.layer, config)
    if out.contrast not in ("none", "runner_up", "previous") and not isinstance(out.contrast, (int, np.integer)):
        raise ValueError(f"contrast={out.contrast!r}; expected 'none', 'runner_up', 'previous' or an answer position")
    return out


def refine_config(cam: CamConfig):
    """The RefineConfig of a CamConfig (its ``refine`` field, or the method's preset)."""
    from dcam_jax.cam import refine as rf

    r = cam.refine
    if r is None:
        r = preset_fields(cam.method).get("refine", "none")
    return rf.refine_preset(r) if isinstance(r, str) else r


# ----------------------------------------------------------------------------------------------------------
# the result


def maps_to_image(maps: np.ndarray, layout: ImageLayout, view: str, image_size: tuple[int, int],
                  size: tuple[int, int] | None = None) -> np.ndarray:
    """View-space maps [..., h, w] in [0, 1] aligned with the input image (the pad layout's padding cut off) and
    resized bilinearly to ``size`` = (height, width) (default: the image's). -> [..., *size] float32 in [0, 1]."""
    if size is None:
        size = (image_size[1], image_size[0])
    maps = jnp.asarray(maps, jnp.float32)
    lead = maps.shape[:-2]
    maps = maps.reshape((-1,) + maps.shape[-2:])
    box = layout.geometry.pad_box if view == "base" else None
    if box is not None:
        # the base view of the "pad" layout is a square with the image centred: cut the image's part out, at the
        # scale of the requested size (not of the image, whose full size may be thousands of pixels)
        side = max(image_size)
        top, left, h, w = box
        f = min(1.0, max(int(size[0]) / h, int(size[1]) / w))
        side_f = max(1, round(side * f))
        t, l_, hh, ww = (round(v * f) for v in (top, left, h, w))
        hh, ww = max(1, min(hh, side_f - t)), max(1, min(ww, side_f - l_))
        full = jax.image.resize(maps, (maps.shape[0], side_f, side_f), "bilinear", antialias=False)
        maps = full[:, t:t + hh, l_:l_ + ww]
    out = jax.image.resize(maps, (maps.shape[0], int(size[0]), int(size[1])), "bilinear", antialias=False)
    return np.clip(np.asarray(out), 0.0, 1.0).reshape(lead + (int(size[0]), int(size[1])))


@dataclasses.dataclass(frozen=True)
class Explanation:
    """Per-token explanation maps of one answer.

    Attributes:
      maps: [T, H, W] float32 in [0, 1], the refined maps (one per explained token or word).
      raw_maps: [T, H, W] float32, the raw maps before refinement (min-max normalised).
      tokens: T strings, the explained tokens (or words), aligned with ``maps``.
      positions: T tuples of answer positions (several for a word made of sub-tokens).
      scores: [T] the target scores at the probe states (mean over states and sub-tokens).
      text: the answer text; answer_ids: [G] the answer token ids.
      layout: the ImageLayout; view: the explained view; image_size: (width, height) of the input image.
      config: the resolved CamConfig.
    """

    maps: np.ndarray
    raw_maps: np.ndarray
    tokens: list[str]
    positions: list[tuple[int, ...]]
    scores: np.ndarray
    text: str
    answer_ids: np.ndarray
    layout: ImageLayout
    view: str
    image_size: tuple[int, int]
    config: CamConfig

    def image_maps(self, size: tuple[int, int] | None = None, raw: bool = False) -> np.ndarray:
        """Maps aligned with the input image and resized bilinearly to ``size`` = (height, width) (default: the
        input image's); the pad layout's padding is cut off first. ``raw=True`` gives the raw maps. -> [T, *size]."""
        return maps_to_image(self.raw_maps if raw else self.maps, self.layout, self.view, self.image_size, size)

    def to_html(self, path, image, **kwargs):
        """Write the interactive viewer page of this explanation (see :func:`dcam_jax.viewer.write_html`, whose
        keyword arguments ``trajectory``, ``generation``, ``run`` and ``title`` it passes on). image: [H, W, 3]
        uint8. Returns the path."""
        from dcam_jax import viewer

        return viewer.write_html(path, image, {self.config.method: self}, **kwargs)

    def to_dict(self) -> dict:
        """JSON-ready summary (no arrays): answer, tokens, positions, per-map statistics, layout, config."""
        stats = []
        for tok, pos, m, s in zip(self.tokens, self.positions, self.maps, self.scores):
            peak = np.unravel_index(int(np.argmax(m)), m.shape)
            stats.append({"token": tok, "positions": list(pos), "score": float(s), "mean": float(m.mean()),
                          "max": float(m.max()), "peak_row": int(peak[0]), "peak_col": int(peak[1])})
        cfg = dataclasses.asdict(self.config)
        if not isinstance(cfg.get("refine"), (str, type(None))):
            cfg["refine"] = dataclasses.asdict(self.config.refine) if dataclasses.is_dataclass(self.config.refine) \
                else str(self.config.refine)
        return {"answer": self.text, "answer_ids": [int(i) for i in self.answer_ids], "view": self.view,
                "map_shape": list(self.maps.shape[1:]), "image_size": list(self.image_size),
                "layout": self.layout.to_dict(), "tokens": stats, "config": cfg}


@dataclasses.dataclass(frozen=True)
class TrajectoryExplanation:
    """How each explained token's evidence forms over the denoising steps up to the step that decided it.

    Attributes:
      maps: [T, K, H, W] float32 in [0, 1], the raw map at each of K states (each min-max normalised).
      steps: [T, K] int, the denoising step of each state (0: everything masked; the last: the decision state).
      commit_steps: [T] int, the step that committed each token.
      state_texts: T lists of K strings, the answer as it stood at each state (``[MASK]`` for masked tokens).
      tokens, positions: the explained tokens (or words) and their answer positions, as in :class:`Explanation`.
      text: the final answer; num_steps: denoising steps of the generation.
      layout, view, image_size, config: as in :class:`Explanation`.
    """

    maps: np.ndarray
    steps: np.ndarray
    commit_steps: np.ndarray
    state_texts: list[list[str]]
    tokens: list[str]
    positions: list[tuple[int, ...]]
    text: str
    num_steps: int
    layout: ImageLayout
    view: str
    image_size: tuple[int, int]
    config: CamConfig

    def image_maps(self, size: tuple[int, int] | None = None) -> np.ndarray:
        """The state maps aligned with the input image, resized to ``size`` = (height, width). -> [T, K, *size]."""
        return maps_to_image(self.maps, self.layout, self.view, self.image_size, size)


# ----------------------------------------------------------------------------------------------------------
# array-level explanation


def _contrast_for(cam: CamConfig, targets: np.ndarray, answer: np.ndarray):
    """(spec contrast mode, contrast positions [T], contrast tokens [T])."""
    T = len(targets)
    if cam.contrast in ("none", "runner_up"):
        return cam.contrast, np.zeros(T, np.int32), np.zeros(T, np.int32)
    if cam.contrast == "previous":
        # the authors contrast each token with a neighbouring answer token; we use the previous one (the next one
        # for the first token)
        cpos = np.where(targets > 0, targets - 1, np.minimum(targets + 1, len(answer) - 1)).astype(np.int32)
    else:
        q = int(cam.contrast)
        if not 0 <= q < len(answer):
            raise ValueError(f"contrast position {q} is outside the answer (0..{len(answer) - 1})")
        cpos = np.full(T, q, np.int32)
    return "position", cpos, answer[cpos].astype(np.int32)


def raw_token_maps(params, config: MLLMConfig, cam: CamConfig, prompt_embeds: jax.Array, layout: ImageLayout,
                   answer: np.ndarray, targets: Sequence[int], *, commit_step: np.ndarray | None = None,
                   answer_valid: np.ndarray | None = None, key: jax.Array | None = None, per_state: bool = False):
    """Raw (unnormalised) maps of answer positions ``targets`` for a resolved gradient method.

    prompt_embeds: [P, D]; answer: [G] final answer ids; commit_step: [G] (probes "decision" and "final").
    Returns (maps [T, H, W] float32 averaged over probe states, scores [T]); with ``per_state=True`` the maps of
    every probe state instead, (maps [T, K, H, W], scores [T, K]) with K = 1 for the single-state probes.
    """
    cam = resolve(cam, config)
    answer = np.asarray(answer, np.int32)
    G = answer.shape[0]
    targets = np.asarray(targets, np.int32)
    valid = np.ones(G, bool) if answer_valid is None else np.asarray(answer_valid, bool)
    P = int(prompt_embeds.shape[0])
    img = layout.positions(cam.view)
    attr.check_probe_valid(img, P + G, P)
    mask_id = config.lm.mask_id
    mode, cpos, ctok = _contrast_for(cam, targets, answer)
    spec = attr.GradSpec(layer=cam.layer, hook=cam.hook, attention=cam.attention, score=cam.score, contrast=mode,
                         aggregation=cam.aggregation, grad_relu=cam.grad_relu, grad_rule=cam.grad_rule)
    T = len(targets)
    args = (params, config, spec, cam.batch_size, prompt_embeds, jnp.asarray(img), None, jnp.asarray(answer),
            jnp.asarray(valid))

    def run(states, tp, tt, cp, ct):
        # pad states to a multiple of batch_size (one target per state) or the targets of a single shared state
        # to a multiple of 8 (repeating the last entry), so answers with different numbers of targets reuse one
        # compiled function; padded entries cost a forward (states) or a reverse pass (targets) each
        S, Tg = tp.shape
        S2 = S if S == 1 else -(-S // cam.batch_size) * cam.batch_size
        T2 = Tg if Tg == 1 else -(-Tg // 8) * 8

        def pad(x, axis, n):
            x = np.asarray(x)
            if x.shape[axis] == n:
                return jnp.asarray(x)
            idx = np.minimum(np.arange(n), x.shape[axis] - 1)
            return jnp.asarray(np.take(x, idx, axis=axis))

        a = list(args)
        a[6] = pad(states, 0, S2)
        tp, tt, cp, ct = (pad(pad(v, 0, S2), 1, T2) for v in (tp, tt, cp, ct))
        maps, scores = attr.batched_state_maps(*a, tp, tt, cp, ct)
        return maps[:S, :Tg], scores[:S, :Tg]

    if cam.probe in ("clean", "final"):
        if cam.probe == "final":
            if commit_step is None:
                raise ValueError("probe='final' needs the generation trajectory (commit_step); generate the answer "
                                 "with dcam_jax.generate or use probe='clean'")
            last = int(np.max(commit_step))
            state = np.where(np.asarray(commit_step) < last, answer, mask_id)
        else:
            state = answer
        maps, scores = run(state[None], targets[None], answer[targets][None], cpos[None], ctok[None])
        return (maps[0][:, None], scores[0][:, None]) if per_state else (maps[0], scores[0])
    if cam.probe in ("decision", "trajectory") and commit_step is None:
        raise ValueError(f"probe={cam.probe!r} needs the generation trajectory (commit_step): let explain() "
                         "generate the answer (or pass generation=...), or use probe='noise' or 'clean' for a "
                         "given answer")
    if cam.probe == "decision":
        states = attr.decision_states(answer, commit_step, targets, mask_id)
        maps, scores = run(states, targets[:, None], answer[targets][:, None], cpos[:, None], ctok[:, None])
        return (maps, scores) if per_state else (maps[:, 0], scores[:, 0])
    if cam.probe == "trajectory":
        K = cam.num_trajectory_states
        states = attr.trajectory_states(answer, commit_step, targets, K, mask_id)  # [T, K, G]
        rep = lambda a: np.repeat(a, K)[:, None]
        maps, scores = run(states.reshape(T * K, G), rep(targets), rep(answer[targets]), rep(cpos), rep(ctok))
        H, W = img.shape
        maps, scores = maps.reshape(T, K, H, W), scores.reshape(T, K)
        return (maps, scores) if per_state else (maps.mean(1), scores.mean(1))
    # noise: K states per target, averaged
    ratios = cam.noise_ratios or attr.default_noise_ratios(cam.num_noise_samples)
    if key is None:
        raise ValueError("probe='noise' needs a PRNG key (key=jax.random.key(0))")
    states = attr.noise_states(answer, targets, ratios, key, mask_id)  # [T, K, G]
    K = len(ratios)
    rep = lambda a: np.repeat(a, K)[:, None]
    maps, scores = run(states.reshape(T * K, G), rep(targets), rep(answer[targets]), rep(cpos), rep(ctok))
    H, W = img.shape
    maps, scores = maps.reshape(T, K, H, W), scores.reshape(T, K)
    return (maps, scores) if per_state else (maps.mean(1), scores.mean(1))


def tam_raw_maps(params, config: MLLMConfig, prompt_embeds: jax.Array, layout: ImageLayout, answer: np.ndarray,
                 targets: Sequence[int], view: str | None = None, attention: str = "full"):
    """TAM's gradient-free maps: ReLU of the class logit computed at every image position from the final-norm
    hidden state (clean state). Also returns the text scores for estimated causal inference:
    ``text[t, i]`` = ReLU(logit of class y_t at answer position i). -> (maps [T, H, W], text [T, G])."""
    img = layout.positions(view)
    answer = np.asarray(answer, np.int32)
    classes = answer[np.asarray(targets, np.int32)]
    return _tam_jit(params, config, prompt_embeds, jnp.asarray(img), jnp.asarray(answer), jnp.asarray(classes),
                    attention)


def _tam(params, config, prompt_embeds, img, answer, classes, attention):
    lm, cfg = params["lm"], config.lm
    P = prompt_embeds.shape[0]
    emb = jnp.concatenate([prompt_embeds[None].astype(jnp.dtype(cfg.dtype)),
                           llada.embed_tokens(lm, cfg, answer[None])], axis=1)
    h = llada.lm_hidden(lm, cfg, inputs_embeds=emb, attention=attention,
                        prefix_len=P if attention == "prefix_lm" else None)
    x = llada.rms_norm(h[0], lm["final_norm"], cfg.rms_eps).astype(jnp.float32)  # [T_all, D]
    head = lm["lm_head"][:, classes].astype(jnp.float32)  # [D, T]
    maps = jax.nn.relu(jnp.einsum("hwd,dt->thw", x[img], head))
    text = jax.nn.relu(x[P:] @ head).T  # [T, G]
    return maps, text


_tam_jit = jax.jit(_tam, static_argnums=(1, 6))


# ----------------------------------------------------------------------------------------------------------
# words and targets

_PUNCT = re.compile(r"^[\W_]+$")
# Words not explained under targets="content": closed-class words and the spatial relation words, whose evidence
# is a relation between objects rather than a region. (Evaluation's TAM function words are another list:
# eval.run.TAM_FUNCTION_WORDS.)
STOP_WORDS = frozenset(
    "a an the and or but nor of in on at to for with by from as is are was were be been being it its this that "
    "these those there here which who whom whose what where when while than then so such very some any each "
    "left right above below near next".split())


def group_words(token_strings: Sequence[str]) -> list[tuple[str, tuple[int, ...]]]:
    """Group sub-tokens into words: a token starting with a space (or the first token) starts a word.

    token_strings: decoded strings of the answer tokens -> [(word, positions)], punctuation-only tokens kept as
    their own words.
    """
    words: list[tuple[str, list[int]]] = []
    for i, s in enumerate(token_strings):
        starts = not words or s.startswith((" ", "\n", "\t")) or _PUNCT.match(s.strip() or "x") \
            or _PUNCT.match(words[-1][0] or "x")
        if starts:
            words.append((s.strip(), [i]))
        else:
            words[-1] = (words[-1][0] + s, words[-1][1] + [i])
    return [(w, tuple(p)) for w, p in words if w]


def is_content_word(word: str) -> bool:
    """Not punctuation and not a function word (articles, prepositions, relation words, auxiliaries...)."""
    w = word.strip().lower()
    return bool(w) and not _PUNCT.match(w) and w not in STOP_WORDS


def resolve_targets(targets, token_strings: Sequence[str], n_valid: int) -> list[tuple[str, tuple[int, ...]]]:
    """Turn a targets spec into [(label, answer positions)].

    targets: "all" (every real answer token), "content" (content words, sub-tokens together), a list of int
    positions, or a list of words (each must occur in the answer; all its sub-tokens are explained together).
    """
    toks = list(token_strings[:n_valid])
    if n_valid == 0:
        raise ValueError("the answer is empty: there is nothing to explain")
    if isinstance(targets, str):
        if targets == "all":
            return [(toks[i], (i,)) for i in range(n_valid)]
        if targets == "content":
            out = [(w, p) for w, p in group_words(toks) if is_content_word(w)]
            if not out:
                raise ValueError(f"the answer {''.join(toks)!r} has no content words; use targets='all'")
            return out
        targets = [targets]
    targets = list(targets)
    if not targets:
        raise ValueError("targets is empty")
    if all(isinstance(t, (int, np.integer)) for t in targets):
        bad = [int(t) for t in targets if not 0 <= int(t) < n_valid]
        if bad:
            raise ValueError(f"target positions {bad} are outside the answer (0..{n_valid - 1})")
        return [(toks[int(t)], (int(t),)) for t in targets]
    words = group_words(toks)
    out = []
    for t in targets:
        if not isinstance(t, str):
            raise ValueError(f"targets must be 'all', 'content', a list of positions or a list of words; got {t!r}")
        hits = [(w, p) for w, p in words if w.lower() == t.strip().lower()]
        if not hits:
            raise ValueError(f"word {t!r} is not in the answer; its words are {[w for w, _ in words]}")
        out.extend(hits)
    return out
