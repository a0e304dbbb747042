"""Hugging Face tensor names of LLaDA-8B, LaViDa and LLaDA-V, and how each maps onto a dcam_jax parameter.

Two naming dialects exist for the language model (reference/backbones.md section 1.3):

* ``olmo``: the original LLaDA code, used by LLaDA-8B-Instruct and LaViDa: ``model.transformer.wte.weight``,
  ``model.transformer.blocks.N.{attn_norm,q_proj,k_proj,v_proj,attn_out,ff_norm,ff_proj,up_proj,ff_out}.weight``,
  ``model.transformer.ln_f.weight``, ``model.transformer.ff_out.weight`` (the head). The text before
  ``transformer.`` (normally ``model.``) is detected, so a bare ``transformer.*`` export also converts.
* ``llama``: LLaDA-V (renamed by its ``rename_checkpoint.py``): ``model.embed_tokens.weight``,
  ``model.layers.N.{input_layernorm,self_attn.{q,k,v,o}_proj,post_attention_layernorm,mlp.{gate,up,down}_proj}``
  ``.weight``, ``model.norm.weight``, ``lm_head.weight``.

The multimodal parts have one spelling: the SigLIP tower under ``model.vision_tower.vision_tower.vision_model.``,
the projector ``model.mm_projector.{0,2}.{weight,bias}`` and ``model.image_newline``.

Transforms (torch layout -> ours): ``copy``; ``transpose`` (Linear ``weight [out, in]`` -> kernel ``[in, out]``);
``conv`` (Conv2d ``weight [O, I, kh, kw]`` -> ``[kh, kw, I, O]``).
"""

from __future__ import annotations

import re

VISION = "model.vision_tower.vision_tower.vision_model."
PROJECTOR = "model.mm_projector."
NEWLINE = "model.image_newline"

COPY, TRANSPOSE, CONV = "copy", "transpose", "conv"

# {our path under "lm" (layer params without the layer axis): (name template, transform)}; {p} = prefix, {i} = layer
LM_NAMES = {
    "olmo": {
        ("embed",): ("{p}transformer.wte.weight", COPY),
        ("layers", "attn_norm"): ("{p}transformer.blocks.{i}.attn_norm.weight", COPY),
        ("layers", "q"): ("{p}transformer.blocks.{i}.q_proj.weight", TRANSPOSE),
        ("layers", "k"): ("{p}transformer.blocks.{i}.k_proj.weight", TRANSPOSE),
        ("layers", "v"): ("{p}transformer.blocks.{i}.v_proj.weight", TRANSPOSE),
        ("layers", "o"): ("{p}transformer.blocks.{i}.attn_out.weight", TRANSPOSE),
        ("layers", "mlp_norm"): ("{p}transformer.blocks.{i}.ff_norm.weight", COPY),
        ("layers", "gate"): ("{p}transformer.blocks.{i}.ff_proj.weight", TRANSPOSE),
        ("layers", "up"): ("{p}transformer.blocks.{i}.up_proj.weight", TRANSPOSE),
        ("layers", "down"): ("{p}transformer.blocks.{i}.ff_out.weight", TRANSPOSE),
        ("final_norm",): ("{p}transformer.ln_f.weight", COPY),
        ("lm_head",): ("{p}transformer.ff_out.weight", TRANSPOSE),
    },
    "llama": {
        ("embed",): ("model.embed_tokens.weight", COPY),
        ("layers", "attn_norm"): ("model.layers.{i}.input_layernorm.weight", COPY),
        ("layers", "q"): ("model.layers.{i}.self_attn.q_proj.weight", TRANSPOSE),
        ("layers", "k"): ("model.layers.{i}.self_attn.k_proj.weight", TRANSPOSE),
        ("layers", "v"): ("model.layers.{i}.self_attn.v_proj.weight", TRANSPOSE),
        ("layers", "o"): ("model.layers.{i}.self_attn.o_proj.weight", TRANSPOSE),
        ("layers", "mlp_norm"): ("model.layers.{i}.post_attention_layernorm.weight", COPY),
        ("layers", "gate"): ("model.layers.{i}.mlp.gate_proj.weight", TRANSPOSE),
        ("layers", "up"): ("model.layers.{i}.mlp.up_proj.weight", TRANSPOSE),
        ("layers", "down"): ("model.layers.{i}.mlp.down_proj.weight", TRANSPOSE),
        ("final_norm",): ("model.norm.weight", COPY),
        ("lm_head",): ("lm_head.weight", TRANSPOSE),
    },
}

