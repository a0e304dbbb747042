"""checkpoints_convert: parity of converted tiny models with transformers' torch classes, strictness, atomicity.

Tiny random models are built with transformers (LlamaForCausalLM, SiglipVisionModel) and torch (the projector),
saved with the real checkpoints' tensor names (reference/backbones.md sections 1.3, 2.2, 3, 6), converted with
:func:`checkpoints_convert.convert`, loaded with :func:`dcam_jax.checkpoint.load_checkpoint`, and run with the
dcam_jax model functions.
"""

import copy
import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from checkpoints_convert import ConversionError, SafetensorsCheckpoint, SafetensorsError, build_plan, convert
from checkpoints_convert import naming
from dcam_jax import checkpoint as ck
from dcam_jax.models import config as C
from dcam_jax.models import lm_logits, vision_features
from dcam_jax.models.llada import init_lm_params
from dcam_jax.models.projector import init_projector_params, project
from dcam_jax.models.siglip import init_vision_params

# the package re-exports the function convert(), which shadows the module attribute of the same name
convert_mod = importlib.import_module("checkpoints_convert.convert")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

REPO = Path(__file__).resolve().parents[1]
V, D, N_LAYERS, F = 64, 32, 2, 48
W, MLP_V, IMG, PATCH = 32, 40, 28, 7
VP = naming.VISION
# token ids inside the tiny vocabulary (the presets' ids are for the real 126464-token vocabulary)
TINY_IDS = ["lm.mask_id=63", "lm.bos_id=61", "lm.eot_id=60"]

# LLaMA name -> OLMo name (the inverse of LLaDA-V's rename_checkpoint.py), {i} = layer
_TO_OLMO = {
    "model.embed_tokens.weight": "transformer.wte.weight",
    "model.norm.weight": "transformer.ln_f.weight",
    "lm_head.weight": "transformer.ff_out.weight",
    "input_layernorm": "attn_norm", "self_attn.q_proj": "q_proj", "self_attn.k_proj": "k_proj",
    "self_attn.v_proj": "v_proj", "self_attn.o_proj": "attn_out", "post_attention_layernorm": "ff_norm",
    "mlp.gate_proj": "ff_proj", "mlp.up_proj": "up_proj", "mlp.down_proj": "ff_out",
}


def _to_olmo(name: str, prefix: str) -> str:
    if name in _TO_OLMO:
        return prefix + _TO_OLMO[name]
    parts = name.split(".")  # model.layers.{i}.<module>.weight
    module = ".".join(parts[3:-1])
    return f"{prefix}transformer.blocks.{parts[2]}.{_TO_OLMO[module]}.weight"


# ------------------------------------------------------------------------------------------------------------
# torch reference models (built once per module)


def _randomize_norms(module, gen):
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            elif "norm" in name and name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def _torch_llama(n_kv_heads, seed):
    torch.manual_seed(seed)
    tc = transformers.LlamaConfig(
        vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=N_LAYERS, num_attention_heads=4,
        num_key_value_heads=n_kv_heads, head_dim=8, hidden_act="silu", rms_norm_eps=1e-5, rope_theta=10000.0,
        attention_bias=False, mlp_bias=False, tie_word_embeddings=False, max_position_embeddings=128,
        initializer_range=0.2)
    tc._attn_implementation = "eager"
    m = transformers.LlamaForCausalLM(tc).eval()
    _randomize_norms(m, torch.Generator().manual_seed(seed))
    return m


