"""Host-side text processing: the LLaDA chat template, tokenisation with the image placeholder, decoding.

The prompt string follows the models' ``LLAMA_3`` conversation style::

    <|startoftext|><|start_header_id|>system<|end_header_id|>\\n\\n{SYSTEM}<|eot_id|>
    <|start_header_id|>user<|end_header_id|>\\n\\n<image>\\n{QUESTION}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n

(one line in reality; the system turn is left out when the config has no system prompt). ``<image>`` becomes the
single id -200, which :mod:`dcam_jax.models.mllm` later replaces by the image token block.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from dcam_jax.models.config import IMAGE_TOKEN_INDEX, MLLMConfig

IMAGE_PLACEHOLDER = "<image>"


def load_tokenizer(path: str | os.PathLike):
    """Load a tokenizer from a local directory with transformers (never downloads)."""
    from transformers import AutoTokenizer

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory {path!r} does not exist")
    if not any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        raise FileNotFoundError(f"{path!r} holds no tokenizer.json or tokenizer_config.json")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def chat_prompt(question: str, config: MLLMConfig, *, with_image: bool = True) -> str:
    """The full prompt string for one user turn, ending with the assistant header (generation prompt)."""
    user = (IMAGE_PLACEHOLDER + "\n" if with_image else "") + question
    if config.chat_template == "plain":
        return f"{user}\n"
    turns = []
    if config.system_prompt:
        turns.append(("system", config.system_prompt))
    turns.append(("user", user))
    text = "<|startoftext|>"
    for role, content in turns:
        text += f"<|start_header_id|>{role}<|end_header_id|>\n\n{content.strip()}<|eot_id|>"
    return text + "<|start_header_id|>assistant<|end_header_id|>\n\n"


def tokenize_with_image(text: str, tokenizer) -> list[int]:
    """Token ids of ``text`` with each ``<image>`` replaced by -200, exactly as the reference
    ``tokenizer_image_token``: the chunks between placeholders are tokenised separately; when the first chunk
    starts with BOS, the first token of *every* chunk is dropped (the reference assumes each chunk got its own BOS).
    This is reproduced, not fixed, so that token ids match what the models saw in training.
    """
    chunks = [tokenizer(c).input_ids for c in text.split(IMAGE_PLACEHOLDER)]
    offset = 0
    ids: list[int] = []
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    for k, chunk in enumerate(chunks):
        if k:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(chunk[offset:])
    return ids


# Control strings of the chat template, refused in prompts whatever the tokenizer says.
TEMPLATE_TOKENS = ("<|startoftext|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                   "<|endoftext|>", "<|mdm_mask|>")


def special_token_strings(tokenizer) -> tuple[str, ...]:
    """Every string the tokenizer turns into a special token (its special and added special tokens) and the chat
    template's control strings, longest first."""
    found = set(TEMPLATE_TOKENS) | {str(t) for t in getattr(tokenizer, "all_special_tokens", ())}
    for tok in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(tok, "special", False):
            found.add(str(tok.content))
    return tuple(sorted((t for t in found if t), key=lambda t: (-len(t), t)))


def check_plain_prompt(question: str, tokenizer) -> None:
    """Refuse a prompt that contains a special token's text (``<|mdm_mask|>``, ``<|eot_id|>``, ...).

    Prompts are plain text: a control string typed into one would be tokenised as the real control token and
    could inject mask tokens or extra chat turns. Raises ValueError naming the string.
    """
    for token in special_token_strings(tokenizer):
        if token in question:
            raise ValueError(f"the prompt contains the special token {token!r}; prompts are plain text and may not "
                             "contain the model's control tokens (remove it, or spell it differently)")


def build_prompt_ids(question: str | None, config: MLLMConfig, tokenizer) -> np.ndarray:
    """Host int32 ids [T] of the chat prompt for ``question`` with one image placeholder.

    ``question=None`` uses the model's default prompt; a model without one raises. A question that contains the
    text of a special token is refused (:func:`check_plain_prompt`).
    """
    if question is None:
        if not config.default_prompt:
            raise ValueError(f"model {config.name!r} has no default prompt; pass a prompt")
        question = config.default_prompt
    if not isinstance(question, str) or not question.strip():
        raise ValueError("the prompt must be a non-empty string")
    if IMAGE_PLACEHOLDER in question:
        raise ValueError(f"the prompt must not contain {IMAGE_PLACEHOLDER!r}; the image is inserted for you")
    if tokenizer is None:
        raise ValueError("this model has no tokenizer; text prompts need one (convert the checkpoint with its "
                         "tokenizer files)")
    check_plain_prompt(question, tokenizer)
    return np.asarray(tokenize_with_image(chat_prompt(question, config), tokenizer), np.int32)


def token_strings(tokenizer, ids: Sequence[int]) -> list[str]:
    """Per-token strings as they appear in the decoded text, leading space included when the token starts a new
    word (decoded incrementally, so word-level and byte-level BPE tokenizers agree: ``" red"``, ``" cir"``,
    ``"cle"``). Special tokens keep their text."""
    ids = [int(i) for i in ids]
    pieces, prev = [], ""
    for k in range(len(ids)):
        cur = tokenizer.decode(ids[:k + 1])
        if cur.startswith(prev):
            pieces.append(cur[len(prev):])
        else:  # a tokenizer whose decode is not prefix-stable here: fall back to the token alone, spaced
            pieces.append(" " + tokenizer.decode([ids[k]]))
        prev = cur
    return pieces


def answer_length(tokens, stop_ids: Sequence[int]) -> np.ndarray:
    """Host-side: index of the first stop token (e.g. EOS, <|eot_id|>) in each answer, or G if none.

    tokens: [..., G] int -> [...] int64 (numpy).
    """
    tok = np.asarray(tokens)
    if tok.ndim < 1:
        raise ValueError(f"tokens must have a trailing answer axis [..., G], got shape {tok.shape}")
    stop = np.isin(tok, np.asarray(list(stop_ids), dtype=tok.dtype))
    return np.where(stop.any(-1), stop.argmax(-1), tok.shape[-1])


def trim_answer(tokens, stop_ids: Sequence[int]) -> list:
    """Host-side: the tokens before the first stop token. tokens: [G] -> list[int]; [B, G] -> list of lists."""
    tok = np.asarray(tokens)
    if tok.ndim not in (1, 2):
        raise ValueError(f"tokens must be [G] or [B, G], got shape {tok.shape}")
    n = answer_length(tok, stop_ids)
    if tok.ndim == 1:
        return tok[: int(n)].tolist()
    return [row[: int(k)].tolist() for row, k in zip(tok, n)]


def decode_answer(tokenizer, ids: Sequence[int], stop_ids: Sequence[int] = ()) -> tuple[str, int]:
    """Decode an answer up to (not including) the first stop id. Returns (text, number of tokens kept)."""
    ids = [int(i) for i in ids]
    n = int(answer_length(np.asarray(ids, np.int64), stop_ids)) if ids else 0
    return tokenizer.decode(ids[:n], skip_special_tokens=True).strip(), n


def special_ids(tokenizer) -> dict[str, Any]:
    return {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}
