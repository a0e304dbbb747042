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