def _torch_siglip(seed, layers=N_LAYERS + 1):
    torch.manual_seed(seed)
    tc = transformers.SiglipVisionConfig(hidden_size=W, intermediate_size=MLP_V, num_hidden_layers=layers,
                                         num_attention_heads=4, image_size=IMG, patch_size=PATCH)
    m = transformers.SiglipVisionModel(tc).eval()
    _randomize_norms(m, torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():  # the default init leaves biases at zero; make them matter
        for name, p in m.named_parameters():
            if name.endswith("bias") and "norm" not in name:
                p.copy_(0.05 * torch.randn(p.shape))
    return m


def _torch_projector(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(W, D), torch.nn.GELU(), torch.nn.Linear(D, D)).eval()


def _lm_tensors(m, dialect, prefix="model."):
    sd = {k: v.detach().clone() for k, v in m.state_dict().items() if "rotary" not in k}
    return sd if dialect == "llama" else {_to_olmo(k, prefix): v for k, v in sd.items()}


def _vision_tensors(m, layers=None, head=True, post_ln=True):
    out = {}
    for k, v in m.state_dict().items():
        # transformers 5.x SiglipVisionModel state-dict keys lack the "vision_model." the checkpoints carry
        if k.startswith("head.") and not head:
            continue
        if k.startswith("post_layernorm.") and not post_ln:
            continue
        if k.startswith("encoder.layers.") and layers is not None and int(k.split(".")[2]) >= layers:
            continue
        out[VP + k] = v.detach().clone()
    return out


def _save_hf(directory: Path, tensors: dict, hf_config: dict | None = None, shards: int = 1,
             tokenizer: bool = False) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if shards == 1:
        safetensors_torch.save_file(tensors, str(directory / "model.safetensors"))
    else:
        names = sorted(tensors)
        weight_map = {}
        for s in range(shards):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[s::shards]}
            safetensors_torch.save_file(part, str(directory / fname))
            weight_map.update({n: fname for n in part})
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    if hf_config is not None:
        (directory / "config.json").write_text(json.dumps(hf_config))
    if tokenizer:
        (directory / "tokenizer.json").write_text('{"version": "1.0", "model": {}}')
        (directory / "tokenizer_config.json").write_text('{"add_bos_token": false}')
    return directory


OLMO_HF = dict(model_type="llada", d_model=D, n_heads=4, n_kv_heads=4, n_layers=N_LAYERS, mlp_hidden_size=F,
               rms_norm_eps=1e-5, rope_theta=10000.0, vocab_size=V, embedding_size=V, max_sequence_length=128,
               mask_token_id=63, eos_token_id=62, pad_token_id=62)
LAVIDA_HF = dict(OLMO_HF, model_type="llava_llada", image_aspect_ratio="anyres",
                 image_grid_pinpoints=[[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]],
                 mm_patch_merge_type="spatial_unpad", mm_spatial_pool_mode="bilinear", mm_projector_type="mlp2x_gelu")
# LLaMA-style, as LLaDA-V: no mask/pad ids, a stale bos id outside the vocabulary, the "(AxB)" pinpoint range form
LLADA_V_HF = dict(model_type="llava_llada", hidden_size=D, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=N_LAYERS, intermediate_size=F, rms_norm_eps=1e-5, rope_theta=10000.0,
                  vocab_size=V, max_position_embeddings=128, eos_token_id=62, bos_token_id=128000,
                  image_aspect_ratio="anyres_max_4", image_grid_pinpoints="(1x1),...,(3x3)",
                  mm_patch_merge_type="spatial_unpad", mm_projector_type="mlp2x_gelu")


@pytest.fixture(scope="module")
def models():
    return {"llama_mha": _torch_llama(4, 0), "llama_gqa": _torch_llama(2, 1), "siglip": _torch_siglip(2),
            "proj": _torch_projector(3), "newline": torch.randn(D, generator=torch.Generator().manual_seed(4))}


def _mm_tensors(models, lm_key, dialect, **vision_kw):
    t = _lm_tensors(models[lm_key], dialect)
    t.update(_vision_tensors(models["siglip"], **vision_kw))
    t.update({f"model.mm_projector.{k}": v.detach().clone() for k, v in models["proj"].state_dict().items()})
    t["model.image_newline"] = models["newline"].clone()
    return t


