"""ShapesWorld: a procedural, exactly-labelled image-caption world (SPEC section 7).

Every example is a small RGB image with 1 to 4 flat-coloured objects (shape x colour x size),
drawn without anti-aliasing so that each object's mask is exactly the set of pixels painted with
its colours, a caption that names every object from a small closed vocabulary, and the alignment
from caption words to objects. Everything is a pure function of ``(seed, config)``.

Geometry conventions
--------------------
* Pixel ``(row i, col j)`` covers ``[i, i+1) x [j, j+1)`` in continuous image coordinates; shape
  membership is decided at the pixel centre ``(i + 0.5, j + 0.5)``.
* Points and centres are ``(y, x)`` = (row, column) in those continuous coordinates.
* An object is drawn around its ``centre`` with a nominal ``radius`` r (the circle's radius; the
  other shapes are scaled to look about as large). Its outline fits in a disc of radius
  ``SHAPE_EXTENT[shape] * r`` around the centre, and objects are placed fully inside the image.

Caption grammar (deterministic)
-------------------------------
Objects are listed in *caption order*: left to right by centre x (ties: top to bottom), or a
seeded random order when ``config.caption_order == "random"``. Object index k everywhere
(masks, label map value k+1, attributes) is the k-th object of the caption. Each object is named
``a [size] colour shape``. With ``relations=True`` objects are grouped in consecutive pairs
(0, 1), (2, 3); a pair is joined by the relation of its first object to its second, a lone last
object stands alone, and groups are joined by ``and``::

    a red circle
    a red circle above a blue square
    a green triangle left of a yellow star and a white cross
    a green triangle left of a yellow star and a white cross below a blue diamond

The relation of object i to object j uses centres: if ``|dy| > |dx|`` it is ``above`` (i has the
smaller y) or ``below``, otherwise ``left of`` (i has the smaller x) or ``right of``. With the
default left-to-right order ``right of`` cannot occur; the random order produces it. Layouts with
a related pair near a diagonal (``config.relation_margin_deg``) are redrawn, so that the relation
word is never a coin flip between two apt ones.

Word classes (for evaluation): colour, shape and size words name one object; ``above``,
``below``, ``left``, ``right`` and ``of`` are ``relation`` words (``of`` is a preposition, which
TAM's Func-IoU does not count as a function word); ``a`` and ``and`` are ``function`` words.

Splits
------
``split_seed(split, index)`` maps each split to its own disjoint range of 2**40 seeds, so the
train, validation and test splits can never share an example seed.
"""

from __future__ import annotations

from dcam_jax.data.shapes.vocab import BACKGROUNDS, COLOURS, COLOUR_NAMES, FUNCTION_WORDS, GENERATOR_VERSION, LETTERBOX_FILL, MIN_CONTRAST, RELATION_PHRASES, RELATION_WORDS, SHAPES, SHAPE_EXTENT, SHAPE_INSCRIBED, SIZE_WORDS, SPLITS, SPLIT_SIZE, TEXTURES, TONES, TONE_NAMES, VOCABULARY, WORD_CLASS, WORD_CLASSES, allowed_colours, vocabulary, word_class  # noqa: F401
from dcam_jax.data.shapes.config import PRESETS, ShapesConfig, preset  # noqa: F401
from dcam_jax.data.shapes.raster import shape_mask, shape_polygon  # noqa: F401
from dcam_jax.data.shapes.example import Example, attribute_mask  # noqa: F401
from dcam_jax.data.shapes.caption import is_well_formed, match_phrases, max_caption_words, parse_caption  # noqa: F401
from dcam_jax.data.shapes.render import BACKGROUND_TRIES  # noqa: F401
from dcam_jax.data.shapes.layout import LAYOUT_TRIES  # noqa: F401
from dcam_jax.data.shapes.dataset import Batch, batch, collate, image_grid, iterate, make_example, split_of_seed, split_seed  # noqa: F401
