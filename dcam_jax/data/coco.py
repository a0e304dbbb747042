"""COCO Caption in the TAM format: images, grey category masks, optional reference captions.

Layout of a data directory (the TAM-formatted COCO14 release, also what the Diffusion-CAM authors read)::

    ROOT/
      image/{id:012d}.jpg            the images
      seg_label/{id:012d}.png        8-bit grey masks; each pixel holds its COCO category id, 0 = background
      annotations/captions_{split}.json     optional: reference captions (COCO captions format)
      annotations/instances_{split}.json    optional: category names (otherwise the built-in table is used)

Every image in ``image/`` is considered in id order. An image without a mask, or whose mask holds no object, is
*skipped and counted* (``dataset.skipped``, with the reason); an image that cannot be decoded is reported by
:meth:`CocoCaptions.__getitem__` with :class:`SkipImage`, so the caller can count it too. Nothing is skipped
silently.

Words of a generated caption are mapped to categories (for the ``matched`` Obj-IoU, TAM's protocol) with a small
built-in synonym table (:data:`COCO_SYNONYMS`, :func:`category_of_word`): TAM uses WordNet lemmas; we use a
hand-written table of the common names of the 80 categories plus naive singularisation, which needs no NLTK
download and is easy to audit.

The :class:`GroundedExample` defined here is the common currency of the evaluation harness (``eval/run.py``);
the GranDf reader returns it too.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
from PIL import Image

# COCO 2014/2017 detection categories: id -> name (ids have gaps, as in the official annotations).
COCO_CATEGORIES: dict[int, str] = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train", 8: "truck",
    9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign", 14: "parking meter", 15: "bench",
    16: "bird", 17: "cat", 18: "dog", 19: "horse", 20: "sheep", 21: "cow", 22: "elephant", 23: "bear",
    24: "zebra", 25: "giraffe", 27: "backpack", 28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase",
    34: "frisbee", 35: "skis", 36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat",
    40: "baseball glove", 41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle",
    46: "wine glass", 47: "cup", 48: "fork", 49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple",
    54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot", 58: "hot dog", 59: "pizza", 60: "donut",
    61: "cake", 62: "chair", 63: "couch", 64: "potted plant", 65: "bed", 67: "dining table", 70: "toilet",
    72: "tv", 73: "laptop", 74: "mouse", 75: "remote", 76: "keyboard", 77: "cell phone", 78: "microwave",
    79: "oven", 80: "toaster", 81: "sink", 82: "refrigerator", 84: "book", 85: "clock", 86: "vase",
    87: "scissors", 88: "teddy bear", 89: "hair drier", 90: "toothbrush",
}

# Single words (singular, lower case) that name a category in everyday captions.
_SYNONYMS_BY_CATEGORY: dict[int, tuple[str, ...]] = {
    1: ("person", "people", "man", "woman", "boy", "girl", "child", "kid", "baby", "guy", "lady", "player",
        "skier", "surfer", "skateboarder", "snowboarder", "rider", "pedestrian", "adult", "teenager", "toddler",
        "gentleman", "human", "crowd", "batter", "catcher", "pitcher", "umpire", "chef", "cook", "officer",
        "soldier", "worker", "tourist", "couple", "family", "someone", "biker", "cyclist", "athlete"),
    2: ("bicycle", "bike", "cycle"),
    3: ("car", "sedan", "taxi", "cab", "suv", "automobile", "vehicle"),
    4: ("motorcycle", "motorbike", "scooter", "moped"),
    5: ("airplane", "plane", "jet", "aircraft", "airliner", "aeroplane"),
    6: ("bus",),
    7: ("train", "locomotive", "tram", "trolley"),
    8: ("truck", "pickup", "lorry", "van"),
    9: ("boat", "ship", "sailboat", "canoe", "kayak", "yacht", "ferry"),
    10: ("stoplight",),
    11: ("hydrant",),
    14: ("meter",),
    15: ("bench",),
    16: ("bird", "pigeon", "seagull", "gull", "duck", "goose", "parrot", "swan", "eagle", "owl", "crow"),
    17: ("cat", "kitten", "kitty"),
    18: ("dog", "puppy", "pup"),
    19: ("horse", "pony", "foal"),
    20: ("sheep", "lamb", "ram"),
    21: ("cow", "cattle", "bull", "calf", "ox"),
    22: ("elephant",),
    23: ("bear",),
    24: ("zebra",),
    25: ("giraffe",),
    27: ("backpack", "rucksack"),
    28: ("umbrella", "parasol"),
    31: ("handbag", "purse", "bag"),
    32: ("tie", "necktie"),
    33: ("suitcase", "luggage"),
    34: ("frisbee",),
    35: ("ski",),
    36: ("snowboard",),
    37: ("ball", "football", "soccer"),
    38: ("kite",),
    39: ("bat",),
    40: ("glove", "mitt"),
    41: ("skateboard",),
    42: ("surfboard",),
    43: ("racket", "racquet"),
    44: ("bottle",),
    47: ("cup", "mug"),
    48: ("fork",),
    49: ("knife",),
    50: ("spoon",),
    51: ("bowl",),
    52: ("banana",),
    53: ("apple",),
    54: ("sandwich", "burger", "hamburger", "sub"),
    55: ("orange",),
    56: ("broccoli",),
    57: ("carrot",),
    59: ("pizza",),
    60: ("donut", "doughnut"),
    61: ("cake", "cupcake"),
    62: ("chair", "stool"),
    63: ("couch", "sofa"),
    64: ("plant",),
    65: ("bed",),
    67: ("table", "desk"),
    70: ("toilet",),
    72: ("tv", "television", "monitor", "screen"),
    73: ("laptop", "computer", "notebook"),
    74: ("mouse",),
    75: ("remote", "controller"),
    76: ("keyboard",),
    77: ("phone", "cellphone", "smartphone"),
    78: ("microwave",),
    79: ("oven", "stove"),
    80: ("toaster",),
    81: ("sink",),
    82: ("refrigerator", "fridge"),
    84: ("book",),
    85: ("clock",),
    86: ("vase",),
    87: ("scissors",),
    88: ("teddy",),
    89: ("hairdryer", "dryer"),
    90: ("toothbrush",),
}

# Two-word names (singular). Checked before single words, so "hot dog" is food, not a dog.
_BIGRAMS: dict[tuple[str, str], int] = {
    ("traffic", "light"): 10, ("fire", "hydrant"): 11, ("stop", "sign"): 13, ("parking", "meter"): 14,
    ("sports", "ball"): 37, ("baseball", "bat"): 39, ("baseball", "glove"): 40, ("tennis", "racket"): 43,
    ("tennis", "racquet"): 43, ("wine", "glass"): 46, ("hot", "dog"): 58, ("potted", "plant"): 64,
    ("dining", "table"): 67, ("cell", "phone"): 77, ("mobile", "phone"): 77, ("teddy", "bear"): 88,
    ("hair", "drier"): 89, ("hair", "dryer"): 89, ("tooth", "brush"): 90,
}

COCO_SYNONYMS: dict[str, int] = {w: c for c, words in _SYNONYMS_BY_CATEGORY.items() for w in words}

_IRREGULAR_PLURALS = {
    "people": "people", "men": "man", "women": "woman", "children": "child", "geese": "goose", "mice": "mouse",
    "teeth": "tooth", "feet": "foot", "oxen": "ox", "knives": "knife", "calves": "calf", "skis": "ski",
    "scissors": "scissors", "glasses": "glass", "buses": "bus", "benches": "bench", "sandwiches": "sandwich",
    "dishes": "dish", "boxes": "box", "couches": "couch", "brushes": "brush", "toothbrushes": "toothbrush",
    "sheep": "sheep", "cattle": "cattle", "broccoli": "broccoli", "luggage": "luggage", "bus": "bus",
    "skies": "sky", "ponies": "pony", "puppies": "puppy", "kitties": "kitty", "babies": "baby",
    "ladies": "lady", "guys": "guy", "toys": "toy", "boys": "boy",
}

_WORD_RE = re.compile(r"[a-z]+")


def singular(word: str) -> str:
    """Lower-case singular of an English noun by a few rules (good enough for caption nouns).

    ``"Dogs" -> "dog"``, ``"knives" -> "knife"``, ``"buses" -> "bus"``, ``"glass" -> "glass"``.
    """
    w = word.strip().lower()
    if w in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[w]
    if len(w) > 3 and w.endswith("ies"):
        return w[:-3] + "y"
    if len(w) > 3 and w.endswith(("ches", "shes", "sses", "xes", "zes")):
        return w[:-2]
    if len(w) > 2 and w.endswith("s") and not w.endswith(("ss", "us", "is")):
        return w[:-1]
    return w


def normalize_word(word: str) -> str:
    """Lower case, letters only, possessive ``'s`` dropped: ``"Dog's," -> "dog"``; "" for words without
    letters."""
    w = word.lower().replace("'s", "")
    return "".join(_WORD_RE.findall(w))


def category_of_word(word: str, previous: str | None = None, next_word: str | None = None) -> int | None:
    """The COCO category id a caption word names, or None.

    Two-word names win over single words: the head word of a bigram (``"hot dog"``: the word ``dog`` with
    previous ``hot``) and its modifier (``hot`` with next ``dog``) both map to the bigram's category.

    Args:
      word: the word (any case, punctuation ignored).
      previous, next_word: the neighbouring words of the caption (or None).
    Returns:
      category id (a key of :data:`COCO_CATEGORIES`) or None.
    """
    w = singular(normalize_word(word))
    if not w:
        return None
    if previous is not None:
        c = _BIGRAMS.get((singular(normalize_word(previous)), w))
        if c is not None:
            return c
    if next_word is not None:
        c = _BIGRAMS.get((w, singular(normalize_word(next_word))))
        if c is not None:
            return c
    return COCO_SYNONYMS.get(w)


# ----------------------------------------------------------------------------------------------------------
# the example type shared by the readers


@dataclasses.dataclass(frozen=True)
class GroundedObject:
    """One annotated object (or category) of an image.

    Attributes:
      label: its class id in the example's ``label_map`` (COCO category id; GranDf object index + 1).
      name: category name or grounded phrase.
      mask: [H, W] bool, the object's own pixels (for GranDf the union of all its RLEs, overlaps kept).
    """

    label: int
    name: str
    mask: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class GroundedExample:
    """An image with ground-truth object masks, for the evaluation harness.

    Attributes:
      example_id: a stable string id (e.g. ``"coco-000000000139"``).
      image: [H, W, 3] uint8 RGB.
      label_map: [H, W] int32 class ids, 0 = background (what the ``max`` Obj-IoU uses).
      objects: the annotated objects (what the ``matched`` Obj-IoU uses).
      captions: reference captions (may be empty).
      focus: a phrase a prompt may name (GranDf: the first grounded phrase), or None.
      source: the image file it was read from.
    """

    example_id: str
    image: np.ndarray
    label_map: np.ndarray
    objects: tuple[GroundedObject, ...]
    captions: tuple[str, ...] = ()
    focus: Optional[str] = None
    source: Optional[str] = None


class SkipImage(Exception):
    """An image that cannot be evaluated; ``reason`` says why. Callers count it; they never hide it."""

    def __init__(self, example_id: str, reason: str):
        super().__init__(f"{example_id}: {reason}")
        self.example_id = example_id
        self.reason = reason


def read_rgb(path: Path, example_id: str) -> np.ndarray:
    """[H, W, 3] uint8 RGB pixels of an image file; :class:`SkipImage` if it cannot be decoded."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise SkipImage(example_id, f"image {path} cannot be decoded ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------------------------------------