@pytest.fixture(scope="module")
def converted(models, tmp_path_factory):
    """Converted checkpoints (fp32) of four tiny models, by name -> (LoadedCheckpoint, ConversionReport)."""
    root = tmp_path_factory.mktemp("conv")
    out = {}
    # LaViDa: OLMo names with "model.", full SigLIP tower (3 layers + pooling head), sharded with an index;
    # small read blocks so the blockwise copy and transpose paths run
    src = _save_hf(root / "hf_lavida", _mm_tensors(models, "llama_mha", "olmo"), LAVIDA_HF, shards=3, tokenizer=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(convert_mod, "READ_BLOCK_BYTES", 300)
        rep = convert(src, root / "lavida", dtype="float32", progress=False,
                      overrides=["vision.num_heads=4", "lm.bos_id=61", "lm.eot_id=60"])
    out["lavida"] = (ck.load_checkpoint(root / "lavida"), rep)
    # LLaDA-V: LLaMA names, GQA, tower already truncated (2 layers, no head) with its post-layernorm kept
    src = _save_hf(root / "hf_llada_v", _mm_tensors(models, "llama_gqa", "llama", layers=N_LAYERS, head=False),
                   LLADA_V_HF)
    rep = convert(src, root / "llada_v", dtype="float32", progress=False, keep_post_layernorm=True,
                  overrides=["vision.num_heads=4", f"vision.depth={N_LAYERS}", "lm.pad_id=62", *TINY_IDS])
    out["llada_v"] = (ck.load_checkpoint(root / "llada_v"), rep)
    # LLaDA-8B: OLMo names under "model.transformer." (the released files), LM only, no HF config at all
    src = _save_hf(root / "hf_llada", _lm_tensors(models["llama_mha"], "olmo", "model."))
    # max_seq_len as LaViDa's config.json says, so both share one compiled forward in the tests
    ids = ["n_heads=4", "rope_theta=10000", "max_seq_len=128", "eos_id=62", "pad_id=62", *TINY_IDS]
    rep = convert(src, root / "llada", dtype="float32", progress=False, overrides=ids)
    out["llada"] = (ck.load_checkpoint(root / "llada"), rep)
    # the same without the "model." prefix (a bare LLaDAModel export)
    src = _save_hf(root / "hf_llada_bare", _lm_tensors(models["llama_mha"], "olmo", ""))
    rep = convert(src, root / "llada_bare", dtype="float32", progress=False, arch="llada", overrides=ids)
    out["llada_bare"] = (ck.load_checkpoint(root / "llada_bare"), rep)
    return out


def _torch_logits(m, ids, allowed=None):
    T = ids.shape[1]
    if allowed is None:
        allowed = np.ones((ids.shape[0], 1, T, T), bool)
    mask = torch.from_numpy(np.where(allowed, 0.0, -1e9)).double()  # additive float mask (never bool: eager adds)
    with torch.no_grad():
        return copy.deepcopy(m).double()(input_ids=torch.from_numpy(ids), attention_mask=mask).logits.numpy()


_LM_OF = {"lavida": "llama_mha", "llada_v": "llama_gqa", "llada": "llama_mha"}
# one compiled forward per (LM config, attention mode), shared by the checkpoints with equal LM configs
_logits = jax.jit(lm_logits, static_argnums=1, static_argnames="attention")


@pytest.mark.parametrize("name", list(_LM_OF))
def test_lm_logits_match_llama_full_and_prefix(models, converted, name):
    (config, params, _), _ = converted[name]
    lm_cfg = config.lm if isinstance(config, C.MLLMConfig) else config
    ids = np.random.default_rng(5).integers(0, V, (2, 10))
    ref = _torch_logits(models[_LM_OF[name]], ids)
    ours = np.asarray(_logits(params["lm"], lm_cfg, jnp.asarray(ids)))
    assert np.abs(ours - ref).max() <= 1e-4
    P = 6
    allowed = np.ones((2, 1, 10, 10), bool)
    allowed[:, :, :P, P:] = False  # prompt queries do not see answer keys
    ref_p = _torch_logits(models[_LM_OF[name]], ids, allowed)
    ours_p = np.asarray(_logits(params["lm"], lm_cfg, jnp.asarray(ids), attention="prefix_lm", prefix_len=P))
    assert np.abs(ours_p - ref_p).max() <= 1e-4
    assert np.abs(ref_p - ref).max() > 1e-3  # the block mask matters for this model


def test_bare_olmo_names_convert_like_prefixed_ones(converted):
    (cfg_a, params_a, _), rep_a = converted["llada"]
    (cfg_b, params_b, _), rep_b = converted["llada_bare"]
    assert rep_a.dialect == rep_b.dialect == "olmo" and cfg_a == cfg_b
    assert rep_b.consumed[0].startswith("transformer.") and rep_a.consumed[0].startswith("model.transformer.")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params_a, params_b)


