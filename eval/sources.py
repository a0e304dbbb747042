"""Evaluation sources: one Item type and word roles for ShapesWorld, PIL-drawn shapes, COCO and GranDf."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from eval.config import RunConfig


# ----------------------------------------------------------------------------------------------------------
# datasets: one item type and word roles for all of them


@dataclasses.dataclass(frozen=True, eq=False)
class Item:
    """One image to evaluate.

    Attributes:
      index: dataset index. example_id: stable string id. image: [H, W, 3] uint8.
      label_map: [H, W] int class ids, 0 = background (``max`` mode). object_masks: [K, H, W] bool per object
      (``matched`` mode). object_labels: [K] class id of each object in label_map. object_names: K names.
      prompt: the prompt to use (None: the model's default). meta: JSON-ready facts for the example record.
      shapes_example: the ShapesWorld Example (None for other datasets).
    """

    index: int
    example_id: str
    image: np.ndarray
    label_map: np.ndarray
    object_masks: np.ndarray
    object_labels: tuple[int, ...]
    object_names: tuple[str, ...]
    prompt: Optional[str]
    meta: dict
    shapes_example: Any = None


@dataclasses.dataclass(frozen=True)
class WordInfo:
    """One word of a generated answer and how it is scored.

    Attributes:
      index: word index in the answer. word: the word. positions: its answer token positions.
      role: "object" (Obj-IoU), "function" (Func-IoU) or "other" (not scored).
      word_class: dataset-specific class (ShapesWorld: colour/shape/size/relation/function; COCO: category name
        or "content"; ...).
      status: "matched" (names known objects), "hallucinated" (ShapesWorld: no object has this attribute),
        "unmatched" (no object found: scored in max mode only), "absent" (COCO: a category missing from the
        mask), "function" or "unscored".
      objects: indices of the objects the word names (into Item.object_masks).
      noun: counts as a noun for Func-IoU's threshold.
    """

    index: int
    word: str
    positions: tuple[int, ...]
    role: str
    word_class: str
    status: str
    objects: tuple[int, ...] = ()
    noun: bool = False


# TAM's function words (scored by Func-IoU) are POS tags CC, DT, EX, MD, POS, PRP, PRP$, UH, WDT, WP, WP$, WRB;
# without a tagger we list the closed-class words of those tags. (What explain leaves out by default is another
# list: dcam_jax.cam.targets.STOP_WORDS.)
TAM_FUNCTION_WORDS = frozenset(
    "and or but nor yet so either neither both a an the this that these those some any each every no another all "
    "there can could may might must shall should will would 's i me you he him she her it we us they them myself "
    "yourself himself herself itself ourselves themselves my your his its our their mine yours hers ours theirs "
    "oh uh um wow which what who whom whose where when why how whatever whichever".split())


class ShapesSource:
    """ShapesWorld as an evaluation source: ``split`` examples from ``start``; exact word -> object alignment."""

    name = "shapes"

    def __init__(self, cfg: RunConfig):
        from dcam_jax.data import shapes

        self.shapes = shapes
        self.split = cfg.split
        self.config = shapes.preset(cfg.shapes_preset)
        self.prompt = cfg.prompt
        self.skipped: list[tuple[str, str]] = []
        self.size = shapes.SPLIT_SIZE

    def __len__(self):
        return self.size

    def item(self, index: int) -> Item:
        """Example ``index`` of the split (object k has label k + 1, in caption order)."""
        s = self.shapes
        ex = s.make_example(s.split_seed(self.split, index), self.config)
        labels = tuple(range(1, ex.num_objects + 1))
        return Item(index=index, example_id=f"shapes-{self.split}-{index}", image=ex.image,
                    label_map=ex.label_map.astype(np.int32), object_masks=ex.masks, object_labels=labels,
                    object_names=tuple(f"{c} {sh}" for c, sh in zip(ex.colours, ex.shapes)), prompt=self.prompt,
                    meta={"reference": ex.caption, "seed": ex.seed, "num_objects": ex.num_objects},
                    shapes_example=ex)

    def words(self, item: Item, words: Sequence[tuple[str, tuple[int, ...]]]) -> list[WordInfo]:
        """Roles of the answer's words (see :func:`shapes_word_infos`)."""
        return shapes_word_infos(item.shapes_example, words)

    def caption_eval(self, item: Item, text: str) -> dict:
        """Caption accuracy of the answer (see :func:`shapes_caption_eval`)."""
        return shapes_caption_eval(item.shapes_example, text)


class PilShapesSource(ShapesSource):
    """PIL-drawn shapes (dcam_jax.data.pil_shapes) in ShapesWorld's vocabulary: ``split`` seeds as ShapesWorld's,
    background ``--pil_background``, size ``--pil_size``; word roles and caption accuracy as for ShapesWorld."""

    name = "pil_shapes"

    def __init__(self, cfg: RunConfig):
        from dcam_jax.data import pil_shapes, shapes

        self.shapes = shapes
        self.pil = pil_shapes
        self.split = cfg.split
        w, h = pil_shapes.parse_size(cfg.pil_size)
        self.config = pil_shapes.PilShapesConfig(width=w, height=h, background=cfg.pil_background)
        self.prompt = cfg.prompt
        self.skipped: list[tuple[str, str]] = []
        self.size = shapes.SPLIT_SIZE

    def item(self, index: int) -> Item:
        """Example ``index`` of the split (object k has label k + 1, in caption order)."""
        ex = self.pil.make_example(self.shapes.split_seed(self.split, index), self.config)
        c = self.config
        labels = tuple(range(1, ex.num_objects + 1))
        return Item(index=index, example_id=f"pil_shapes-{c.background}-{c.width}x{c.height}-{self.split}-{index}",
                    image=ex.image, label_map=ex.label_map.astype(np.int32), object_masks=ex.masks,
                    object_labels=labels,
                    object_names=tuple(f"{col} {sh}" for col, sh in zip(ex.colours, ex.shapes)), prompt=self.prompt,
                    meta={"reference": ex.caption, "seed": ex.seed, "num_objects": ex.num_objects,
                          "background": c.background, "background_rgb": list(self.pil.background_rgb(ex))},
                    shapes_example=ex)


def _phrases(classes: Sequence[Optional[str]]) -> list[int]:
    """Phrase id of each word (-1 for words outside object phrases), grouping like shapes.parse_caption."""
    slot = {"size": 0, "colour": 1, "shape": 2}
    out, pid, filled = [], -1, None
    for c in classes:
        if c in slot:
            if filled is None or slot[c] in filled:
                pid += 1
                filled = set()
            filled.add(slot[c])
            out.append(pid)
            if c == "shape":
                filled = None
        else:
            filled = None
            out.append(-1)
    return out


def shapes_word_infos(example, words: Sequence[tuple[str, tuple[int, ...]]]) -> list[WordInfo]:
    """Align the words of a generated caption with the objects of a ShapesWorld example.

    A colour / shape / size word names the objects that have that attribute. When several objects have it (only
    in presets with repeated attributes), the other attribute words of the same phrase ("red circle") pick the
    objects that agree with most of them; a remaining tie keeps all tied objects (their masks are united in
    matched mode). A word whose attribute no object has is "hallucinated".

    words: [(word, positions)] from dcam_jax.cam.targets.group_words. Returns one WordInfo per word.
    """
    from dcam_jax.data import shapes

    lower = [w.lower() for w, _ in words]
    classes = [shapes.WORD_CLASS.get(w) for w in lower]
    phrase = _phrases(classes)
    attrs = {"colour": example.colours, "shape": example.shapes, "size": example.sizes}
    out = []
    for k, ((w, pos), lw, cls) in enumerate(zip(words, lower, classes)):
        if cls in attrs:
            cands = [j for j, v in enumerate(attrs[cls]) if v == lw]
            if not cands:
                out.append(WordInfo(k, w, pos, "object", cls, "hallucinated", (), cls == "shape"))
                continue
            mates = [(classes[q], lower[q]) for q in range(len(words))
                     if q != k and phrase[q] == phrase[k] and phrase[k] >= 0]
            agree = [sum(attrs[c][j] == v for c, v in mates) for j in cands]
            best = max(agree)
            objs = tuple(j for j, a in zip(cands, agree) if a == best)
            out.append(WordInfo(k, w, pos, "object", cls, "matched", objs, cls == "shape"))
        elif cls == "function":
            out.append(WordInfo(k, w, pos, "function", cls, "function"))
        else:
            out.append(WordInfo(k, w, pos, "other", cls or "other", "unscored"))
    return out


def shapes_caption_eval(example, text: str) -> dict:
    """Caption accuracy of a generated caption against a ShapesWorld example.

    Phrases of the caption (shapes.parse_caption) are assigned one-to-one to the objects so that the number of
    agreeing attributes is largest (:func:`dcam_jax.data.shapes.match_phrases`). Per object: colour right, shape
    right, both (bound).
    Returns counts: objects, phrases, colour_correct, shape_correct, bound_correct, all_correct (as many phrases
    as objects and every object bound correctly), exact (the caption equals the reference).
    """
    from dcam_jax.data import shapes

    phrases = shapes.parse_caption(text)
    n, m = example.num_objects, len(phrases)
    pairs = [(i, j) for i, j in enumerate(shapes.match_phrases(example.colours, example.shapes, phrases)) if j >= 0]
    colour_ok = sum(phrases[j][1] == example.colours[i] for i, j in pairs)
    shape_ok = sum(phrases[j][2] == example.shapes[i] for i, j in pairs)
    bound = sum(phrases[j][1] == example.colours[i] and phrases[j][2] == example.shapes[i] for i, j in pairs)
    return {"objects": n, "phrases": m, "colour_correct": colour_ok, "shape_correct": shape_ok,
            "bound_correct": bound, "all_correct": bool(m == n and bound == n),
            "exact": " ".join(text.lower().split()) == example.caption}


class GroundedSource:
    """COCO or GranDf (dcam_jax.data.coco / grandf) as an evaluation source."""

    def __init__(self, cfg: RunConfig):
        self.name = cfg.dataset
        self.prompt = cfg.prompt
        if cfg.dataset == "coco":
            from dcam_jax.data import coco

            ids = None
            if cfg.coco_ids_file:
                p = Path(cfg.coco_ids_file)
                if not p.is_file():
                    raise ValueError(f"--coco_ids_file={p} does not exist")
                try:
                    ids = [int(line) for line in p.read_text().split() if line.strip()]
                except ValueError:
                    raise ValueError(f"--coco_ids_file={p} must hold one integer image id per line") from None
            self.reader = coco.CocoCaptions(cfg.data_dir, split=cfg.split, ids=ids)
        else:
            from dcam_jax.data import grandf

            self.reader = grandf.GranDf(cfg.data_dir, split=cfg.split, first_rle_only=cfg.grandf_first_rle_only)
        self.skipped = list(self.reader.skipped)

    def __len__(self):
        return len(self.reader)

    def item(self, index: int) -> Item:
        """Raises dcam_jax.data.coco.SkipImage for an image that cannot be evaluated."""
        g = self.reader[index]
        prompt = self.prompt
        if prompt is not None and "{focus}" in prompt:
            if not g.focus:
                raise ValueError(f"--prompt uses {{focus}} but {g.example_id} has no grounded phrase")
            prompt = prompt.replace("{focus}", g.focus)
        masks = np.stack([o.mask for o in g.objects]) if g.objects else np.zeros((0,) + g.label_map.shape, bool)
        return Item(index=index, example_id=g.example_id, image=g.image, label_map=g.label_map.astype(np.int32),
                    object_masks=masks, object_labels=tuple(o.label for o in g.objects),
                    object_names=tuple(o.name for o in g.objects), prompt=prompt,
                    meta={"reference": g.captions[0] if g.captions else None, "source": g.source,
                          "num_objects": len(g.objects)})

    def words(self, item: Item, words: Sequence[tuple[str, tuple[int, ...]]]) -> list[WordInfo]:
        """Roles of the answer's words: function words (TAM's closed classes), content words as object words
        (COCO: matched through the category synonym table, "absent" when the category is not in the mask,
        "unmatched" when the word names no category; GranDf: matched to the phrases containing the word), the
        rest unscored."""
        from dcam_jax.cam.targets import is_content_word
        from dcam_jax.data import coco

        strs = [w for w, _ in words]
        out = []
        for k, (w, pos) in enumerate(words):
            lw = coco.normalize_word(w)
            if not lw:
                out.append(WordInfo(k, w, pos, "other", "punctuation", "unscored"))
            elif lw in TAM_FUNCTION_WORDS or w.lower() in TAM_FUNCTION_WORDS:
                out.append(WordInfo(k, w, pos, "function", "function", "function"))
            elif not is_content_word(w):
                out.append(WordInfo(k, w, pos, "other", "other", "unscored"))
            elif self.name == "coco":
                cat, objs = self.reader.objects_for_word(_as_grounded(item), strs, k)
                objs = tuple(j for j in objs if item.object_masks[j].any())
                if cat is None:
                    out.append(WordInfo(k, w, pos, "object", "content", "unmatched", (), True))
                else:
                    status = "matched" if objs else "absent"
                    out.append(WordInfo(k, w, pos, "object", coco.COCO_CATEGORIES.get(cat, str(cat)), status,
                                        objs, True))
            else:
                objs = tuple(j for j in self.reader.objects_for_word(_as_grounded(item), w)
                             if item.object_masks[j].any())
                out.append(WordInfo(k, w, pos, "object", "content", "matched" if objs else "unmatched", objs, True))
        return out

    def caption_eval(self, item: Item, text: str) -> None:
        """No caption accuracy for real photos (there is no closed vocabulary to check against)."""
        return None


def _as_grounded(item: Item):
    from dcam_jax.data.coco import GroundedExample, GroundedObject

    objs = tuple(GroundedObject(l, n, m) for l, n, m in zip(item.object_labels, item.object_names,
                                                             item.object_masks))
    return GroundedExample(item.example_id, item.image, item.label_map, objs)


def open_source(cfg: RunConfig):
    """The evaluation source of ``cfg.dataset`` (ShapesSource, PilShapesSource or GroundedSource)."""
    if cfg.dataset == "shapes":
        return ShapesSource(cfg)
    if cfg.dataset == "pil_shapes":
        return PilShapesSource(cfg)
    return GroundedSource(cfg)