# {our path under "vision": (name template, transform)}
VISION_NAMES = {
    ("patch_embed", "kernel"): (VISION + "embeddings.patch_embedding.weight", CONV),
    ("patch_embed", "bias"): (VISION + "embeddings.patch_embedding.bias", COPY),
    ("pos_embed",): (VISION + "embeddings.position_embedding.weight", COPY),
    ("post_ln", "scale"): (VISION + "post_layernorm.weight", COPY),
    ("post_ln", "bias"): (VISION + "post_layernorm.bias", COPY),
}
_VISION_LAYER = {"ln1": ("layer_norm1", "scale"), "ln2": ("layer_norm2", "scale"), "q": ("self_attn.q_proj", "kernel"),
                 "k": ("self_attn.k_proj", "kernel"), "v": ("self_attn.v_proj", "kernel"),
                 "o": ("self_attn.out_proj", "kernel"), "fc1": ("mlp.fc1", "kernel"), "fc2": ("mlp.fc2", "kernel")}
for _ours, (_theirs, _w) in _VISION_LAYER.items():
    VISION_NAMES[("layers", _ours, _w)] = (VISION + f"encoder.layers.{{i}}.{_theirs}.weight",
                                           TRANSPOSE if _w == "kernel" else COPY)
    VISION_NAMES[("layers", _ours, "bias")] = (VISION + f"encoder.layers.{{i}}.{_theirs}.bias", COPY)

OTHER_NAMES = {
    ("projector", "fc1", "kernel"): (PROJECTOR + "0.weight", TRANSPOSE),
    ("projector", "fc1", "bias"): (PROJECTOR + "0.bias", COPY),
    ("projector", "fc2", "kernel"): (PROJECTOR + "2.weight", TRANSPOSE),
    ("projector", "fc2", "bias"): (PROJECTOR + "2.bias", COPY),
    ("image_newline",): (NEWLINE, COPY),
}

_OLMO_RE = re.compile(r"^(.*?)transformer\.(wte|blocks\.\d+|ln_f|ff_out)\.")
_LLAMA_RE = re.compile(r"^(model\.(embed_tokens|layers\.\d+|norm)\.|lm_head\.)")
VISION_LAYER_RE = re.compile("^" + re.escape(VISION) + r"encoder\.layers\.(\d+)\.")


def detect_lm_dialect(names) -> tuple[str | None, str, list[str]]:
    """(dialect "olmo" | "llama" | None, OLMo name prefix, problems) from the tensor names."""
    olmo_prefixes = {m.group(1) for n in names if (m := _OLMO_RE.match(n)) and not n.startswith(VISION)}
    llama = any(_LLAMA_RE.match(n) for n in names)
    problems = []
    if olmo_prefixes and llama:
        problems.append("the checkpoint mixes OLMo-style (transformer.blocks.*) and LLaMA-style (model.layers.*) "
                        "language-model names")
    if len(olmo_prefixes) > 1:
        problems.append(f"OLMo-style names appear under several prefixes {sorted(olmo_prefixes)}")
    if problems:
        return None, "", problems
    if olmo_prefixes:
        return "olmo", olmo_prefixes.pop(), []
    if llama:
        return "llama", "", []
    return None, "", []


def lm_layer_indices(names, dialect: str, prefix: str) -> set[int]:
    """The block indices N that appear in LM tensor names of this dialect and prefix."""
    pat = (re.compile("^" + re.escape(prefix) + r"transformer\.blocks\.(\d+)\.") if dialect == "olmo"
           else re.compile(r"^model\.layers\.(\d+)\."))
    return {int(m.group(1)) for n in names if (m := pat.match(n))}


def vision_layer_indices(names) -> set[int]:
    """The SigLIP encoder layer indices N that appear in the tensor names."""
    return {int(m.group(1)) for n in names if (m := VISION_LAYER_RE.match(n))}


def has_multimodal_parts(names) -> bool:
    """Whether any name belongs to the vision tower, the projector or the image newline."""
    return any(n.startswith((VISION, PROJECTOR)) or n == NEWLINE for n in names)


def lm_name(dialect: str, prefix: str, path: tuple[str, ...], layer: int | None = None) -> str:
    """The HF name of our LM param ``path`` (under "lm"), for layer ``layer`` if it is a stacked param."""
    template, _ = LM_NAMES[dialect][path]
    return template.format(p=prefix, i=layer)