@pytest.mark.parametrize("name", ["lavida", "llada_v"])
def test_vision_tower_matches_siglip_second_to_last_hidden_state(models, converted, name):
    (config, params, _), _ = converted[name]
    assert config.vision.depth == N_LAYERS and config.vision.image_size == IMG and config.vision.width == W
    x = np.random.default_rng(6).uniform(-1, 1, (2, 3, IMG, IMG))
    with torch.no_grad():
        tower = copy.deepcopy(models["siglip"]).double()
        hs = tower(pixel_values=torch.from_numpy(x), output_hidden_states=True).hidden_states
    ref = hs[-2].numpy()
    ours = np.asarray(vision_features(params, config, jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32)))
    assert np.abs(ours - ref).max() <= 1e-5
    assert np.abs(hs[-1].numpy() - ref).max() > 1e-2  # the dropped layer would have changed the output


def test_projector_and_newline_match_torch(models, converted):
    (config, params, _), _ = converted["lavida"]
    x = np.random.default_rng(7).standard_normal((3, 5, W)).astype(np.float32)
    with torch.no_grad():
        ref = copy.deepcopy(models["proj"]).double()(torch.from_numpy(x).double()).numpy()
    assert np.abs(np.asarray(project(params, jnp.asarray(x))) - ref).max() <= 1e-5
    np.testing.assert_array_equal(np.asarray(params["image_newline"]), models["newline"].numpy())


