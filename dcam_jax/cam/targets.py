"""Which answer positions to explain: words from sub-tokens, content words, and target specs."""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

_PUNCT = re.compile(r"^[\W_]+$")
# Words not explained under targets="content": closed-class words and the spatial relation words, whose evidence
# is a relation between objects rather than a region. (Evaluation's TAM function words are another list:
# eval.sources.TAM_FUNCTION_WORDS.)
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
