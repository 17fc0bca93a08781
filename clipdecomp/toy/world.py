"""A procedurally generated "shapes world": 64x64 scenes of coloured shapes on textured grounds.

Every image comes with a caption, the pixel mask of each object and all its attributes as labels,
so that what a CLIP trained on it has learned can be checked against ground truth. NumPy only;
everything is drawn with vectorised masks over coordinate grids. :func:`generate` makes a few
thousand scenes per second on one core, captions, masks and labels included (about 3,000 to
5,000 at batch sizes 16 to 1024 on a shared 2-core AMD EPYC; ``benchmarks/bench_world.py``).
A given seed always gives the same scenes, pixel for pixel.

Shapes: B images, K = 3 object slots, S = 64 image side.
"""
from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

IMAGE_SIZE = 64
MAX_OBJECTS = 3

SHAPES: list[str] = ["circle", "square", "triangle", "star", "cross", "heart", "diamond", "hexagon"]
COLORS: list[str] = [
    "red", "green", "blue", "yellow", "purple", "orange", "white", "black", "pink",
]
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (40, 180, 50),
    "blue": (30, 60, 225),
    "yellow": (245, 225, 30),
    "purple": (140, 40, 185),
    "orange": (250, 140, 20),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
    "pink": (250, 135, 195),
}
SIZES: list[str] = ["small", "large"]
POSITIONS: list[str] = [
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
]
BACKGROUNDS: list[str] = ["water", "grass", "sand", "sky", "brick", "wood"]
COUNTS: list[str] = ["one", "two", "three"]

ATTRIBUTES: dict[str, list[str]] = {
    "shape": SHAPES,
    "color": COLORS,
    "size": SIZES,
    "position": POSITIONS,
    "background": BACKGROUNDS,
    "count": COUNTS,
}

# Zero-shot prompt templates per attribute; "{}" is the class name.
TEMPLATES: dict[str, list[str]] = {
    "shape": ["a photo of a {}.", "a {}.", "a picture of a {} shape."],
    "color": ["a photo of a {} object.", "something {}.", "a {} shape."],
    "size": ["a photo of a {} object.", "a {} shape."],
    "position": ["a photo of an object in the {}.", "a shape in the {}."],
    "background": ["a photo of an object on {}.", "a shape on {}.", "something on {}."],
    "count": ["a photo of {} objects.", "{} shapes."],
}
COUNT_PROMPT_NAMES = {"one": "one", "two": "two", "three": "three"}

# Names of the spurious split's classes (see spurious_split): a word for a kind of object that
# is defined by its shape but, in the captions, only ever seen on one ground.
SPURIOUS_NAMES = {"circle": "buoy", "square": "crate"}

# Caption vocabulary: phrasing variants used by the caption generator.
_SIZE_WORDS = {"small": ["small", "little", "tiny"], "large": ["large", "big"]}
_POSITION_WORDS = {p: [p] for p in POSITIONS}
_POSITION_WORDS["center"] = ["center", "middle"]
_POSITION_PREP = ["in the", "at the"]
_BACKGROUND_WORDS = {
    "water": ["water", "the water", "the sea"],
    "grass": ["grass", "the grass", "a lawn"],
    "sand": ["sand", "the sand", "a beach"],
    "sky": ["sky", "the sky", "a blue sky"],
    "brick": ["brick", "a brick wall", "bricks"],
    "wood": ["wood", "a wooden floor", "wooden planks"],
}
_BG_PREP = ["on", "over", "in front of", "against"]
_BG_SUFFIX = ["with a {} background", "on a {} background"]
_OPENERS_ONE = ["", "", "a photo of ", "an image of ", "a picture of ", "a drawing of "]
_OPENERS_MANY = ["", "a photo of ", "an image of ", "a scene with "]
_COUNT_HEADS = ["{} objects:", "{} shapes:", "a photo of {} objects:"]

_WORD_RE = re.compile(r"\w+|[^\w\s]+")


@dataclass
class ShapesBatch:
    """A batch of generated scenes.

    Attributes
    ----------
    images : uint8 [B, 64, 64, 3]
    captions : list of B str
    masks : list of B bool arrays [n_obj, 64, 64]; full silhouette of each object, in drawing
        order (later objects are drawn over earlier ones)
    foreground : bool [B, 64, 64]; union of the masks
    labels : dict of arrays. ``n_objects`` int [B], ``background`` int [B] (index into
        BACKGROUNDS), ``shape`` / ``color`` / ``size`` / ``position`` int [B, 3] (index into the
        attribute list, -1 for empty slots), ``center`` float [B, 3, 2] (y, x in pixels) and
        ``radius`` float [B, 3] (NaN for empty slots), ``mentions_background`` /
        ``mentions_count`` bool [B] and ``mentions_shape`` / ``mentions_color`` /
        ``mentions_size`` / ``mentions_position`` bool [B, 3] (what the caption states), and
        for :func:`spurious_split` also ``y`` (class), ``place`` (0 = first background) and
        ``group`` (= 2 * y + place).
    """

    images: np.ndarray
    captions: list[str]
    masks: list[np.ndarray]
    foreground: np.ndarray
    labels: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.captions)

    def object_masks(self) -> np.ndarray:
        """Masks padded to ``MAX_OBJECTS`` slots: bool [B, 3, 64, 64].

        Examples
        --------
        >>> generate(2, seed=0).object_masks().shape
        (2, 3, 64, 64)
        """
        out = np.zeros((len(self), MAX_OBJECTS) + self.foreground.shape[1:], bool)
        for i, m in enumerate(self.masks):
            out[i, : len(m)] = m
        return out