def test_configs_and_drops_are_recorded(converted, models):
    (cfg, params, tok), rep = converted["lavida"]
    assert isinstance(cfg, C.MLLMConfig) and rep.arch == "lavida" and rep.dialect == "olmo"
    assert cfg.grid_pinpoints == ((28, 56), (56, 28), (56, 56), (84, 28), (28, 84))
    assert cfg.pool_size == 2 and cfg.image_aspect_ratio == "anyres"  # ceil(4 / 2): LaViDa's stride-2 pooling
    assert not cfg.has_post_layernorm and "post_ln" not in params["vision"]
    assert cfg.lm.max_seq_len == 128 and cfg.lm.mask_id == 63 and cfg.lm.dtype == "float32"
    dropped = set(rep.dropped)
    assert {n for n in dropped if "encoder.layers." in n} == {
        n for n in _vision_tensors(models["siglip"]) if f"encoder.layers.{N_LAYERS}." in n}
    assert {VP + "post_layernorm.weight", VP + "post_layernorm.bias", VP + "head.probe"} <= dropped
    assert rep.num_source_tensors == len(rep.consumed) + len(rep.dropped)
    assert any(line.startswith("vision.num_heads=4 (--override") for line in rep.decisions)
    assert tok is not None and sorted(p.name for p in tok.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert rep.num_params == cfg.num_params

    (cfg_v, params_v, tok_v), rep_v = converted["llada_v"]
    assert rep_v.arch == "llada_v" and rep_v.dialect == "llama" and tok_v is None
    assert cfg_v.image_aspect_ratio == "anyres_max_4" and cfg_v.pool_size is None
    assert cfg_v.grid_pinpoints == tuple((i * IMG, j * IMG) for i in range(1, 4) for j in range(1, 4))
    assert cfg_v.lm.n_kv_heads == 2 and cfg_v.lm.bos_id == 61  # the stale HF bos id 128000 is ignored
    assert cfg_v.has_post_layernorm and rep_v.dropped == {}
    sd = models["siglip"].state_dict()
    np.testing.assert_array_equal(np.asarray(params_v["vision"]["post_ln"]["scale"]), sd["post_layernorm.weight"])
    np.testing.assert_array_equal(np.asarray(params_v["vision"]["post_ln"]["bias"]), sd["post_layernorm.bias"])
    assert rep_v.num_params == cfg_v.num_params

    (cfg_l, params_l, _), rep_l = converted["llada"]
    assert isinstance(cfg_l, C.LMConfig) and set(params_l) == {"lm"} and rep_l.arch == "llada"


def test_parse_pinpoints_forms():
    pp = convert_mod.parse_pinpoints
    assert pp([[384, 768], [768, 384]], 384) == ((384, 768), (768, 384))
    assert pp("[(384, 768), (768, 384)]", 384) == ((384, 768), (768, 384))
    # LLaVA's range form: every grid (i, j) from the first to the last, times the view size, i outer
    assert pp("(1x1),...,(2x3)", 384) == tuple((i * 384, j * 384) for i in (1, 2) for j in (1, 2, 3))
    assert len(pp("(1x1),...,(6x6)", 384)) == 36
    with pytest.raises(ConversionError, match="neither a list"):
        pp("anyres", 384)
    with pytest.raises(ConversionError, match="non-empty list of"):
        pp([[1, 2, 3]], 384)


# ------------------------------------------------------------------------------------------------------------
# reading safetensors without torch


def test_bf16_reader_and_bf16_conversion_match_torch(models, tmp_path):
    tensors = {k: v.to(torch.bfloat16) for k, v in _lm_tensors(models["llama_mha"], "olmo").items()}
    src = _save_hf(tmp_path / "hf", tensors)
    reader = SafetensorsCheckpoint.open(src)
    for name, t in tensors.items():
        got = reader.read(name)
        assert got.dtype == np.dtype(ml_dtypes.bfloat16) and got.shape == tuple(t.shape)
        np.testing.assert_array_equal(got.astype(np.float32), t.float().numpy())
        blocks = [rows for _, rows in reader.iter_rows(name, max_bytes=100)]
        np.testing.assert_array_equal(np.concatenate(blocks).astype(np.float32) if got.ndim > 1
                                      else blocks[0].astype(np.float32), t.float().numpy())
    convert(src, tmp_path / "out", progress=False, overrides=["n_heads=4", "eos_id=62", "pad_id=62", *TINY_IDS])
    cfg, params, _ = ck.load_checkpoint(tmp_path / "out")
    lm = params["lm"]
    assert cfg.dtype == "bfloat16" and lm["embed"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(lm["embed"], np.float32),
                                  tensors["model.transformer.wte.weight"].float().numpy())
    np.testing.assert_array_equal(np.asarray(lm["layers"]["down"][1], np.float32),
                                  tensors["model.transformer.blocks.1.ff_out.weight"].float().numpy().T)
    np.testing.assert_array_equal(np.asarray(lm["lm_head"], np.float32),
                                  tensors["model.transformer.ff_out.weight"].float().numpy().T)


def test_reader_rejects_bad_index_and_headers(tmp_path):
    d = _save_hf(tmp_path / "hf", {"a": torch.ones(3), "b": torch.zeros(2, 2)}, shards=2)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"]["c"] = index["weight_map"]["a"]
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(SafetensorsError, match=r"lists tensor\(s\) \['c'\]"):
        SafetensorsCheckpoint.open(d)
    # Shards must lie inside the checkpoint directory: no ../ escapes, no absolute paths.
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes((d / index["weight_map"]["a"]).read_bytes())
    for name in ("../elsewhere.safetensors", str(outside)):
        index = json.loads((d / "model.safetensors.index.json").read_text())
        index["weight_map"] = {"a": name, "b": index["weight_map"]["b"]}
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(SafetensorsError, match="outside the checkpoint directory"):
            SafetensorsCheckpoint.open(d)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((10 ** 6).to_bytes(8, "little") + b"{}")
    with pytest.raises(SafetensorsError, match="header length field says 1000000 bytes"):
        SafetensorsCheckpoint.open(bad)
    (bad / "model.safetensors").write_bytes((4).to_bytes(8, "little") + b"{x:1")
    with pytest.raises(SafetensorsError, match="not valid JSON"):
        SafetensorsCheckpoint.open(bad)


# ------------------------------------------------------------------------------------------------------------
# failures: clear errors, nothing left behind


@pytest.fixture(scope="module")
def lm_tensors(models):
    return _lm_tensors(models["llama_mha"], "olmo")


LM_IDS = ["n_heads=4", "eos_id=62", "pad_id=62", *TINY_IDS]


def _assert_nothing_left(out: Path):
    assert not out.exists()
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    assert leftovers == []


def _truncate(d: Path):
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])


