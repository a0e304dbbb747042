"""Shared fixtures: a tiny random multimodal model with a word-level tokenizer (no downloads)."""

import json
from pathlib import Path

import jax
import pytest

WORDS = ["a", "red", "blue", "green", "circle", "square", "triangle", "and", "above", "below", "left", "of",
         "describe", "the", "image", "user", "assistant"]


def make_word_tokenizer(directory: Path, vocab_size: int, special: dict[str, int], words=WORDS) -> Path:
    """Write a word-level HF tokenizer whose special ids match a config (ids of words from 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(words)}
    vocab.update({tok: i for tok, i in special.items()})
    vocab["[UNK]"] = len(words)
    assert len(set(vocab.values())) == len(vocab) and max(vocab.values()) < vocab_size
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(t, special=True) for t in special])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    inv = {v: k for k, v in special.items()}
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": inv.get(61), "eos_token": inv.get(62),
        "pad_token": inv.get(62), "mask_token": inv.get(63), "unk_token": "[UNK]",
        "add_bos_token": False, "add_eos_token": False}))
    return directory


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """dcam_jax.api.Model: tiny LaViDa-shaped random model (3 LM layers) + word tokenizer."""
    from dcam_jax.api import Model
    from dcam_jax.models import config as C
    from dcam_jax.models import mllm
    from dcam_jax.processing.image import ImageProcessor
    from dcam_jax.processing.text import load_tokenizer

    cfg = C.tiny_mllm(lm=C.tiny_lm(n_layers=3),
                      sampling_defaults=(("gen_length", 8), ("block_length", 8), ("steps", 8)))
    params = mllm.init_mllm_params(jax.random.key(0), cfg, "float32", scale=0.3)
    d = make_word_tokenizer(tmp_path_factory.mktemp("tok"), cfg.lm.vocab_size,
                            {"<|startoftext|>": 61, "<|endoftext|>": 62, "<|mdm_mask|>": 63, "<|eot_id|>": 60})
    return Model(cfg, params, load_tokenizer(d), ImageProcessor(cfg))