def n_tokens(text: str) -> int:
    """Number of word-level tokens of ``text`` (words and punctuation runs), without specials.

    Examples
    --------
    >>> n_tokens("a red star, on grass.")
    7
    """
    return len(_WORD_RE.findall(text.lower()))


def vocabulary() -> list[str]:
    """Every word the captions and the zero-shot prompts can contain, sorted.

    Examples
    --------
    >>> "star" in vocabulary()
    True
    """
    texts: list[str] = []
    texts += SHAPES + COLORS + SIZES + POSITIONS + BACKGROUNDS + COUNTS
    texts += list(SPURIOUS_NAMES.values())
    for ws in list(_SIZE_WORDS.values()) + list(_POSITION_WORDS.values()):
        texts += ws
    for ws in _BACKGROUND_WORDS.values():
        texts += ws
    texts += _POSITION_PREP + _BG_PREP + _BG_SUFFIX + _OPENERS_ONE + _OPENERS_MANY + _COUNT_HEADS
    texts += [t for ts in TEMPLATES.values() for t in ts]
    texts += ["and", ",", ".", ":", "a", "an", "the", "object", "objects", "shape", "shapes",
              "something", "scene", "with", "one", "there", "is", "are", "of", "{}"]
    words = set()
    for t in texts:
        words.update(w for w in _WORD_RE.findall(t.lower()) if w not in ("{", "}", "{}"))
    return sorted(words)


def prompts(attribute: str) -> tuple[list[str], list[list[str]]]:
    """Zero-shot prompts for one attribute.

    Parameters
    ----------
    attribute : one of ``ATTRIBUTES`` ("shape", "color", "size", "position", "background",
        "count")

    Returns
    -------
    classnames : list of C str
    texts : C lists of prompts (one per template)

    Examples
    --------
    >>> names, texts = prompts("shape")
    >>> texts[0][0]
    'a photo of a circle.'
    """
    names = ATTRIBUTES[attribute]
    return list(names), [[t.format(c) for t in TEMPLATES[attribute]] for c in names]


# ---------------------------------------------------------------------------------------------
# Backgrounds. Each is a generator: it draws its random numbers for a batch of k images, then
# yields the images in blocks of k' of them, uint8 [k', S, S, 3] (one buffer, reused: copy a
# block before taking the next). A block is filled one colour channel at a time: [k', S, S]
# planes keep NumPy's inner loops long (a trailing axis of 3 makes them slow), and small blocks
# keep the float64 temporaries under malloc's mmap threshold (128 KiB by default), so they are
# recycled instead of being mapped, page-faulted and unmapped again each time (which cost more
# than the arithmetic). The arithmetic, dtypes and order of operations of each pixel, and the
# order of the random draws, are fixed: the shipped model was trained on exactly these images.

_BLOCK_PIXELS = 16384  # pixels per block: float64 temporaries of 128 KiB (4 images at S = 64)
_Blocks = Iterator[tuple[slice, np.ndarray]]


def _axes(s: int) -> tuple[np.ndarray, np.ndarray]:
    """Row coordinates [S, 1] and column coordinates [1, S] (broadcast to the grid)."""
    a = np.arange(s, dtype=np.float32)
    return a[:, None], a[None, :]