@pytest.mark.parametrize("case, edit, pattern", [
    ("truncated", "truncate", r"model\.safetensors: file is truncated: it has \d+ bytes but tensor "
                              r"'model\.transformer\.[\w.]+' \(F32 \[\d+(, \d+)*\]\) needs bytes up to \d+"),
    ("missing", "drop model.transformer.blocks.1.up_proj.weight",
     r"1 missing tensors: model\.transformer\.blocks\.1\.up_proj\.weight"),
    ("extra", "add model.transformer.blocks.0.extra_proj.weight",
     r"1 unexpected tensors: model\.transformer\.blocks\.0\.extra_proj\.weight"),
    ("wrong_shape", "reshape model.transformer.blocks.0.v_proj.weight",
     r"wrong shape: model\.transformer\.blocks\.0\.v_proj\.weight: \[16, 32\], expected \[32, 32\]"),
    ("unknown_arch", "rename", r"unknown architecture: found no LLaDA language-model tensors"),
    ("nan", "nan model.transformer.blocks.1.up_proj.weight", r"holds NaN or infinite values"),
    ("bad_eps", "override rms_eps=-1", r"rms_eps=-1 must be a finite positive number"),
    ("bad_theta", "override rope_theta=fast", r"rope_theta"),
])
def test_conversion_failures_name_the_problem_and_leave_nothing(lm_tensors, tmp_path, case, edit, pattern):
    tensors = dict(lm_tensors)
    if edit.startswith("drop "):
        del tensors[edit[5:]]
    elif edit.startswith("add "):
        tensors[edit[4:]] = torch.ones(4, 4)
    elif edit.startswith("reshape "):
        tensors[edit[8:]] = tensors[edit[8:]][:16]
    elif edit == "rename":
        tensors = {f"encoder.layer.{i}.weight": t for i, t in enumerate(tensors.values())}
    elif edit.startswith("nan "):
        tensors[edit[4:]] = tensors[edit[4:]].clone()
        tensors[edit[4:]][0, 0] = float("nan")
    overrides = LM_IDS + ([edit[len("override "):]] if edit.startswith("override ") else [])
    src = _save_hf(tmp_path / "hf", tensors)
    if edit == "truncate":
        _truncate(src)
    out = tmp_path / "out"
    with pytest.raises((ConversionError, SafetensorsError, ck.CheckpointError), match=pattern):
        convert(src, out, progress=False, overrides=overrides)
    _assert_nothing_left(out)


def test_existing_out_dir_needs_force_and_is_replaced_only_on_success(lm_tensors, tmp_path):
    src = _save_hf(tmp_path / "hf", lm_tensors)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists; pass force=True"):
        convert(src, out, progress=False, overrides=LM_IDS)
    assert (out / "keep.txt").read_text() == "mine"
    # --force never deletes a directory that is not a dcam_jax checkpoint
    with pytest.raises(ck.CheckpointError, match="not a dcam_jax checkpoint"):
        convert(src, out, progress=False, overrides=LM_IDS, force=True)
    assert (out / "keep.txt").read_text() == "mine"
    out2 = tmp_path / "out2"
    convert(src, out2, progress=False, dtype="float32", overrides=LM_IDS)
    # a failing forced conversion leaves the old checkpoint in place
    with pytest.raises(ConversionError, match="unknown field 'nope'"):
        convert(src, out2, progress=False, overrides=[*LM_IDS, "nope=1"], force=True)
    assert ck.load_checkpoint(out2).config.dtype == "float32"
    convert(src, out2, progress=False, dtype="bfloat16", overrides=LM_IDS, force=True)
    assert ck.load_checkpoint(out2).config.dtype == "bfloat16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "out", "out2"]


def test_shape_free_setting_contradicting_shapes_is_reported(lm_tensors, tmp_path):
    src = _save_hf(tmp_path / "hf", lm_tensors)
    with pytest.raises(ConversionError, match=r"query projection has 32 outputs, not a multiple of n_heads=5"):
        convert(src, tmp_path / "out", progress=False, overrides=["n_heads=5", *LM_IDS[1:]])
    with pytest.raises(ConversionError, match=r"mask_id=126336 must be an int id inside the vocabulary"):
        convert(src, tmp_path / "out", progress=False, overrides=["n_heads=4"])  # preset ids vs 64-token vocab
    with pytest.raises(ConversionError, match=r"tensors with the wrong shape: .*k_proj"):
        convert(src, tmp_path / "out", progress=False, overrides=[*LM_IDS, "n_kv_heads=2"])
    _assert_nothing_left(tmp_path / "out")


def test_lm_only_arch_refuses_vision_tensors(models, tmp_path):
    tensors = _mm_tensors(models, "llama_mha", "olmo")
    n_mm = sum(not n.startswith("model.transformer.") for n in tensors)
    src = _save_hf(tmp_path / "hf", tensors, LAVIDA_HF)
    with pytest.raises(ConversionError, match=rf"(?s){n_mm} unexpected tensors: .*use --arch=auto, lavida or llada_v"):
        convert(src, tmp_path / "out", arch="llada", progress=False, overrides=TINY_IDS)
    _assert_nothing_left(tmp_path / "out")


