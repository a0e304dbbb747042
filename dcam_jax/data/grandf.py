"""GranDf (GLaMM's grounded conversation data), human-annotated split, with RLE object masks.

The annotation file (``GranDf_HA_GCG_{split}.json``) is a JSON list; each entry describes one image::

    {"file_name": "sa_1234.jpg", "height": 1500, "width": 2250, "caption": "A man rides a horse ...",
     "groundings": {"A man": {"token_positives": [0, 5], "rle_masks": [{"size": [h, w], "counts": "..."}, ...]},
                    "a horse": {...}, ...}}

Object k (in the order of ``groundings``) gets label k + 1. Searched locations, for ``root`` and ``split``:

- annotations: ``root/{split}/GranDf_HA_GCG_{split}.json`` (the authors' path),
  ``root/annotations/{split}/GranDf_HA_GCG_{split}.json`` (GLaMM's release), ``root/GranDf_HA_GCG_{split}.json``;
- images: ``root/GranDf_HA_images/{split}/``, ``root/images/{split}/``, ``root/images/``.

Differences from the Diffusion-CAM authors' reader (reference/diffusion_cam_reference.md section 5.1):

- The authors decode only the **first** RLE of each grounding; an object annotated in several pieces loses the
  others. We decode **all** of them and take their union (``first_rle_only=True`` reproduces the quirk).
- They merge objects into one label map with an elementwise maximum, so where objects overlap the later one
  wins. We build ``label_map`` the same way (it is what their ``max`` Obj-IoU sees), but every object also keeps
  its own full mask (:class:`~dcam_jax.data.coco.GroundedObject`), which the ``matched`` Obj-IoU uses.
- They evaluate the first 10 annotations of the *train* split; take ``start`` / count in the harness instead.
- Their prompt is "Describe what you see in this image. Focus on {first grounding}."; the example's ``focus``
  field holds that phrase.
- A missing or broken image makes their code skip the image silently. Here an entry whose image file is missing
  is left out up front and listed in ``dataset.skipped``; an undecodable image or mask raises
  :class:`~dcam_jax.data.coco.SkipImage` at read time so the caller counts it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from dcam_jax.data.coco import (GroundedExample, GroundedObject, SkipImage, normalize_word, read_rgb,
                                singular)

# Words of a grounded phrase that never identify its object.
_STOP = frozenset("a an the of in on at to with and or its their his her this that these those some".split())


def _require_pycocotools():
    try:
        from pycocotools import mask as mask_utils
    except ImportError as e:
        raise ImportError("reading GranDf RLE masks needs pycocotools: install dcam_jax with the 'vision' extra "
                          "(pip install -e '.[vision]')") from e
    return mask_utils


def decode_rles(rles: Sequence[dict], height: int, width: int, *, first_only: bool = False,
                where: str = "rle_masks") -> np.ndarray:
    """Union of COCO RLE masks. rles: non-empty list of ``{"size": [h, w], "counts": str | bytes | list}``
    (compressed or uncompressed RLE). Returns [height, width] bool.

    first_only: decode only ``rles[0]`` (the Diffusion-CAM authors' behaviour; see the module docstring).
    Raises ValueError naming ``where`` for an empty list, a malformed RLE or a size that is not (height, width).
    """
    mask_utils = _require_pycocotools()
    if not isinstance(rles, (list, tuple)) or not rles:
        raise ValueError(f"{where}: expected a non-empty list of RLE dicts, got {rles!r:.80}")
    out = np.zeros((height, width), bool)
    for j, rle in enumerate(rles[:1] if first_only else rles):
        if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
            raise ValueError(f"{where}[{j}]: expected an RLE dict with 'size' and 'counts'")
        size = [int(v) for v in rle["size"]]
        if size != [height, width]:
            raise ValueError(f"{where}[{j}]: RLE size {size} differs from the image size {[height, width]}")
        if isinstance(rle["counts"], list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(rle, height, width)
        m = np.asarray(mask_utils.decode(rle))
        if m.ndim == 3:
            m = m[..., 0]
        out |= m.astype(bool)
    return out


def phrase_words(phrase: str) -> frozenset[str]:
    """The identifying words of a grounded phrase, lower-case singular (``"Two brown dogs" -> {"two", "brown",
    "dog"}``), without articles and prepositions."""
    words = (singular(normalize_word(w)) for w in phrase.split())
    return frozenset(w for w in words if w and w not in _STOP)


class GranDf:
    """GranDf human-annotated GCG entries with all-RLE object masks (see the module docstring).

    Args:
      root: the GranDf directory.
      split: "train", "val" or "test" (the authors used train).
      annotations: explicit annotation file (overrides the search); images_dir: explicit image directory.
      first_rle_only: reproduce the authors' first-RLE-only decoding.

    Attributes:
      entries: the usable annotation entries, in file order. skipped: [(example id, reason)] entries left out
      up front (image file missing, no groundings).
    """

    def __init__(self, root, *, split: str = "train", annotations=None, images_dir=None,
                 first_rle_only: bool = False):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"GranDf data directory {self.root} does not exist; pass --data_dir=DIR")
        self.split = split
        self.first_rle_only = bool(first_rle_only)
        if annotations is not None:
            ann = Path(annotations)
            if not ann.is_file():
                raise FileNotFoundError(f"GranDf annotation file {ann} does not exist")
        else:
            name = f"GranDf_HA_GCG_{split}.json"
            cands = [self.root / split / name, self.root / "annotations" / split / name, self.root / name]
            ann = next((c for c in cands if c.is_file()), None)
            if ann is None:
                raise FileNotFoundError(f"no GranDf annotation file for split {split!r}; looked for "
                                        f"{', '.join(str(c) for c in cands)}")
        if images_dir is not None:
            img_dir = Path(images_dir)
            if not img_dir.is_dir():
                raise FileNotFoundError(f"GranDf image directory {img_dir} does not exist")
        else:
            cands = [self.root / "GranDf_HA_images" / split, self.root / "images" / split, self.root / "images"]
            img_dir = next((c for c in cands if c.is_dir()), None)
            if img_dir is None:
                raise FileNotFoundError(f"no GranDf image directory for split {split!r}; looked for "
                                        f"{', '.join(str(c) for c in cands)}")
        self.annotation_file, self.image_dir = ann, img_dir
        try:
            data = json.loads(ann.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"GranDf annotation file {ann} is not valid JSON ({e})") from None
        if not isinstance(data, list):
            raise ValueError(f"{ann}: expected a JSON list of GCG entries (file_name, height, width, caption, "
                             f"groundings), got a {type(data).__name__}")
        self.entries: list[dict[str, Any]] = []
        self.skipped: list[tuple[str, str]] = []
        for n, e in enumerate(data):
            missing = [k for k in ("file_name", "height", "width", "groundings") if k not in e]
            if missing:
                raise ValueError(f"{ann}: entry {n} lacks the fields {missing}")
            eid = self.example_id(e)
            if not isinstance(e["groundings"], dict) or not e["groundings"]:
                self.skipped.append((eid, "entry has no groundings"))
            elif not (img_dir / e["file_name"]).is_file():
                self.skipped.append((eid, f"image file {img_dir / e['file_name']} is missing"))
            else:
                self.entries.append(e)
        if not self.entries:
            raise ValueError(f"none of the {len(data)} GranDf entries in {ann} is usable (skipped: "
                             f"{self.skipped[:3]}...)")

    @staticmethod
    def example_id(entry: dict) -> str:
        """``"grandf-" + file stem`` of an annotation entry."""
        return "grandf-" + Path(str(entry["file_name"])).stem

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> GroundedExample:
        """The ``index``-th usable entry. Raises :class:`~dcam_jax.data.coco.SkipImage` for an undecodable image
        or RLE, or an image whose size differs from the annotation."""
        e = self.entries[index]
        eid = self.example_id(e)
        path = self.image_dir / e["file_name"]
        image = read_rgb(path, eid)
        h, w = int(e["height"]), int(e["width"])
        if image.shape[:2] != (h, w):
            raise SkipImage(eid, f"image {path} is {image.shape[1]}x{image.shape[0]} but the annotation says "
                                 f"{w}x{h}")
        objects = []
        label_map = np.zeros((h, w), np.int32)
        for k, (phrase, g) in enumerate(e["groundings"].items()):
            try:
                mask = decode_rles(g.get("rle_masks"), h, w, first_only=self.first_rle_only,
                                   where=f"{eid} grounding {phrase!r} rle_masks")
            except ValueError as err:
                raise SkipImage(eid, str(err)) from None
            objects.append(GroundedObject(k + 1, str(phrase), mask))
            # the authors' merge: elementwise maximum, so overlapping pixels take the larger label
            label_map = np.maximum(label_map, mask.astype(np.int32) * (k + 1))
        if not label_map.any():
            raise SkipImage(eid, "all grounding masks are empty")
        return GroundedExample(example_id=eid, image=image, label_map=label_map, objects=tuple(objects),
                               captions=(str(e.get("caption", "")),) if e.get("caption") else (),
                               focus=str(next(iter(e["groundings"]))), source=str(path))

    @staticmethod
    def objects_for_word(example: GroundedExample, word: str) -> list[int]:
        """Indices into ``example.objects`` whose phrase contains ``word`` (singular, case-insensitive)."""
        w = singular(normalize_word(word))
        if not w or w in _STOP:
            return []
        return [j for j, o in enumerate(example.objects) if w in phrase_words(o.name)]


def default_prompt(focus: Optional[str]) -> str:
    """The authors' GranDf prompt for an example whose first grounding is ``focus``."""
    base = "Describe what you see in this image."
    return f"{base} Focus on {focus}." if focus else base