def _blocks(k: int, s: int) -> _Blocks:
    """Slices of k' images (k' S^2 <= _BLOCK_PIXELS, k' >= 1) and a uint8 [k', S, S, 3] buffer
    to fill for each."""
    step = max(1, _BLOCK_PIXELS // (s * s))
    buf = np.empty((min(k, step), s, s, 3), np.uint8)
    for a in range(0, k, step):
        b = slice(a, min(a + step, k))
        yield b, buf[: b.stop - a]


def _store(out: np.ndarray, c: int, v: np.ndarray) -> None:
    """out[..., c] = uint8(clip(v, 0, 255)) for float64 v [k', S, S] (truncating, as astype)."""
    np.clip(v, 0, 255, out=v)
    out[..., c] = v


def _base(rng: np.random.Generator, k: int, rgb: tuple[int, int, int], spread: float
          ) -> np.ndarray:
    """Per-image base colour, float64 [k, 3, 1, 1]: float32 rgb + uniform(-spread, spread)."""
    b = np.array(rgb, np.float32) + rng.uniform(-spread, spread, (k, 1, 1, 3))
    return b.reshape(k, 3, 1, 1)


def _bg_water(rng: np.random.Generator, k: int, s: int) -> _Blocks:
    y, x = _axes(s)
    f = rng.uniform(0.35, 0.6, (k, 1, 1)).astype(np.float32)
    g = rng.uniform(0.08, 0.2, (k, 1, 1)).astype(np.float32)
    ph = rng.uniform(0, 2 * np.pi, (k, 2, 1, 1)).astype(np.float32)
    base = _base(rng, k, (35, 90, 175), 15)
    amp = np.array([18, 25, 30], np.float32)
    for b, out in _blocks(k, s):
        w = np.sin(y * f[b] + 2.5 * np.sin(x * g[b] + ph[b, 0]) + ph[b, 1])  # float32 [k', S, S]
        crest = w > 0.85  # crests are lighter: +60, +60, +50
        lift = {60: crest * 60.0, 50: crest * 50.0}
        for c, add in enumerate((60, 60, 50)):
            v = base[b, c] + w * amp[c]  # float64 + float32 product
            v += lift[add]
            _store(out, c, v)
        yield b, out


def _bg_grass(rng: np.random.Generator, k: int, s: int) -> _Blocks:
    noise = rng.uniform(-1, 1, (k, s + 5, s)).astype(np.float32)
    base = _base(rng, k, (60, 140, 45), 15)
    amp = np.array([55, 80, 35], np.float32)
    for b, out in _blocks(k, s):
        strokes = sum(noise[b, i : i + s] for i in range(6)) / 6.0  # vertical smear: blades
        for c in range(3):
            _store(out, c, base[b, c] + strokes * amp[c])
        yield b, out


def _bg_sand(rng: np.random.Generator, k: int, s: int) -> _Blocks:
    base = _base(rng, k, (220, 198, 150), 12)
    speck = rng.uniform(-14, 14, (k, s, s)).astype(np.float32)
    for b, out in _blocks(k, s):
        dark = (rng.random((len(out), s, s)) < 0.04) * -55.0  # dark grains; the last draw
        grain = speck[b].astype(np.float64)  # exact; once instead of in each channel's sum
        for c in range(3):
            v = base[b, c] + grain
            v += dark
            _store(out, c, v)
        yield b, out


def _bg_sky(rng: np.random.Generator, k: int, s: int) -> _Blocks:
    y, x = _axes(s)
    t = y / (s - 1)  # float32 [S, 1]: top to bottom
    top = np.array([95, 160, 230], np.float32)
    bottom = np.array([180, 215, 245], np.float32)
    gradient = top + (bottom - top) * t  # float32 [S, 3]
    tint = rng.uniform(-10, 10, (k, 3))
    n_cloud = 4
    cy = rng.uniform(0, s, (k, n_cloud, 1, 1)).astype(np.float32)
    cx = rng.uniform(0, s, (k, n_cloud, 1, 1)).astype(np.float32)
    sy = rng.uniform(3, 6, (k, n_cloud, 1, 1)).astype(np.float32)
    sx = sy * rng.uniform(1.5, 2.5, (k, n_cloud, 1, 1)).astype(np.float32)
    on = (rng.random((k, n_cloud, 1, 1)) < 0.7).astype(np.float32)  # 0 or 1
    for b, out in _blocks(k, s):
        # Gaussian blobs: the exponent is separable, its exp is taken on the full grid. Summed
        # cloud by cloud, in order, as a sum over the cloud axis does
        ey = -(((y - cy[b]) / sy[b]) ** 2)  # [k', 4, S, 1]
        ex = ((x - cx[b]) / sx[b]) ** 2  # [k', 4, 1, S]
        cloud = on[b, 0] * np.exp(ey[:, 0] - ex[:, 0])  # float32 [k', S, S]
        for j in range(1, n_cloud):
            cloud += on[b, j] * np.exp(ey[:, j] - ex[:, j])
        cloud = np.minimum(cloud, 1.0)
        keep = (1 - cloud).astype(np.float64)  # float32 values, widened once (exactly)
        white = (np.float32(248) * cloud).astype(np.float64)
        for c in range(3):
            sky = gradient[:, c : c + 1] + tint[b, c, None, None]  # float64 [k', S, 1]
            v = sky * keep
            v += white
            _store(out, c, v)
        yield b, out


def _bg_brick(rng: np.random.Generator, k: int, s: int) -> _Blocks:
    a = np.arange(s, dtype=np.int32)
    oy = rng.integers(0, 8, (k, 1, 1)).astype(np.int32)
    ox = rng.integers(0, 16, (k, 1, 1)).astype(np.int32)
    shade = rng.uniform(-20, 20, (k, 16)).astype(np.float32)
    base = _base(rng, k, (155, 62, 42), 12)
    for b, out in _blocks(k, s):
        yy = a[:, None] + oy[b]  # [k', S, 1]
        row = yy // 8
        xx = a + ox[b] + (row % 2) * 8  # [k', S, S]: odd rows of bricks shifted by half a brick
        mortar = ((yy % 8) == 0) | ((xx % 16) == 0)
        brick_id = (row * 7 + xx // 16) % 16
        brick_id += 16 * np.arange(len(out), dtype=np.int32)[:, None, None]  # into shade[b]
        tone = np.take(shade[b], brick_id).astype(np.float64)  # float32 values [k', S, S]
        grit = rng.uniform(-8, 8, (len(out), s, s))  # the last draw
        for c in range(3):
            v = base[b, c] + tone
            v += grit
            _store(out, c, np.where(mortar, 195.0, v))
        yield b, out


def _bg_wood(rng: np.random.Generator, k: int, s: int) -> _Blocks:
    y, x = _axes(s)
    freq = rng.uniform(0.5, 0.9, (k, 1, 1)).astype(np.float32)
    ph = rng.uniform(0, 2 * np.pi, (k, 2, 1, 1)).astype(np.float32)
    warp = 3.0 * np.sin(y * 0.09 + ph[:, 0]) + 1.5 * np.sin(y * 0.23 + ph[:, 1])
    base = _base(rng, k, (150, 95, 50), 15)
    amp = np.array([22, 15, 9], np.float32)
    for b, out in _blocks(k, s):
        xw = x + warp[b]
        grain = np.sin(xw * freq[b]) + 0.5 * np.sin(xw * freq[b] * 2.7)  # float32 [k', S, S]
        for c in range(3):
            _store(out, c, base[b, c] + grain * amp[c])
        yield b, out


_BG_DRAW = {
    "water": _bg_water, "grass": _bg_grass, "sand": _bg_sand,
    "sky": _bg_sky, "brick": _bg_brick, "wood": _bg_wood,
}


#: the mean colour of each kind of ground, shared by both styles
GROUND_RGB: dict[str, tuple[int, int, int]] = {
    "water": (35, 90, 175), "grass": (60, 140, 45), "sand": (220, 198, 150),
    "sky": (135, 185, 235), "brick": (158, 58, 40), "wood": (172, 122, 66),
}


def _bg_smooth(rng: np.random.Generator, k: int, s: int, rgb: tuple[int, int, int]) -> _Blocks:
    """A smooth ground: flat colour (jitter +-15), a gentle gradient (up to +-14 across the image
    in a random direction) and one faint wave (amplitude 5)."""
    y, x = _axes(s)
    base = _base(rng, k, rgb, 15)
    angle = rng.uniform(0, 2 * np.pi, (k, 1, 1)).astype(np.float32)
    slope = rng.uniform(4, 14, (k, 1, 1)).astype(np.float32)
    freq = rng.uniform(0.08, 0.2, (k, 1, 1)).astype(np.float32)
    ph = rng.uniform(0, 2 * np.pi, (k, 1, 1)).astype(np.float32)
    u = (y - (s - 1) / 2) / s  # [S, 1], in [-0.5, 0.5]
    v = (x - (s - 1) / 2) / s
    for b, out in _blocks(k, s):
        along = u * np.sin(angle[b]) + v * np.cos(angle[b])  # float32 [k', S, S]
        shade = 2 * slope[b] * along + 5 * np.sin(along * s * freq[b] + ph[b])
        for c in range(3):
            _store(out, c, base[b, c] + shade.astype(np.float64))
        yield b, out


def draw_backgrounds(kinds: np.ndarray, rng: np.random.Generator, size: int = IMAGE_SIZE,
                     style: str = "smooth") -> np.ndarray:
    """Draw the grounds of a batch.

    Parameters
    ----------
    kinds : int [B], indices into ``BACKGROUNDS``
    rng : numpy Generator
    size : image side S
    style : a key of ``STYLES``: textured or smooth grounds

    Returns
    -------
    uint8 [B, S, S, 3]

    Examples
    --------
    >>> draw_backgrounds(np.array([0, 1]), np.random.default_rng(0)).shape
    (2, 64, 64, 3)
    """
    smooth = _style(style).grounds == "smooth"
    kinds = np.asarray(kinds)
    out = np.empty((len(kinds), size, size, 3), np.uint8)
    for b, name in enumerate(BACKGROUNDS):
        idx = np.flatnonzero(kinds == b)
        if len(idx) == 0:
            continue
        blocks = (_bg_smooth(rng, len(idx), size, GROUND_RGB[name]) if smooth
                  else _BG_DRAW[name](rng, len(idx), size))
        for part, block in blocks:
            out[idx[part]] = block
    return out


# ---------------------------------------------------------------------------------------------
# Shapes: boolean masks over a coordinate grid.

def shape_mask(shape: str, cy: float, cx: float, r: float, size: int = IMAGE_SIZE) -> np.ndarray:
    """Silhouette of one shape.

    Parameters
    ----------
    shape : one of ``SHAPES``
    cy, cx : centre in pixels
    r : radius in pixels (half the extent)
    size : image side S

    Returns
    -------
    bool [S, S]

    Examples
    --------
    >>> int(shape_mask("square", 32, 32, 10).sum()) > 0
    True
    """
    out = np.zeros((size, size), bool)
    # every shape lies within radius r of its centre: evaluate on that window only
    y0, y1 = max(0, int(cy - r) - 2), min(size, int(cy + r) + 3)
    x0, x1 = max(0, int(cx - r) - 2), min(size, int(cx + r) + 3)
    if y0 < y1 and x0 < x1:
        y = np.arange(y0, y1, dtype=np.float32)[:, None]
        x = np.arange(x0, x1, dtype=np.float32)[None, :]
        out[y0:y1, x0:x1] = _shape_window(shape, (y + 0.5 - cy) / r, (x + 0.5 - cx) / r)
    elif shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return out


def _shape_window(shape: str, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """Shape test on normalised offsets (broadcasting [h, 1] and [1, w]); shape r = 1."""
    # contiguous copies: NumPy is several times slower on stride-0 broadcast views
    full = np.broadcast_shapes(dy.shape, dx.shape)
    dy, dx = np.broadcast_to(dy, full).copy(), np.broadcast_to(dx, full).copy()
    ax, ay = np.abs(dx), np.abs(dy)
    if shape == "circle":
        return dx * dx + dy * dy <= 1.0
    if shape == "square":
        return np.maximum(ax, ay) <= 0.85
    if shape == "diamond":
        return ax + ay <= 1.0
    if shape == "triangle":  # apex up at dy = -1, base at dy = 0.8
        return (dy <= 0.8) & (ax <= 1.0 * (dy + 1.0) / 1.8)
    if shape == "hexagon":  # flat top, circumradius 1
        h = np.sqrt(3.0) / 2
        return (ay <= h) & (np.sqrt(3.0) * ax + ay <= np.sqrt(3.0))
    if shape == "cross":
        w = 0.34
        return ((ax <= w) & (ay <= 1.0)) | ((ay <= w) & (ax <= 1.0))
    if shape == "star":  # five points, one pointing up: rho <= 0.42 + 0.58 * tri**1.5
        rho = np.sqrt(dx * dx + dy * dy)
        # the bound lies in [0.42, 1] (tri in [0, 1]): only the ring between needs the angle
        out = rho <= 0.42
        ring = ~out & (rho <= 1.0)
        theta = np.arctan2(dx[ring], -dy[ring])  # 0 at the top
        t = (theta * 5 / (2 * np.pi)) % 1.0
        tri = np.abs(t - 0.5) * 2  # 1 at the points, 0 between them
        out[ring] = rho[ring] <= 0.42 + 0.58 * tri**1.5
        return out
    if shape == "heart":  # (u^2 + v^2 - 1)^3 - u^2 v^3 <= 0
        u = dx * 1.15
        v = -(dy * 1.15) + 0.15
        a = u * u + v * v - 1
        # the terms' signs decide where a <= 0 <= v (inside) or v < 0 < a (outside; a > 0 is
        # at least one ulp of 1, its cube does not underflow): the powers only elsewhere
        out = (a <= 0) & (v >= 0)
        rest = np.flatnonzero((a <= 0) == (v < 0))
        a, u, v = a.ravel()[rest], u.ravel()[rest], v.ravel()[rest]
        out.ravel()[rest] = a**3 - u * u * v**3 <= 0
        return out
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


_RADIUS = {"small": (5.0, 6.5), "large": (8.5, 10.0)}


@dataclass(frozen=True)
class WorldStyle:
    """How a world draws its scenes (everything else, the random draws included, is shared).

    Attributes
    ----------
    grounds : "textured" (waves, blades, grains, bricks, planks, clouds) or "smooth" (each kind
        a flat colour with jitter, a gentle gradient and one faint wave)
    radius : per size name, the (low, high) range of an object's radius in pixels at S = 64
    grid : centre of the three grid rows (and columns) as fractions of the image side
    p_size, p_position : chance that a full caption states an object's size / position, for
        scenes of one object and of several
    """

    grounds: str
    radius: dict
    grid: tuple[float, float, float]
    p_size: tuple[float, float]
    p_position: tuple[float, float]


#: "textured": the world of the first shipped model; "smooth": flat grounds, objects two to
#: four patches wide, grid cells pulled inwards, positions named in most captions. A ViT with
#: 8-pixel patches learns shapes on the second far sooner (benchmarks/SHAPE_LEARNING.md).
STYLES: dict[str, WorldStyle] = {
    "textured": WorldStyle("textured", _RADIUS, (1 / 6, 0.5, 5 / 6), (0.5, 0.35), (0.5, 0.35)),
    "smooth": WorldStyle("smooth", {"small": (8.0, 10.0), "large": (12.5, 15.0)},
                         (0.21, 0.5, 0.79), (0.5, 0.35), (0.85, 0.6)),
}


def _style(style: str) -> WorldStyle:
    if style not in STYLES:
        raise ValueError(f"unknown world style {style!r}; expected one of {sorted(STYLES)}")
    return STYLES[style]


def _windows(cy: np.ndarray, cx: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, ...]:
    """Unclipped windows [y0, y1) x [x0, x1) (int [m] each) of :func:`shape_mask`."""
    return ((cy - r).astype(np.int64) - 2, (cy + r).astype(np.int64) + 3,  # as int(): truncate
            (cx - r).astype(np.int64) - 2, (cx + r).astype(np.int64) + 3)


def _shape_windows(shape: str, cy: np.ndarray, cx: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Silhouettes of m objects of one shape on their windows: bool [m, h, w].

    Object t covers rows ``y0[t] + arange(h)`` and columns ``x0[t] + arange(w)`` (see
    :func:`_windows`; h and w are the largest window sides). Every pixel is tested on the same
    float64 coordinates, hence with the same result, as :func:`shape_mask` with float64 inputs.
    """
    y0, y1, x0, x1 = _windows(cy, cx, r)
    h, w = int((y1 - y0).max()), int((x1 - x0).max())
    dy = (y0[:, None] + np.arange(h) + 0.5 - cy[:, None]) / r[:, None]  # float64 [m, h]
    dx = (x0[:, None] + np.arange(w) + 0.5 - cx[:, None]) / r[:, None]  # float64 [m, w]
    return _shape_window(shape, dy[:, :, None], dx[:, None, :])


# ---------------------------------------------------------------------------------------------
# Captions.

def _choice(rng: np.random.Generator, xs: list[str]) -> str:
    return xs[int(rng.integers(len(xs)))]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _object_phrase(rng, shape, color, size, pos, with_size, with_pos) -> str:
    words = []
    if with_size:
        words.append(_choice(rng, _SIZE_WORDS[size]))
    words += [color, shape]
    text = " ".join(words)
    text = f"{_article(text)} {text}"
    if with_pos:
        text += f" {_choice(rng, _POSITION_PREP)} {_choice(rng, _POSITION_WORDS[pos])}"
    return text


def _background_phrase(rng, bg: str) -> str:
    if rng.random() < 0.25:
        return _choice(rng, _BG_SUFFIX).format(bg)
    return f"{_choice(rng, _BG_PREP)} {_choice(rng, _BACKGROUND_WORDS[bg])}"


def _join(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _partial_caption(rng, objs, bg) -> tuple[str, dict]:
    """A short caption stating one attribute, in the zero-shot prompt phrasing."""
    n = len(objs)
    kind = _choice(rng, ["shape", "color", "position", "background", "count", "size"])
    if kind in ("position", "size") and n > 1:
        kind = "count"
    _, _, size, pos = objs[0]
    m = {"bg": False, "count": False, "size": [False] * n, "pos": [False] * n,
         "shape": [False] * n, "color": [False] * n}
    if kind == "shape":
        m["shape"] = [True] * n
        names = _join([f"{_article(o[0])} {o[0]}" for o in objs])
        return f"a photo of {names}.", m
    if kind == "color":
        m["color"] = [True] * n
        names = _join([f"{_article(o[1])} {o[1]} object" for o in objs])
        return f"a photo of {names}.", m
    if kind == "size":
        m["size"][0] = True
        return f"a photo of {_article(size)} {size} object.", m
    if kind == "position":
        m["pos"][0] = True
        return f"a photo of an object in the {pos}.", m
    if kind == "background":
        m["bg"] = True
        return f"a photo of {'an object' if n == 1 else COUNTS[n - 1] + ' objects'} on {bg}.", m
    m["count"] = True
    return (f"a photo of {COUNTS[n - 1]} object{'s' if n > 1 else ''}.", m)


def make_caption(rng: np.random.Generator, objs: list[tuple[str, str, str, str]], bg: str,
                 max_tokens: int = 18, style: str = "smooth") -> tuple[str, dict]:
    """Describe a scene in one of several phrasings.

    Parameters
    ----------
    rng : numpy Generator
    objs : list of (shape, color, size, position) names, one per object
    bg : background name
    max_tokens : the caption is simplified until it has at most this many word tokens
    style : a key of ``STYLES``: how often sizes and positions are named

    Returns
    -------
    caption : str; always names every object's colour and shape, except for the short
        one-attribute captions
    mentions : dict with ``bg`` and ``count`` (bool) and ``shape`` / ``color`` / ``size`` /
        ``pos`` (list of bool per object): which attributes the caption states

    Examples
    --------
    >>> cap, m = make_caption(np.random.default_rng(0), [("star", "red", "small", "center")],
    ...                       "grass")
    >>> "red star" in cap
    True
    """
    if rng.random() < 0.2:
        return _partial_caption(rng, objs, bg)
    n = len(objs)
    st = _style(style)
    p_size = st.p_size[0] if n == 1 else st.p_size[1]
    p_pos = st.p_position[0] if n == 1 else st.p_position[1]
    with_size = [bool(rng.random() < p_size) for _ in objs]
    with_pos = [bool(rng.random() < p_pos) for _ in objs]
    with_bg = bool(rng.random() < 0.7)
    with_count = n > 1 and bool(rng.random() < 0.5)
    while True:
        obj_texts = [
            _object_phrase(rng, s, c, z, p, ws, wp)
            for (s, c, z, p), ws, wp in zip(objs, with_size, with_pos)
        ]
        body = _join(obj_texts)
        if with_count:
            head = _choice(rng, _COUNT_HEADS).format(COUNTS[n - 1])
            cap = f"{head} {body}"
        else:
            cap = _choice(rng, _OPENERS_ONE if n == 1 else _OPENERS_MANY) + body
        if with_bg:
            cap += ("," if n > 1 and rng.random() < 0.5 else "") + " " + _background_phrase(rng, bg)
        if n_tokens(cap) <= max_tokens:
            break
        # simplify: drop positions, then sizes, then the count head, then the background
        if any(with_pos):
            with_pos[max(i for i, w in enumerate(with_pos) if w)] = False
        elif any(with_size):
            with_size[max(i for i, w in enumerate(with_size) if w)] = False
        elif with_count:
            with_count = False
        elif with_bg:
            with_bg = False
        else:
            break
    return cap, {"bg": with_bg, "count": with_count, "size": with_size, "pos": with_pos,
                 "shape": [True] * n, "color": [True] * n}


# ---------------------------------------------------------------------------------------------
# Scenes.

def _index(names: list[str] | None, full: list[str], what: str) -> np.ndarray:
    if names is None:
        return np.arange(len(full))
    bad = [x for x in names if x not in full]
    if bad:
        raise ValueError(f"unknown {what} {bad}; expected names from {full}")
    return np.array([full.index(x) for x in names])


def _render(rng: np.random.Generator, n: int, n_obj: np.ndarray, bg: np.ndarray,
            shape_idx: np.ndarray, color_idx: np.ndarray, size_idx: np.ndarray,
            pos_idx: np.ndarray, size: int, draw_objects: bool = True,
            style: str = "smooth") -> ShapesBatch:
    """Draw scenes whose attributes are all chosen already ([B] and [B, 3] index arrays).

    Random numbers are drawn in a fixed order: the backgrounds of the whole batch, then per
    image the radius and jitter of each object followed by its caption. Everything that draws
    none (shape masks, painting, labels) is done afterwards for the whole batch.
    """
    st = _style(style)
    images = draw_backgrounds(bg, rng, size, style)
    # objects in drawing order: image-major, then slot
    filled = np.arange(MAX_OBJECTS) < n_obj[:, None]  # bool [B, 3]
    obj_img, obj_slot = np.nonzero(filled)
    sizes = size_idx[filled].tolist()
    objs = list(zip([SHAPES[a] for a in shape_idx[filled].tolist()],
                    [COLORS[a] for a in color_idx[filled].tolist()],
                    [SIZES[a] for a in sizes],
                    [POSITIONS[a] for a in pos_idx[filled].tolist()]))
    radius_range = [st.radius[SIZES[a]] for a in sizes]
    bg_names = [BACKGROUNDS[b] for b in bg.tolist()]
    u_radius: list[float] = []
    u_jitter: list[np.ndarray] = []
    captions: list[str] = []
    mentions: list[dict] = []
    o = 0
    for i, k in enumerate(n_obj.tolist()):
        for lo, hi in radius_range[o : o + k]:
            u_radius.append(rng.uniform(lo, hi))
            u_jitter.append(rng.uniform(-1.5, 1.5, 2))
        cap, m = make_caption(rng, objs[o : o + k], bg_names[i], style=style)
        captions.append(cap)
        mentions.append(m)
        o += k

    r = np.array(u_radius, np.float64) * size / 64.0
    jit = np.array(u_jitter, np.float64).reshape(-1, 2) * size / 64.0
    p = pos_idx[obj_img, obj_slot]
    if style == "textured":  # kept in this form: the first shipped model saw these pixels
        cell = size / 3.0
        cy = (p // 3 + 0.5) * cell + jit[:, 0]
        cx = (p % 3 + 0.5) * cell + jit[:, 1]
    else:
        grid = np.array(st.grid) * size
        cy = grid[p // 3] + jit[:, 0]
        cx = grid[p % 3] + jit[:, 1]
    centers = np.full((n, MAX_OBJECTS, 2), np.nan, np.float32)
    radii = np.full((n, MAX_OBJECTS), np.nan, np.float32)
    centers[obj_img, obj_slot, 0] = cy
    centers[obj_img, obj_slot, 1] = cx
    radii[obj_img, obj_slot] = r

    # silhouettes, computed for a block of objects of one shape at a time ([m, h, w] windows of
    # at most _BLOCK_PIXELS pixels, as for the backgrounds)
    y0, y1, x0, x1 = _windows(cy, cx, r)
    area = int(((y1 - y0) * (x1 - x0)).max()) if len(r) else 1
    step = max(1, _BLOCK_PIXELS // area)
    obj_shape = shape_idx[obj_img, obj_slot]
    win_of: list[np.ndarray | None] = [None] * len(obj_img)  # each object's window
    for s in np.unique(obj_shape).tolist():
        sel = np.flatnonzero(obj_shape == s)
        for a in range(0, len(sel), step):
            t = sel[a : a + step]
            wins = _shape_windows(SHAPES[s], cy[t], cx[t], r[t])
            for o, win in zip(t.tolist(), wins):
                win_of[o] = win
    # place and paint in drawing order, so that later objects cover earlier ones
    masks = [np.zeros((k, size, size), bool) for k in n_obj.tolist()]
    fg = np.zeros((n, size, size), bool)
    # pixels as 3-byte void scalars: assigning one colour to masked pixels is then a plain copy
    pixels = images.view(np.dtype((np.void, 3))).reshape(images.shape[:3])
    palette = np.array([COLOR_RGB[c] for c in COLORS], np.uint8).view(pixels.dtype).ravel()
    rgb = palette[color_idx[obj_img, obj_slot]].tolist() if len(obj_img) else []
    for o, (i, j, a0, a1, b0, b1) in enumerate(zip(obj_img.tolist(), obj_slot.tolist(),
                                                   y0.tolist(), y1.tolist(), x0.tolist(),
                                                   x1.tolist())):
        c0, c1, d0, d1 = max(0, a0), min(size, a1), max(0, b0), min(size, b1)  # clip to image
        if c0 < c1 and d0 < d1:
            win = win_of[o][c0 - a0 : c1 - a0, d0 - b0 : d1 - b0]
            masks[i][j, c0:c1, d0:d1] = win
            fg[i, c0:c1, d0:d1] |= win
            if draw_objects:
                pixels[i, c0:c1, d0:d1][win] = rgb[o]

    def mention_rows(key: str) -> np.ndarray:
        return np.array([m[key] + [False] * (MAX_OBJECTS - len(m[key])) for m in mentions],
                        bool).reshape(n, MAX_OBJECTS)

    labels = {
        "n_objects": n_obj.astype(np.int64), "background": bg.astype(np.int64),
        "shape": shape_idx, "color": color_idx, "size": size_idx, "position": pos_idx,
        "mentions_background": np.array([m["bg"] for m in mentions], bool).reshape(n),
        "mentions_count": np.array([m["count"] for m in mentions], bool).reshape(n),
        "mentions_size": mention_rows("size"), "mentions_position": mention_rows("pos"),
        "mentions_shape": mention_rows("shape"), "mentions_color": mention_rows("color"),
        "center": centers, "radius": radii,
    }
    return ShapesBatch(images, captions, masks, fg, labels)


def generate(n: int, seed: int = 0, *, n_objects: int | tuple[int, int] = (1, 3),
             shapes: list[str] | None = None, colors: list[str] | None = None,
             backgrounds: list[str] | None = None, sizes: list[str] | None = None,
             image_size: int = IMAGE_SIZE, draw_objects: bool = True,
             style: str = "smooth") -> ShapesBatch:
    """Generate ``n`` random scenes of 1 to 3 objects, deterministically from ``seed``.

    Objects sit in distinct cells of a 3x3 grid; colours within a scene are distinct.

    Parameters
    ----------
    n : number of images B
    seed : random seed; the same seed gives the same batch
    n_objects : a fixed count or an inclusive (min, max) range, within 1..3
    shapes, colors, backgrounds, sizes : restrict the attributes to these names
    image_size : image side S (64 by default; the shipped model expects 64)
    draw_objects : if False, return the same scenes (labels, masks, captions) with only the
        background drawn: the object-free counterfactual of each image
    style : a key of ``STYLES``: "smooth" (the default, the world the shipped model was
        trained on) or "textured" (the first world): grounds, object sizes, grid, captions

    Returns
    -------
    ShapesBatch with images uint8 [B, S, S, 3], captions, masks, foreground, labels

    Examples
    --------
    >>> batch = generate(4, seed=0)
    >>> batch.images.shape, len(batch.captions)
    ((4, 64, 64, 3), 4)
    """
    rng = np.random.default_rng(seed)
    lo, hi = (n_objects, n_objects) if isinstance(n_objects, int) else n_objects
    if not 1 <= lo <= hi <= MAX_OBJECTS:
        raise ValueError(f"n_objects must lie within 1..{MAX_OBJECTS}, got {n_objects}")
    sh = _index(shapes, SHAPES, "shapes")
    co = _index(colors, COLORS, "colors")
    bgs = _index(backgrounds, BACKGROUNDS, "backgrounds")
    sz = _index(sizes, SIZES, "sizes")
    if len(co) < hi:
        raise ValueError(f"need at least {hi} colours for {hi} objects per scene")
    n_obj = rng.integers(lo, hi + 1, n)
    bg = bgs[rng.integers(0, len(bgs), n)]
    shape_idx = np.full((n, MAX_OBJECTS), -1, np.int64)
    color_idx = np.full((n, MAX_OBJECTS), -1, np.int64)
    size_idx = np.full((n, MAX_OBJECTS), -1, np.int64)
    pos_idx = np.full((n, MAX_OBJECTS), -1, np.int64)
    # per image, in this order. k scalar integers(0, m) draw exactly what integers(0, m, k) does
    # (each value takes its own 32 bits), at a quarter of the cost
    draws: list[list] = [[], [], [], []]
    n_sh, n_co, n_sz = len(sh), len(co), len(sz)
    integers = rng.integers
    for k in n_obj.tolist():
        draws[0].append(_spread_cells(rng, k))
        draws[1] += [integers(0, n_sh) for _ in range(k)]
        draws[2].append(rng.permutation(n_co)[:k])
        draws[3] += [integers(0, n_sz) for _ in range(k)]
    filled = np.arange(MAX_OBJECTS) < n_obj[:, None]  # bool [B, 3], rows filled left first
    if n:
        pos_idx[filled] = np.concatenate(draws[0])
        shape_idx[filled] = sh[np.array(draws[1], np.int64)]
        color_idx[filled] = co[np.concatenate(draws[2])]
        size_idx[filled] = sz[np.array(draws[3], np.int64)]
    _style(style)
    return _render(rng, n, n_obj, bg, shape_idx, color_idx, size_idx, pos_idx, image_size,
                   draw_objects, style)


def _spread_ok() -> set[tuple[int, ...]]:
    """Ordered tuples of 1 to 3 distinct grid cells, no two of which share an edge."""
    def touch(a: int, b: int) -> bool:
        return abs(a // 3 - b // 3) + abs(a % 3 - b % 3) == 1

    return {c for k in range(1, MAX_OBJECTS + 1) for c in itertools.permutations(range(9), k)
            if not any(touch(a, b) for a, b in itertools.combinations(c, 2))}


_SPREAD_OK = _spread_ok()


def _spread_cells(rng: np.random.Generator, k: int) -> np.ndarray:
    """k distinct grid cells, no two sharing an edge, so large objects do not touch."""
    while True:
        cells = rng.permutation(9)[:k]
        if tuple(cells.tolist()) in _SPREAD_OK:
            return cells


def spurious_split(n: int, seed: int = 0, train: bool = True, p_major: float = 0.93,
                   classes: tuple[str, str] = ("circle", "square"),
                   backgrounds: tuple[str, str] = ("water", "grass"), style: str = "smooth",
                   captions: str = "scene") -> ShapesBatch:
    """A Waterbirds-like split: two shape classes, each mostly on its own background.

    Each image holds one object. Class ``y`` is 0 for ``classes[0]`` and 1 for ``classes[1]``;
    ``place`` is 0 for ``backgrounds[0]`` and 1 for ``backgrounds[1]``; class y's usual
    background is ``backgrounds[y]``. ``group = 2 * y + place``.

    The classes also have names of their own, :data:`SPURIOUS_NAMES` (a circle is a "buoy", a
    square a "crate"), as "waterbird" names a kind of bird. With ``captions="class"`` every
    caption is a shape template with that name and nothing else ("a photo of a buoy."): a
    class name seen only beside its usual ground, as web captions name waterbirds on water.

    Parameters
    ----------
    n : number of images B
    seed : random seed
    train : if True, each class sits on its usual background with probability ``p_major``;
        if False, the four (class, background) groups are balanced (n // 4 each, the remainder
        spread over the first groups)
    p_major : share of majority-group images in the training split
    classes : the two shape names
    backgrounds : the two background names
    style : a key of ``STYLES``
    captions : "scene" (each scene described as :func:`generate` does) or "class" (the class
        name in a shape template, see above; needs ``classes`` of :data:`SPURIOUS_NAMES`)

    Returns
    -------
    ShapesBatch whose labels also hold ``y``, ``place`` and ``group`` (int [B])

    Examples
    --------
    >>> test = spurious_split(8, seed=0, train=False)
    >>> np.bincount(test.labels["group"], minlength=4).tolist()
    [2, 2, 2, 2]
    """
    if captions == "class" and any(c not in SPURIOUS_NAMES for c in classes):
        raise ValueError(f"captions='class' needs classes among {sorted(SPURIOUS_NAMES)}, "
                         f"got {classes}")
    rng = np.random.default_rng(seed)
    c_idx = _index(list(classes), SHAPES, "classes")
    b_idx = _index(list(backgrounds), BACKGROUNDS, "backgrounds")
    if train:
        y = rng.integers(0, 2, n)
        major = rng.random(n) < p_major
        place = np.where(major, y, 1 - y)
    else:
        group = rng.permutation(np.arange(n) % 4)
        y, place = group // 2, group % 2
    n_obj = np.ones(n, np.int64)
    shape_idx = np.full((n, MAX_OBJECTS), -1, np.int64)
    color_idx = np.full((n, MAX_OBJECTS), -1, np.int64)
    size_idx = np.full((n, MAX_OBJECTS), -1, np.int64)
    pos_idx = np.full((n, MAX_OBJECTS), -1, np.int64)
    shape_idx[:, 0] = c_idx[y]
    color_idx[:, 0] = rng.integers(0, len(COLORS), n)
    size_idx[:, 0] = rng.integers(0, len(SIZES), n)
    pos_idx[:, 0] = rng.integers(0, 9, n)
    batch = _render(rng, n, n_obj, b_idx[place], shape_idx, color_idx, size_idx, pos_idx,
                    IMAGE_SIZE, style=style)
    if captions == "class":
        names = [SPURIOUS_NAMES[c] for c in classes]
        forms = TEMPLATES["shape"]
        pick = rng.integers(0, len(forms), n)
        batch.captions = [forms[f].format(names[c]) for c, f in zip(y, pick)]
    elif captions != "scene":
        raise ValueError(f"captions must be 'scene' or 'class', got {captions!r}")
    batch.labels["y"] = y.astype(np.int64)
    batch.labels["place"] = place.astype(np.int64)
    batch.labels["group"] = (2 * y + place).astype(np.int64)
    return batch