def test_cli_converts_and_reports_errors(lm_tensors, tmp_path):
    src = _save_hf(tmp_path / "hf", lm_tensors)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "checkpoints_convert", f"--hf_dir={src}", f"--out_dir={out}", "--arch=llada",
           "--dtype=float32", "--noprogress"] + [f"--override={o}" for o in LM_IDS]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "dropping" not in r.stderr and "config: lm.n_heads=4 (--override" in r.stderr
    assert ck.read_marker(out)["param_dtype"] == "float32"
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert r.returncode == 1 and "already exists" in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------------------------------------------------
# full-size presets: abstract shapes, exact counts, the converter's tables


def _abstract_params(cfg):
    key = jax.random.key(0)
    if isinstance(cfg, C.LMConfig):
        return {"lm": jax.eval_shape(lambda: init_lm_params(key, cfg))}
    return {"lm": jax.eval_shape(lambda: init_lm_params(key, cfg.lm)),
            "vision": jax.eval_shape(lambda: init_vision_params(key, cfg.vision)),
            "projector": jax.eval_shape(lambda: init_projector_params(key, cfg.vision.width, cfg.lm.d_model)),
            "image_newline": jax.ShapeDtypeStruct((cfg.lm.d_model,), jnp.bfloat16)}


def _count(shapes):
    return sum(math.prod(s) for s in shapes)


def test_full_size_presets_param_counts_and_converter_tables():
    lm = C.llada_8b()
    flat = {p: tuple(x.shape) for p, x in ck.flatten(_abstract_params(lm)).items()}
    assert _count(flat.values()) == 8_015_581_184 == lm.num_params
    assert flat == ck.param_shapes(lm)
    for preset in (C.lavida(), C.llada_v()):
        flat = {p: tuple(x.shape) for p, x in ck.flatten(_abstract_params(preset)).items()}
        assert _count(flat.values()) == 8_434_834_720 == preset.num_params
        assert flat == ck.param_shapes(preset)
        with_ln = preset.replace(has_post_layernorm=True)
        assert _count(ck.param_shapes(with_ln).values()) == 8_434_837_024 == with_ln.num_params

    # source names and torch shapes the converter expects == reference/backbones.md sections 1.3, 2.2 and 6
    plan = {s: t.source_shape() for t in build_plan(C.lavida().replace(has_post_layernorm=True), "olmo", "model.")
            for s in t.sources}
    vt = naming.VISION
    assert plan["model.transformer.wte.weight"] == (126464, 4096)
    assert plan["model.transformer.ff_out.weight"] == (126464, 4096)
    assert plan["model.transformer.blocks.31.ff_proj.weight"] == (12288, 4096)
    assert plan["model.transformer.blocks.0.ff_out.weight"] == (4096, 12288)
    assert plan["model.transformer.blocks.7.attn_out.weight"] == (4096, 4096)
    assert plan[vt + "embeddings.patch_embedding.weight"] == (1152, 3, 14, 14)
    assert plan[vt + "embeddings.position_embedding.weight"] == (729, 1152)
    assert plan[vt + "encoder.layers.25.mlp.fc1.weight"] == (4304, 1152)
    assert plan[vt + "encoder.layers.25.self_attn.out_proj.bias"] == (1152,)
    assert vt + "encoder.layers.26.mlp.fc1.weight" not in plan
    assert plan["model.mm_projector.0.weight"] == (4096, 1152) and plan["model.image_newline"] == (4096,)
    lm_names = [s for s in plan if s.startswith("model.transformer.")]
    assert len(lm_names) == 291  # backbones.md 1.3
    assert len(plan) == 291 + 3 + 26 * 16 + 2 + 4 + 1
    llama = {s: t.source_shape() for t in build_plan(C.llada_v(), "llama", "") for s in t.sources}
    assert llama["lm_head.weight"] == (126464, 4096) and llama["model.layers.3.mlp.down_proj.weight"] == (4096, 12288)
    assert llama["model.layers.31.post_attention_layernorm.weight"] == (4096,)
