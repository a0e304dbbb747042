"""The caption grammar: writing captions from objects, parsing and checking generated ones, matching phrases."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import numpy as np

from dcam_jax.data.shapes.vocab import RELATION_PHRASES, WORD_CLASS
from dcam_jax.data.shapes.config import ShapesConfig


def parse_caption(text: str) -> list[tuple[Optional[str], Optional[str], Optional[str]]]:
    """The objects a (possibly generated, possibly malformed) caption names, in order.

    An object phrase is 'a', then optional size, colour and shape words; a phrase missing a colour
    or a shape yields None in that slot. Words outside the vocabulary are ignored.

    Args:
      text: caption text.
    Returns:
      list of (size, colour, shape) per object phrase.
    """
    objects: list[list[Optional[str]]] = []
    current: Optional[list[Optional[str]]] = None
    slot = {"size": 0, "colour": 1, "shape": 2}
    for word in text.lower().split():
        cls = WORD_CLASS.get(word)
        if cls in slot:
            if current is None or current[slot[cls]] is not None:
                current = [None, None, None]
                objects.append(current)
            current[slot[cls]] = word
            if cls == "shape":
                current = None
        elif cls is not None:
            current = None
    return [tuple(o) for o in objects]


def is_well_formed(text: str, size_words: bool = False) -> bool:
    """Whether ``text`` is a sentence of the caption grammar (module docstring): object phrases
    ``a [size] colour shape``, grouped in pairs joined by one relation phrase, groups joined by
    ``and``. Repeated articles, dangling relations and words outside the vocabulary all fail.

    Args:
      text: a caption, words separated by spaces (an empty caption is not well formed).
      size_words: whether object phrases carry a size word.
    Returns:
      True iff the words parse as a caption.
    """
    words = text.lower().split()
    pos = 0

    def phrase() -> bool:
        nonlocal pos
        need = ("function", "size", "colour", "shape") if size_words else ("function", "colour", "shape")
        chunk = words[pos:pos + len(need)]
        if len(chunk) < len(need) or chunk[0] != "a":
            return False
        if tuple(WORD_CLASS.get(w) for w in chunk[1:]) != need[1:]:
            return False
        pos += len(need)
        return True

    def relation() -> bool:
        nonlocal pos
        for phrase_words in RELATION_PHRASES.values():
            if tuple(words[pos:pos + len(phrase_words)]) == phrase_words:
                pos += len(phrase_words)
                return True
        return False

    while True:
        if not phrase():
            return False
        if pos < len(words) and words[pos] != "and":
            if not relation() or not phrase():
                return False
        if pos == len(words):
            return True
        if words[pos] != "and":
            return False
        pos += 1


def match_phrases(colours: Sequence[str], shapes_: Sequence[str],
                  phrases: Sequence[tuple[Optional[str], Optional[str], Optional[str]]]) -> list[int]:
    """One-to-one assignment of true objects to caption phrases that agrees on the most attributes.

    Colour and shape agreements count one each, and a phrase agreeing on both counts two more, so among
    assignments with equally many agreeing words the one with more correctly bound objects wins (Hungarian
    assignment, exact for any number of phrases).

    Args:
      colours, shapes_: [N] the true objects' colour and shape words.
      phrases: [M] (size, colour, shape) per phrase, as :func:`parse_caption` returns.
    Returns:
      [N] index of the phrase assigned to each object, or -1 (more objects than phrases).
    """
    from scipy.optimize import linear_sum_assignment

    if len(colours) != len(shapes_):
        raise ValueError(f"{len(colours)} colours but {len(shapes_)} shapes")
    assign = [-1] * len(colours)
    if not phrases or not colours:
        return assign
    col = np.array([[p[1] == c for p in phrases] for c in colours], np.int64)  # [N, M]
    shp = np.array([[p[2] == s for p in phrases] for s in shapes_], np.int64)
    rows, cols = linear_sum_assignment(-(col + shp + 2 * col * shp))
    for i, j in zip(rows, cols):
        assign[int(i)] = int(j)
    return assign


def _relation(ci: np.ndarray, cj: np.ndarray) -> str:
    """Relation of object i to object j from centres (y, x)."""
    dy, dx = float(cj[0] - ci[0]), float(cj[1] - ci[1])
    if abs(dy) > abs(dx):
        return "above" if dy > 0 else "below"
    return "left of" if dx > 0 else "right of"


def _caption(c: ShapesConfig, sizes, colours, shapes, centres: np.ndarray):
    words: list[str] = []
    objs: list[Optional[int]] = []
    relations: list[tuple[int, str, int]] = []

    def name(k: int):
        words.append("a")
        objs.append(None)
        if c.size_words:
            words.append(sizes[k])
            objs.append(k)
        words.extend((colours[k], shapes[k]))
        objs.extend((k, k))

    count = len(shapes)
    group = 2 if c.relations else 1
    for start in range(0, count, group):
        if start:
            words.append("and")
            objs.append(None)
        name(start)
        if group == 2 and start + 1 < count:
            rel = _relation(centres[start], centres[start + 1])
            relations.append((start, rel, start + 1))
            for w in RELATION_PHRASES[rel]:
                words.append(w)
                objs.append(None)
            name(start + 1)
    return tuple(words), tuple(objs), tuple(relations)


def max_caption_words(config: ShapesConfig) -> int:
    """Upper bound on the number of words of a caption under ``config``."""
    n = config.max_objects
    per_object = 4 if config.size_words else 3
    if config.relations:
        return n * per_object + 2 * (n // 2) + (math.ceil(n / 2) - 1)
    return n * per_object + (n - 1)
