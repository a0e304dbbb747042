"""The toy model's word-level tokenizer, in the Hugging Face ``tokenizers`` format.

One token per word of the ShapesWorld vocabulary, plus the prompt words, a little punctuation and LLaDA-style
special tokens with the same roles as LLaDA-8B's:

=======================  =====  ===================================================
token                    id     role
=======================  =====  ===================================================
``<|endoftext|>``        0      EOS and padding (``LMConfig.eos_id`` / ``pad_id``)
``<|startoftext|>``      1      BOS (``bos_id``); written literally by the chat template
``<|mdm_mask|>``         2      the diffusion mask (``mask_id``)
``<|eot_id|>``           3      end of turn (``eot_id``)
``<|start_header_id|>``  4      chat header open
``<|end_header_id|>``    5      chat header close
``<|unk|>``              6      any word outside the vocabulary
``\\n`` / ``\\n\\n``       7, 8   newline runs of the chat template (kept as tokens, see below)
=======================  =====  ===================================================

Text is lower-cased, split on spaces, and newline runs and punctuation become tokens of their own. No BOS is added
automatically: the chat template writes ``<|startoftext|>`` itself. With the reference ``tokenize_with_image``
quirk (when the first chunk starts with BOS, the first token of every later chunk is dropped), the chunk after
``<image>`` is ``"\\ndescribe the image<|eot_id|>..."`` and the dropped token is the ``"\\n"`` newline, as with
LLaDA's own byte-level tokenizer. Decoding joins tokens with single spaces.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dcam_jax.data import shapes

EOS = "<|endoftext|>"
BOS = "<|startoftext|>"
MASK = "<|mdm_mask|>"
EOT = "<|eot_id|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
UNK = "<|unk|>"
SPECIAL_TOKENS: tuple[str, ...] = (EOS, BOS, MASK, EOT, START_HEADER, END_HEADER, UNK)
# Tokens of the chat template and prompts besides the caption vocabulary.
TEMPLATE_TOKENS: tuple[str, ...] = ("\n", "\n\n", "user", "assistant", "system", ".", ",", "?", "!", ":")
PROMPT_WORDS: tuple[str, ...] = ("describe", "the", "image", "this", "what", "is", "in", "one", "sentence")


def vocabulary() -> tuple[str, ...]:
    """All tokens in id order: specials, template tokens, prompt words, then the ShapesWorld caption words.

    Returns a tuple of V strings; the id of a token is its index.
    """
    words = SPECIAL_TOKENS + TEMPLATE_TOKENS + PROMPT_WORDS
    extra = tuple(w for w in shapes.VOCABULARY if w not in words)
    return words + extra


def special_token_ids() -> dict[str, int]:
    """{"eos_id", "pad_id", "bos_id", "mask_id", "eot_id"} -> id; what ``toy_config()`` puts in its LMConfig."""
    v = vocabulary()
    return {"eos_id": v.index(EOS), "pad_id": v.index(EOS), "bos_id": v.index(BOS), "mask_id": v.index(MASK),
            "eot_id": v.index(EOT)}


def build_tokenizer():
    """The toy tokenizer as a ``tokenizers.Tokenizer`` (word level, lower-casing, space-joined decoding)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers import AddedToken

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[ \t]+"), behavior="removed"),
        pre_tokenizers.Split(Regex(r"\n+"), behavior="isolated"),
        pre_tokenizers.Split(Regex(r"[.,?!:]"), behavior="isolated"),
    ])
    # WordPiece's decoder with an unused prefix joins tokens with single spaces and cleans no spacing.
    tok.decoder = decoders.WordPiece(prefix="\u0000##", cleanup=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def save_tokenizer(directory: str | os.PathLike, *, model_max_length: int = 512) -> Path:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into ``directory`` (created).

    The result loads with ``transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)``.
    Returns the directory as a Path.
    """
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise ValueError(f"tokenizer directory {out} exists and is not a directory; pass a directory path")
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save(str(out / "tokenizer.json"))
    ids = {t: i for i, t in enumerate(vocabulary())}
    specials = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": UNK, "mask_token": MASK,
                "additional_special_tokens": [EOT, START_HEADER, END_HEADER]}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": int(model_max_length),
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "padding_side": "right",
        **specials,
        "added_tokens_decoder": {str(ids[t]): {"content": t, "lstrip": False, "rstrip": False, "normalized": False,
                                               "single_word": False, "special": True} for t in SPECIAL_TOKENS},
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, sort_keys=True) + "\n")
    return out