# COCO Caption reader


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON ({e}); re-download it") from None


class CocoCaptions:
    """TAM-format COCO Caption images with grey category masks (see the module docstring for the layout).

    Args:
      root: the data directory (holds ``image/`` and ``seg_label/``).
      split: annotation split name used to find optional ``annotations/captions_{split}.json`` and
        ``annotations/instances_{split}.json`` (e.g. ``"val2014"``); a split without such files simply has no
        reference captions and uses the built-in category names.
      ids: evaluate only these image ids (in this order); ids without an image file raise.
      captions_file / instances_file: explicit annotation files (override the split lookup; must exist).

    Attributes:
      ids: [N] usable image ids in evaluation order. skipped: [(image id, reason)] images left out up front.
      categories: {id: name}.
    """

    def __init__(self, root, *, split: str = "val2014", ids: Sequence[int] | None = None,
                 captions_file=None, instances_file=None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"COCO data directory {self.root} does not exist; pass --data_dir=DIR with "
                                    "image/ and seg_label/ (the TAM-formatted COCO14 release)")
        self.image_dir = self.root / "image"
        self.mask_dir = self.root / "seg_label"
        for d, what in ((self.image_dir, "images ({id:012d}.jpg)"), (self.mask_dir, "masks ({id:012d}.png)")):
            if not d.is_dir():
                raise FileNotFoundError(f"{d} does not exist; a TAM-format COCO directory holds image/ and "
                                        f"seg_label/ ({what})")
        self.split = split
        self.categories = dict(COCO_CATEGORIES)
        inst = Path(instances_file) if instances_file else self.root / "annotations" / f"instances_{split}.json"
        if instances_file and not inst.is_file():
            raise FileNotFoundError(f"instances file {inst} does not exist")
        if inst.is_file():
            data = _read_json(inst, "COCO instances file")
            cats = data.get("categories") if isinstance(data, dict) else None
            if not isinstance(cats, list) or not cats:
                raise ValueError(f"{inst} has no 'categories' list; is it a COCO instances file?")
            self.categories = {int(c["id"]): str(c["name"]) for c in cats}
        self.captions: dict[int, list[str]] = {}
        cap = Path(captions_file) if captions_file else self.root / "annotations" / f"captions_{split}.json"
        if captions_file and not cap.is_file():
            raise FileNotFoundError(f"captions file {cap} does not exist")
        if cap.is_file():
            data = _read_json(cap, "COCO captions file")
            anns = data.get("annotations") if isinstance(data, dict) else None
            if not isinstance(anns, list):
                raise ValueError(f"{cap} has no 'annotations' list; is it a COCO captions file?")
            for a in anns:
                self.captions.setdefault(int(a["image_id"]), []).append(str(a["caption"]).strip())
        self.skipped: list[tuple[str, str]] = []
        if ids is None:
            found = sorted(_image_ids(self.image_dir))
        else:
            found = [int(i) for i in ids]
            missing = [i for i in found if not (self.image_dir / f"{i:012d}.jpg").is_file()]
            if missing:
                raise FileNotFoundError(f"{len(missing)} requested image ids have no file in {self.image_dir}: "
                                        f"{missing[:10]}{' ...' if len(missing) > 10 else ''}")
        self.ids: list[int] = []
        for i in found:
            if (self.mask_dir / f"{i:012d}.png").is_file():
                self.ids.append(i)
            else:
                self.skipped.append((f"coco-{i:012d}", "no seg_label mask"))
        if not self.ids:
            raise ValueError(f"none of the {len(found)} images in {self.image_dir} has a mask in {self.mask_dir}; "
                             "nothing to evaluate")

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> GroundedExample:
        """The ``index``-th usable image. Raises :class:`SkipImage` for an unreadable image or mask, a mask whose
        size differs from the image, or a mask without objects."""
        i = self.ids[index]
        eid = f"coco-{i:012d}"
        image = read_rgb(self.image_dir / f"{i:012d}.jpg", eid)
        mpath = self.mask_dir / f"{i:012d}.png"
        try:
            with Image.open(mpath) as im:
                if im.mode not in ("L", "P", "I", "I;16"):
                    raise SkipImage(eid, f"mask {mpath} has mode {im.mode}; expected a grey (L) image of "
                                         "category ids")
                mask = np.asarray(im).astype(np.int32)
        except (OSError, ValueError) as e:
            raise SkipImage(eid, f"mask {mpath} cannot be decoded ({type(e).__name__}: {e})") from None
        if mask.shape != image.shape[:2]:
            raise SkipImage(eid, f"mask size {mask.shape} differs from image size {image.shape[:2]}")
        present = [int(c) for c in np.unique(mask) if c != 0]
        if not present:
            raise SkipImage(eid, "mask has no object pixels")
        unknown = [c for c in present if c not in self.categories]
        if unknown:
            raise SkipImage(eid, f"mask holds values {unknown} that are not COCO category ids")
        objects = tuple(GroundedObject(c, self.categories[c], mask == c) for c in present)
        return GroundedExample(example_id=eid, image=image, label_map=mask, objects=objects,
                               captions=tuple(self.captions.get(i, ())), source=str(self.image_dir /
                                                                                    f"{i:012d}.jpg"))

    def objects_for_word(self, example: GroundedExample, words: Sequence[str], k: int) -> tuple[Optional[int],
                                                                                               list[int]]:
        """(category id or None, indices into ``example.objects`` of that category) for word ``k`` of a caption
        (its neighbours decide two-word names)."""
        prev = words[k - 1] if k > 0 else None
        nxt = words[k + 1] if k + 1 < len(words) else None
        c = category_of_word(words[k], prev, nxt)
        if c is None:
            return None, []
        return c, [j for j, o in enumerate(example.objects) if o.label == c]


def _image_ids(image_dir: Path) -> Iterable[int]:
    for p in image_dir.glob("*.jpg"):
        if p.stem.isdigit():
            yield int(p.stem)
