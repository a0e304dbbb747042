"""Independent torch references shared by the parity tests (transformers' classes, float64)."""

import numpy as np
import torch
import transformers

LLAMA_NAMES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
               "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def llama_from_lm_params(cfg, p, dtype=torch.float64, attn_implementation="eager"):
    """transformers LlamaForCausalLM (float64 with eager attention unless told otherwise) holding our LM params
    ``p`` (config ``cfg``). benchmarks/torch_reference.py uses it in float32 with SDPA."""
    tc = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_hidden,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim, hidden_act="silu", rms_norm_eps=cfg.rms_eps, rope_theta=cfg.rope_theta,
        attention_bias=False, mlp_bias=False, tie_word_embeddings=False, max_position_embeddings=cfg.max_seq_len)
    tc._attn_implementation = attn_implementation
    m = transformers.LlamaForCausalLM(tc).eval().to(dtype)
    t = lambda a: torch.from_numpy(np.asarray(a, np.float64)).to(dtype)
    sd = {"model.embed_tokens.weight": t(p["embed"]), "model.norm.weight": t(p["final_norm"]),
          "lm_head.weight": t(p["lm_head"]).T}
    for i in range(cfg.n_layers):
        for ours, theirs in LLAMA_NAMES.items():
            sd[f"model.layers.{i}.{theirs}.weight"] = t(p["layers"][ours][i]).T
        sd[f"model.layers.{i}.input_layernorm.weight"] = t(p["layers"]["attn_norm"][i])
        sd[f"model.layers.{i}.post_attention_layernorm.weight"] = t(p["layers"]["mlp_norm"][i])
    missing, unexpected = m.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return m


def hold_gates(m, layer: int, rule: str) -> dict:
    """Make LlamaForCausalLM ``m`` differentiate the way our gradient ``rule`` does above block ``layer``, in place:
    for "conservative_norm" and "conservative" the RMSNorms of blocks layer+1 .. N-1 and the final norm use a
    detached 1/rms factor, and for "conservative" the attention probabilities of those blocks are detached as well
    (computed eagerly there; blocks <= layer keep the model's attention implementation). Forward values do not
    change. Returns the call records {"norm": [...], "attention": [layer index, ...]} that show the patches were
    on the path."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama import modeling_llama as ml

    calls = {"norm": [], "attention": []}
    held_norm, held_probs = rule != "standard", rule == "conservative"

    def held_rms(norm):
        def forward(x):
            calls["norm"].append(1)
            inv = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
            return norm.weight * (x * inv.detach())
        return forward

    if held_norm:
        for blk in m.model.layers[layer + 1:]:
            blk.input_layernorm.forward = held_rms(blk.input_layernorm)
            blk.post_attention_layernorm.forward = held_rms(blk.post_attention_layernorm)
        m.model.norm.forward = held_rms(m.model.norm)
    below = ALL_ATTENTION_FUNCTIONS.get_interface(m.config._attn_implementation, ml.eager_attention_forward)

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        calls["attention"].append(module.layer_idx)
        if not (held_probs and module.layer_idx > layer):
            return below(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kw)
        k = ml.repeat_kv(key, module.num_key_value_groups)
        v = ml.repeat_kv(value, module.num_key_value_groups)
        w = torch.matmul(query, k.transpose(2, 3)) * scaling
        if attention_mask is not None:
            w = w + attention_mask
        p = torch.softmax(w, dim=-1).detach()
        return torch.matmul(p, v).transpose(1, 2).contiguous(), p

    name = f"dcam_held_{id(m)}"
    transformers.AttentionInterface.register(name, attention)
    m.config._attn_implementation = name
    return calls


def additive_mask(allowed: np.ndarray) -> torch.Tensor:
    """Bool [B, 1, T, T] (True = attend) -> float additive mask (0 / -1e9); eager attention adds masks."""
    return torch.from_numpy(np.where(allowed, 0.0, -1e9)).double()


def layer_state_and_grad(m, x, mask, layer: int, position: int, token: int):
    """One forward and one backward of transformers model ``m`` (the authors' way): log p(``token``) at sequence
    ``position``, differentiated with respect to the output of decoder block ``layer`` (a forward hook retains its
    gradient). x: [1, T, D] inputs_embeds; mask: [1, 1, T, T] additive. Returns (A [T, D], G [T, D], log p)."""
    captured = {}

    def hook(module, inputs, output):
        h = output[0] if isinstance(output, tuple) else output
        h.retain_grad()
        captured["h"] = h
        return output

    handle = m.model.layers[layer].register_forward_hook(hook)
    try:
        out = m(inputs_embeds=x, attention_mask=mask)
    finally:
        handle.remove()
    logp = torch.log_softmax(out.logits[0, position], -1)[int(token)]
    logp.backward()
    return captured["h"][0].detach().numpy(), captured["h"].grad[0].numpy(), float(logp.detach())
