"""The built-in image task (issue 29, item 4): scenes of coloured shapes drawn with numpy and the 8 x 8
handwritten digits that ship inside scikit-learn, questions about them, and a gold judge. Nothing is downloaded.

Every image is 16 x 16 RGB uint8 (IMAGE_SIZE), so a tower with 4 x 4 patches gives 16 image tokens per image.

A scene is a black 16 x 16 canvas cut into a 2 x 2 grid of 8 x 8 cells, one shape per cell (1 to 4 shapes). A shape
is a filled square, an upward triangle or a plus-shaped cross, small (4 px) or large (7 px), in red, green, blue or
yellow, placed in its cell with a random offset. Offsets keep column / row 8 of the canvas empty, so two shapes never
touch (counts are unambiguous), "left of" / "above" compare cells (unambiguous), and every large shape outdoes every
small one in both extent and area ("largest" is unambiguous). A digit is one of the 1,797 sklearn digits, grey levels
0-16 scaled to 0-255, each pixel doubled (nearest) to 16 x 16, white on black.

Question kinds (TEMPLATES: >= 3 training phrasings and 2 held-out ones each; every question holds one `<image>`
marker per image):

    count      "<image>\\nHow many shapes are in the picture?"              -> "three"
    colour     "<image>\\nWhat colour is the cross?" (one cross in scene)   -> "blue"
    position   "<image>\\nIs the red square left or right of the blue cross?" -> "left" (or above / below)
    largest    "<image>\\nWhich shape is the largest?" (one large shape)   -> "the blue square"
    digit      "<image>\\nWhat digit is written here?"                     -> "seven"
    compare    "<image> <image>\\nWhich picture has more shapes, the first or the second?" -> "first"
               (two images; not in DEFAULT_KINDS, since it needs model.vision.max_images >= 2)

Images are not stored: a spec's params hold each image's description (a scene's object list or a digit's index,
all JSON), and `render(spec)` redraws the pixels bit for bit. So a prompt row (`to_row`) is plain JSON, and
`to_row(image_dir=...)` also writes the images as PNG files and lists their paths under "images", a form
`data.images.load_image` reads. Worked example:

    ImageTaskSpec(kind="colour", params={"images": [{"objects": [{"shape": "cross", "colour": "blue",
                  "size": "large", "cell": [0, 1], "at": [1, 9]}]}], "shape": "cross"},
                  reference="blue", template=0, held_out=False)
    user:      "<image>\\nWhat colour is the cross?"
    assistant: "blue"

Splits (per-split random streams, as in task.py: more train prompts never change the eval prompts): the eval
prompts are drawn first; `held_out_fraction` of them use held-out phrasings, which no other split uses. No image
of an eval prompt (a scene's object list, a digit's index) appears in the train, SFT or caption splits: the digits
are split once per seed (DIGIT_EVAL_FRACTION of them can appear only in eval) and scenes equal to an eval scene are
redrawn. `caption_demos` describes scenes and digits in full ("two shapes: a large red square at the top left and
a small blue cross at the bottom right", "the digit seven"), a first stage that aligns a from-scratch tower's
projector before SFT.

ImageGoldJudge scores a response in [0, 1] with gold.py's weights (0.6 correctness + 0.25 format + 0.15
verbosity; correctness 0 scores 0 on all three). Correctness per kind:

    count      exact 1, else 0.5 (1 - |error| / 3), floored at 0 ("two" for three: 1/3)
    colour, position, digit, compare
               1 / (options named) when the right one is among them ("left or right": 1/2), else 0
    largest    1/2 for the colour and 1/2 for the shape, each split over the colours (shapes) named
               ("the blue cross" for "the blue square": 1/2)

format is 1 when the response is an answer's shape and nothing else, right or wrong ("3", "seven", "blue", "left",
"the red cross", "red cross."), else 1/2; verbosity is gold.py's (1 up to the reference's words + 4, then falling). It has gold.py's
`score`, `totals` and `calls`, so `gold.Labeler(ImageGoldJudge())` ranks responses to ImageTaskPrompts.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import struct
import zlib
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from instruct_jax.data.images import IMAGE_MARKER
from instruct_jax.instructgpt.gold import VERBOSITY_SLACK, WEIGHTS, Score
from instruct_jax.instructgpt.task import CHAT_WRAPPERS, DEMO_WRAPPERS, ONES, TaskSpec

# ----------------------------------------------------------------------------- pictures
IMAGE_SIZE, PATCH_SIZE = 16, 4
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 16 per image with a 4 x 4 patch tower
CELL = IMAGE_SIZE // 2  # the 2 x 2 grid's cell side
COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (60, 100, 255), "yellow": (240, 220, 40)}
SHAPES = ("square", "triangle", "cross")
SIZES = {"small": 4, "large": 7}  # side in pixels; every large mask has more pixels than any small one
CELL_NAMES = {(0, 0): "top left", (0, 1): "top right", (1, 0): "bottom left", (1, 1): "bottom right"}
NUM_DIGITS = 1797  # sklearn's bundled digits (known without importing sklearn: a task without digits never does)
DIGIT_EVAL_FRACTION = 0.2  # the share of them that only eval prompts may show


def shape_mask(shape: str, side: int) -> np.ndarray:
    """[side, side] bool. square: all; cross: a plus with bars round(0.4 side) wide; triangle: apex up, row r
    spanning |c - (side - 1) / 2| <= (r + 1) / 2. At side 4: cross .XX./XXXX/XXXX/.XX., triangle .XX./.XX./XXXX/XXXX."""
    r, c = np.mgrid[:side, :side]
    if shape == "square":
        return np.ones((side, side), bool)
    if shape == "cross":
        bar = max(2, round(0.4 * side))
        lo = (side - bar) // 2
        return ((c >= lo) & (c < lo + bar)) | ((r >= lo) & (r < lo + bar))
    if shape == "triangle":
        return np.abs(c - (side - 1) / 2) <= (r + 1) / 2
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render_scene(objects: Sequence[dict], size: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 [size, size, 3]: each object {"shape", "colour", "size", "cell": [row, col], "at": [y, x]} drawn on
    black with its mask's top-left pixel at (y, x) of the 16 x 16 canvas; `size` a multiple of 16 (nearest
    upscaling, for viewing)."""
    if size % IMAGE_SIZE:
        raise ValueError(f"render_scene draws at a multiple of {IMAGE_SIZE} px, got {size}")
    canvas = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    for o in objects:
        side, (y, x) = SIZES[o["size"]], o["at"]
        if not (0 <= y and y + side <= IMAGE_SIZE and 0 <= x and x + side <= IMAGE_SIZE):
            raise ValueError(f"object {o} does not fit the {IMAGE_SIZE} px canvas")
        canvas[y:y + side, x:x + side][shape_mask(o["shape"], side)] = COLOURS[o["colour"]]
    k = size // IMAGE_SIZE
    return canvas.repeat(k, 0).repeat(k, 1)


def parse_scene(image: np.ndarray) -> list[dict]:
    """render_scene's inverse on a 16 x 16 scene: its objects ({"shape", "colour", "size", "cell", "at"}, in cell
    order), read from the pixels alone (one connected component of one colour per object). That it recovers every
    scene is the check that the answers are functions of the pixels (tests/test_image_task.py)."""
    objects, seen = [], np.zeros(image.shape[:2], bool)
    for colour, rgb in COLOURS.items():
        mask = np.all(image == np.asarray(rgb, np.uint8), -1)
        for y0, x0 in zip(*np.nonzero(mask & ~seen)):
            if seen[y0, x0]:
                continue
            stack, pixels = [(y0, x0)], []
            seen[y0, x0] = True
            while stack:  # flood fill, 4-connected
                y, x = stack.pop()
                pixels.append((y, x))
                for v, u in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                    if 0 <= v < mask.shape[0] and 0 <= u < mask.shape[1] and mask[v, u] and not seen[v, u]:
                        seen[v, u] = True
                        stack.append((v, u))
            ys, xs = np.array(pixels).T
            top, left, side = int(ys.min()), int(xs.min()), int(xs.max() - xs.min() + 1)
            crop = np.zeros((side, side), bool)
            crop[ys - top, xs - left] = True
            size = next((z for z, s in SIZES.items() if s == side), None)
            shape = next((s for s in SHAPES if size and np.array_equal(shape_mask(s, side), crop)), None)
            if shape is None:
                raise ValueError(f"a {colour} blob at ({top}, {left}) is no shape of this task")
            objects.append({"shape": shape, "colour": colour, "size": size,
                            "cell": [int(top >= CELL), int(left >= CELL)], "at": [top, left]})
    return sorted(objects, key=lambda o: o["cell"])


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [1797, 16, 16, 3] white on black, int labels [1797]) from sklearn's bundled copy (no download)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    if len(data.target) != NUM_DIGITS:
        raise RuntimeError(f"sklearn's load_digits has {len(data.target)} digits, not {NUM_DIGITS}: the split changed")
    grey = np.round(data.images * (255 / 16)).astype(np.uint8).repeat(2, 1).repeat(2, 2)
    return np.repeat(grey[..., None], 3, -1), data.target.astype(int)


def digit_label(index: int) -> int:
    return int(_digits()[1][index])


def render_image(image: dict) -> np.ndarray:
    """uint8 [16, 16, 3] of one image description: {"objects": [...]} (a scene) or {"digit": index}."""
    if "digit" in image:
        return _digits()[0][image["digit"]].copy()
    return render_scene(image["objects"])


def image_key(image: dict) -> str:
    return json.dumps(image, sort_keys=True)


def caption(image: dict) -> str:
    """The full description: "the digit seven"; "two shapes: a large red square at the top left and a small blue
    cross at the bottom right" (objects in reading order of their cells)."""
    if "digit" in image:
        return f"the digit {ONES[digit_label(image['digit'])]}"
    objects = sorted(image["objects"], key=lambda o: tuple(o["cell"]))
    parts = [f"a {o['size']} {o['colour']} {o['shape']} at the {CELL_NAMES[tuple(o['cell'])]}" for o in objects]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{ONES[len(objects)]} shape{'s' if len(objects) > 1 else ''}: {listed}"


def write_png(path: str, image: np.ndarray) -> None:
    """An 8-bit RGB PNG of uint8 [H, W, 3] with the standard library alone (zlib, one filter-0 scanline a row)."""
    h, w, _ = image.shape
    raw = b"".join(b"\x00" + row.tobytes() for row in np.ascontiguousarray(image, np.uint8))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


# ----------------------------------------------------------------------------- questions
# kind -> (training phrasings, held-out phrasings). Slots: {shape}; {a}, {b} ("red square"), {rel} ("left or right
# of" / "above or below"), {opts} ("left or right" / "above or below").
TEMPLATES = {
    "count": (("<image>\nHow many shapes are in the picture?", "<image>\nCount the shapes in this image.",
               "<image>\nHow many shapes do you see?", "<image>\nWhat is the number of shapes in the image?"),
              ("<image>\nTell me how many objects are drawn here.", "Look at this picture: <image>\nHow many things "
               "are in it?")),
    "colour": (("<image>\nWhat colour is the {shape}?", "<image>\nWhich colour does the {shape} have?",
                "<image>\nName the colour of the {shape}.", "<image>\nWhat is the colour of the {shape} in the picture?"),
               ("<image>\nThe {shape} in this image: what colour is it painted?",
                "Here is a picture. <image>\nTell me the colour of the {shape}.")),
    "position": (("<image>\nIs the {a} {rel} the {b}?", "<image>\nIn the picture, is the {a} {rel} the {b}?",
                  "<image>\nLook at the {a}. Is it {rel} the {b}?"),
                 ("<image>\nWhere is the {a} compared with the {b}: {opts}?",
                  "<image>\nTell me whether the {a} sits {rel} the {b}.")),
    "largest": (("<image>\nWhich shape is the largest?", "<image>\nWhich is the biggest shape in the picture?",
                 "<image>\nName the largest shape.", "<image>\nWhat is the largest shape in this image?"),
                ("<image>\nOne shape is bigger than all the others. Which one?",
                 "Tell me which shape takes up the most space. <image>")),
    "digit": (("<image>\nWhat digit is written here?", "<image>\nWhich digit is this?",
               "<image>\nRead the digit in the picture.", "<image>\nWhat number is shown in the image?"),
              ("<image>\nSomeone wrote a digit by hand. Which one is it?",
               "Here is a handwritten digit: <image>\nWhat is it?")),
    "compare": (("<image> <image>\nWhich picture has more shapes, the first or the second?",
                 "<image> <image>\nDoes the first or the second picture show more shapes?",
                 "First: <image> Second: <image>\nWhich one has more shapes, the first or the second?"),
                ("<image> <image>\nOf these two pictures, which holds the larger number of shapes: the first or the "
                 "second?", "Compare <image> and <image>. Which has more shapes, the first or the second?")),
}
KINDS = tuple(TEMPLATES)
DEFAULT_KINDS = ("count", "colour", "position", "largest", "digit")  # one image per prompt
CAPTION_TEMPLATES = ("<image>\nDescribe the picture.", "<image>\nWhat is in this image?", "<image>\nDescribe the image.")
RELATIONS = {"horizontal": ("left", "right"), "vertical": ("above", "below")}
_REL_TEXT = {"horizontal": ("left or right of", "left or right"), "vertical": ("above or below", "above or below")}


@dataclass(frozen=True)
class ImageTaskSpec(TaskSpec):
    """One instance: params["images"] describes each image (render(spec) draws them: {"objects": [...]} or
    {"digit": i}), the rest are the slots; `template` indexes the training or held-out phrasings of `kind`. The
    fields, `to_dict` and `from_dict` are TaskSpec's."""

    def key(self) -> str:
        """The instance without its wording: two prompts with one key ask the same question of the same images."""
        return json.dumps([self.kind, self.params], sort_keys=True)

    def image_keys(self) -> list[str]:
        return [image_key(im) for im in self.params["images"]]


def render(spec: ImageTaskSpec) -> list[np.ndarray]:
    """The spec's images, uint8 [16, 16, 3] each, in marker order."""
    return [render_image(im) for im in spec.params["images"]]


def question_text(spec: ImageTaskSpec) -> str:
    body = TEMPLATES[spec.kind][int(spec.held_out)][spec.template]
    p = spec.params
    slots = {"shape": p.get("shape", "")}
    if spec.kind == "position":
        rel, opts = _REL_TEXT[p["axis"]]
        slots.update(a=p["a"], b=p["b"], rel=rel, opts=opts)
    return body.format(**slots)


@dataclass(frozen=True)
class ImageTaskPrompt:
    messages: tuple  # ({"role": "user", "content": question with one IMAGE_MARKER per image},)
    spec: ImageTaskSpec

    @property
    def text(self) -> str:
        return self.messages[-1]["content"]

    @property
    def images(self) -> list[np.ndarray]:
        return render(self.spec)

    def demo(self) -> list[dict]:
        return list(self.messages) + [{"role": "assistant", "content": self.spec.reference}]

    def to_row(self, image_dir: Optional[str] = None) -> dict:
        """{"prompt", "spec"} (images redrawn from the spec); with `image_dir`, also "images": paths of PNG files
        written there (named by a hash of the image's description, so a shared image is written once)."""
        row = {"prompt": self.text, "spec": self.spec.to_dict()}
        if image_dir is not None:
            os.makedirs(image_dir, exist_ok=True)
            row["images"] = []
            for desc, pixels in zip(self.spec.params["images"], self.images):
                path = os.path.join(image_dir, hashlib.sha1(image_key(desc).encode()).hexdigest()[:16] + ".png")
                if not os.path.exists(path):
                    write_png(path, pixels)
                row["images"].append(path)
        return row

    @classmethod
    def from_row(cls, row: dict) -> "ImageTaskPrompt":
        return cls(({"role": "user", "content": row["prompt"]},), ImageTaskSpec.from_dict(row["spec"]))


# ----------------------------------------------------------------------------- instances
def _pick(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


def _place(rng: np.random.Generator, cell: tuple[int, int], side: int) -> list[int]:
    """Top-left pixel of a `side` mask in `cell`: cell 0 spans pixels 0..7, cell 1 9..15, so pixel 8 stays empty."""
    return [k * CELL + int(rng.integers(k, CELL - side + 1)) for k in cell]


def _scene(rng: np.random.Generator, looks: Sequence[tuple[str, str, str]],
           cells: Optional[Sequence[tuple[int, int]]] = None) -> dict:
    """A scene of objects with the given (shape, colour, size) looks, in `cells` (default: random distinct cells)."""
    if cells is None:
        order = rng.permutation(4)[:len(looks)]
        cells = [tuple(CELL_NAMES)[int(i)] for i in order]
    objects = [{"shape": s, "colour": c, "size": z, "cell": list(cell), "at": _place(rng, cell, SIZES[z])}
               for (s, c, z), cell in zip(looks, cells)]
    return {"objects": sorted(objects, key=lambda o: o["cell"])}


def _random_looks(rng: np.random.Generator, n: int, shapes: Sequence[str] = SHAPES) -> list[tuple[str, str, str]]:
    return [(_pick(rng, shapes), _pick(rng, tuple(COLOURS)), _pick(rng, tuple(SIZES))) for _ in range(n)]


def _distinct_looks(rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
    """n different (shape, colour) pairs, so "the red square" names one object."""
    pairs = [(s, c) for s in SHAPES for c in COLOURS]
    return [pairs[int(i)] for i in rng.choice(len(pairs), size=n, replace=False)]


def _instance(kind: str, rng: np.random.Generator, digits: np.ndarray) -> tuple[dict, str]:
    """(params, reference) of a fresh instance of `kind`; digit indices come from `digits`."""
    if kind == "count":
        n = int(rng.integers(1, 5))
        return {"images": [_scene(rng, _random_looks(rng, n))]}, ONES[n]
    if kind == "colour":
        n, shape = int(rng.integers(1, 5)), _pick(rng, SHAPES)
        looks = [(shape, _pick(rng, tuple(COLOURS)), _pick(rng, tuple(SIZES)))]
        looks += _random_looks(rng, n - 1, [s for s in SHAPES if s != shape])
        looks = [looks[int(i)] for i in rng.permutation(n)]
        return {"images": [_scene(rng, looks)], "shape": shape}, next(c for s, c, _ in looks if s == shape)
    if kind == "position":
        n, axis = int(rng.integers(2, 5)), _pick(rng, tuple(RELATIONS))
        a_cell = tuple(CELL_NAMES)[int(rng.integers(4))]
        beside = (a_cell[0], 1 - a_cell[1]) if axis == "horizontal" else (1 - a_cell[0], a_cell[1])
        b_cell = beside if rng.random() < 0.5 else (1 - a_cell[0], 1 - a_cell[1])  # or diagonal
        rest = [c for c in CELL_NAMES if c not in (a_cell, b_cell)]
        cells = [a_cell, b_cell] + [rest[int(i)] for i in rng.permutation(len(rest))[:n - 2]]
        looks = [(s, c, _pick(rng, tuple(SIZES))) for s, c in _distinct_looks(rng, n)]
        scene = _scene(rng, looks, cells)
        a, b = (f"{c} {s}" for s, c, _ in looks[:2])
        i = 1 if axis == "horizontal" else 0
        return {"images": [scene], "a": a, "b": b, "axis": axis}, RELATIONS[axis][int(a_cell[i] > b_cell[i])]
    if kind == "largest":
        n = int(rng.integers(2, 5))
        looks = [(s, c, "large" if j == 0 else "small") for j, (s, c) in enumerate(_distinct_looks(rng, n))]
        big = looks[0]
        looks = [looks[int(i)] for i in rng.permutation(n)]
        return {"images": [_scene(rng, looks)]}, f"the {big[1]} {big[0]}"
    if kind == "digit":
        index = int(_pick(rng, digits))
        return {"images": [{"digit": index}]}, ONES[digit_label(index)]
    if kind == "compare":
        n1, n2 = (int(x) + 1 for x in rng.choice(4, size=2, replace=False))
        scenes = [_scene(rng, _random_looks(rng, n)) for n in (n1, n2)]
        return {"images": scenes}, "first" if n1 > n2 else "second"
    raise ValueError(f"unknown image task kind {kind!r}; expected one of {KINDS}")


def make_prompt(kind: str, rng: np.random.Generator, held_out: bool = False,
                digits: Optional[np.ndarray] = None) -> ImageTaskPrompt:
    """A fresh instance of `kind` with a random training (or held-out) phrasing; digits from `digits` (default all)."""
    params, reference = _instance(kind, rng, np.arange(NUM_DIGITS) if digits is None else digits)
    spec = ImageTaskSpec(kind, params, reference, int(rng.integers(len(TEMPLATES[kind][int(held_out)]))), held_out)
    return ImageTaskPrompt(({"role": "user", "content": question_text(spec)},), spec)


# ----------------------------------------------------------------------------- the task
_STREAMS = {"eval": 0, "sft": 1, "train": 2, "caption": 3, "demonstrators": 4, "digits": 5}
_MAX_REDRAWS = 100  # an eval draw that repeats an earlier eval question this often is kept (tiny digit pools)


class ImageTask:
    """All the image task's data from one seed; each split has its own random stream."""

    def __init__(self, seed: int = 0, num_eval: int = 240, held_out_fraction: float = 0.4,
                 kinds: Sequence[str] = DEFAULT_KINDS):
        if num_eval < 1 or not 0.0 <= held_out_fraction <= 1.0:
            raise ValueError(f"need num_eval >= 1 and 0 <= held_out_fraction <= 1, got {num_eval}, {held_out_fraction}")
        if not kinds or len(set(kinds)) != len(kinds) or any(k not in KINDS for k in kinds):
            raise ValueError(f"kinds must be distinct names from {KINDS}, got {list(kinds)}")
        self.seed, self.kinds = seed, tuple(kinds)
        order = self._rng("digits").permutation(NUM_DIGITS)
        cut = round(DIGIT_EVAL_FRACTION * len(order))
        self.eval_digits, self.train_digits = np.sort(order[:cut]), np.sort(order[cut:])
        self._eval = self._draw("eval", num_eval, held_out_fraction, self.eval_digits, exclude=None)
        self._eval_images = {k for p in self._eval for k in p.spec.image_keys()}

    @property
    def max_images(self) -> int:
        """Images per prompt at most: what model.vision.max_images must allow."""
        return 2 if "compare" in self.kinds else 1

    def _rng(self, split: str) -> np.random.Generator:
        return np.random.default_rng([self.seed, _STREAMS[split]])

    def _draw(self, split: str, n: int, held_out_fraction: float, digits: np.ndarray,
              exclude: Optional[set]) -> list[ImageTaskPrompt]:
        """n prompts cycling through the kinds; round(n * fraction) of them (at random) use held-out phrasings.
        exclude=None (eval): repeats of an earlier question are redrawn; else a prompt showing an excluded image is."""
        rng = self._rng(split)
        held = np.zeros(n, bool)
        held[:round(n * held_out_fraction)] = True
        held = rng.permutation(held)
        out, seen = [], set()
        for i in range(n):
            kind = self.kinds[(i + int(self.seed)) % len(self.kinds)]
            for tries in range(10 ** 6):
                prompt = make_prompt(kind, rng, bool(held[i]), digits)
                if exclude is not None:
                    if not exclude.intersection(prompt.spec.image_keys()):
                        break
                elif prompt.spec.key() not in seen or tries >= _MAX_REDRAWS:
                    break
            seen.add(prompt.spec.key())
            out.append(prompt)
        return [out[i] for i in rng.permutation(n)]

    def eval_prompts(self) -> list[ImageTaskPrompt]:
        return list(self._eval)

    def train_prompts(self, n: int) -> list[ImageTaskPrompt]:
        """Prompts for reward-model labelling and PPO: training phrasings, no eval image."""
        return self._draw("train", n, 0.0, self.train_digits, self._eval_images)

    def sft_prompts(self, n: int) -> list[ImageTaskPrompt]:
        return self._draw("sft", n, 0.0, self.train_digits, self._eval_images)

    def sft_demos(self, n: int = 400, chatty: float = 0.0, slip: float = 0.0,
                  phrases: Sequence[str] = DEMO_WRAPPERS) -> list[tuple[list[dict], list[np.ndarray]]]:
        """n (messages [user, assistant], images) SFT conversations. As in task.py, `chatty` of the answers are put
        in one of the chat `phrases` and `slip` of them carry a typical mistake (`near_miss`), drawn from their own
        stream, so the prompts are the same for any mix."""
        if not (0.0 <= chatty <= 1.0 and 0.0 <= slip <= 1.0):
            raise ValueError(f"need chatty and slip in [0, 1], got {chatty}, {slip}")
        rng, demos = self._rng("demonstrators"), []
        for p in self.sft_prompts(n):
            answer = near_miss(p.spec, rng) if rng.random() < slip else p.spec.reference
            answer = _pick(rng, phrases).format(answer) if rng.random() < chatty else answer
            demos.append((list(p.messages) + [{"role": "assistant", "content": answer}], p.images))
        return demos

    def caption_demos(self, n: int = 400) -> list[tuple[list[dict], list[np.ndarray]]]:
        """n (messages, [image]) conversations "<image>\\nDescribe the picture." -> the full caption: random scenes of
        1-4 shapes, and (when "digit" is a kind) one digit in five; never an eval image."""
        rng, out = self._rng("caption"), []
        digit_share = 0.2 if "digit" in self.kinds else 0.0
        while len(out) < n:
            if rng.random() < digit_share:
                image = {"digit": int(_pick(rng, self.train_digits))}
            else:
                image = _scene(rng, _random_looks(rng, int(rng.integers(1, 5))))
            question = _pick(rng, CAPTION_TEMPLATES)
            if image_key(image) in self._eval_images:
                continue
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": caption(image)}]
            out.append((messages, [render_image(image)]))
        return out


# ----------------------------------------------------------------------------- ablation images
def blank_images(prompt: ImageTaskPrompt, value: int = 0) -> list[np.ndarray]:
    """The prompt's images replaced by constant ones of the same shape (0: the scenes' black background)."""
    return [np.full_like(im, value) for im in prompt.images]


def shuffle_images(prompts: Sequence[ImageTaskPrompt], seed: int = 0) -> list[list[np.ndarray]]:
    """Each prompt's images replaced by another prompt's (same image count): a random derangement, a cycle over a
    shuffled order within each image count. ValueError when an image count has a single prompt."""
    rng = np.random.default_rng(seed)
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p.spec.params["images"]), []).append(i)
    donor = [0] * len(prompts)
    for count, members in sorted(groups.items()):
        if len(members) < 2:
            raise ValueError(f"one prompt with {count} image(s): nothing to swap its images with")
        order = [members[int(j)] for j in rng.permutation(len(members))]
        for j, i in enumerate(order):
            donor[i] = order[(j + 1) % len(order)]
    return [prompts[d].images for d in donor]


# ----------------------------------------------------------------------------- the judge
_WORD = re.compile(r"[A-Za-z]+|\d+")
_PLURAL = {"squares": "square", "triangles": "triangle", "crosses": "cross"}


def _words(text: str) -> list[str]:
    return [_PLURAL.get(w, w) for w in (w.lower() for w in _WORD.findall(text))]


def _number(word: str) -> Optional[int]:
    if word.isdigit():
        return int(word)
    return ONES.index(word) if word in ONES else None


def _share(named: set, answer) -> float:
    """1 / len(named) if the answer is among the options named, else 0."""
    return 1.0 / len(named) if answer in named else 0.0


def _correctness(spec: ImageTaskSpec, words: list[str]) -> float:
    ref = spec.reference
    if spec.kind == "count":
        values = [v for v in map(_number, words) if v is not None]
        if not values:
            return 0.0
        error = abs(values[-1] - ONES.index(ref))
        return 1.0 if error == 0 else max(0.0, 0.5 * (1 - error / 3))
    if spec.kind == "digit":
        return _share({v for v in map(_number, words) if v is not None and v < 10}, ONES.index(ref))
    if spec.kind == "colour":
        return _share({w for w in words if w in COLOURS}, ref)
    if spec.kind in ("position", "compare"):
        options = RELATIONS[spec.params["axis"]] if spec.kind == "position" else ("first", "second")
        return _share({w for w in words if w in options}, ref)
    if spec.kind == "largest":
        _, colour, shape = ref.split()
        return (0.5 * _share({w for w in words if w in COLOURS}, colour)
                + 0.5 * _share({w for w in words if w in SHAPES}, shape))
    raise ValueError(f"unknown image task kind {spec.kind!r}")


def _bare(spec: ImageTaskSpec, response: str) -> bool:
    """Whether the response is an answer's shape and nothing else, right or wrong: one number (count, digit), one
    colour, one option word, or "[the] colour shape" (largest); a final period allowed."""
    text = response.strip().lower()
    text = text[:-1].rstrip() if text.endswith(".") else text
    words = text.split()
    if not re.fullmatch(r"[a-z0-9]+( [a-z0-9]+)*", text):
        return False
    if spec.kind in ("count", "digit"):
        return len(words) == 1 and _number(words[0]) is not None
    if spec.kind == "colour":
        return len(words) == 1 and words[0] in COLOURS
    if spec.kind in ("position", "compare"):
        options = RELATIONS[spec.params["axis"]] if spec.kind == "position" else ("first", "second")
        return words in ([o] for o in options) or words in (["the", o] for o in options)
    words = words[1:] if words[:1] == ["the"] else words
    return len(words) == 2 and words[0] in COLOURS and words[1] in SHAPES


class ImageGoldJudge:
    """Scores responses to image task specs (module docstring); `calls` counts every response scored."""

    def __init__(self):
        self.calls = 0

    def score(self, spec: ImageTaskSpec, response: str) -> Score:
        self.calls += 1
        words = _words(response)
        correct = _correctness(spec, words) if response.strip() else 0.0
        if correct == 0:
            return Score(0.0, 0.0, 0.0, 0.0)
        fmt = 1.0 if _bare(spec, response) else 0.5
        allowed = len(spec.reference.split()) + VERBOSITY_SLACK
        extra = len(words) - allowed
        verbose = 1.0 if extra <= 0 else max(0.0, 1.0 - extra / (2 * allowed + 4))
        total = WEIGHTS["correctness"] * correct + WEIGHTS["format"] * fmt + WEIGHTS["verbosity"] * verbose
        return Score(correct, fmt, verbose, round(total, 9))

    def totals(self, spec: ImageTaskSpec, responses: Sequence[str]) -> np.ndarray:
        return np.array([self.score(spec, r).total for r in responses])


# ----------------------------------------------------------------------------- simulated responses
def near_miss(spec: ImageTaskSpec, rng: np.random.Generator) -> str:
    """The reference with one typical slip: a count off by one, the right colour on the wrong shape (largest), or a
    hedge between the answer and a wrong option (colour, position, digit, compare)."""
    ref, kind = spec.reference, spec.kind
    if kind == "count":
        n = ONES.index(ref)
        return ONES[n + 1 if n == 1 or rng.random() < 0.5 else n - 1]
    if kind == "largest":
        _, colour, shape = ref.split()
        if rng.random() < 0.5:
            return f"the {colour} {_pick(rng, [s for s in SHAPES if s != shape])}"
        return f"the {_pick(rng, [c for c in COLOURS if c != colour])} {shape}"
    if kind == "colour":
        other = _pick(rng, [c for c in COLOURS if c != ref])
    elif kind == "digit":
        other = _pick(rng, [w for w in ONES[:10] if w != ref])
    else:
        options = RELATIONS[spec.params["axis"]] if kind == "position" else ("first", "second")
        other = next(o for o in options if o != ref)
    return f"{ref} or {other}" if rng.random() < 0.5 else f"{other} or {ref}"


def wrong_answer(spec: ImageTaskSpec, rng: np.random.Generator) -> str:
    """A clean answer of the right form that is wrong (correctness 0 except a count two or more off: little)."""
    ref, kind = spec.reference, spec.kind
    if kind == "count":
        return _pick(rng, [w for w in ONES[1:5] if abs(ONES.index(w) - ONES.index(ref)) >= 2] or ["zero"])
    if kind == "digit":
        return _pick(rng, [w for w in ONES[:10] if w != ref])
    if kind == "colour":
        return _pick(rng, [c for c in COLOURS if c != ref])
    if kind == "largest":
        _, colour, shape = ref.split()
        return (f"the {_pick(rng, [c for c in COLOURS if c != colour])} "
                f"{_pick(rng, [s for s in SHAPES if s != shape])}")
    options = RELATIONS[spec.params["axis"]] if kind == "position" else ("first", "second")
    return next(o for o in options if o != ref)


def sample_response(spec: ImageTaskSpec, rng: np.random.Generator) -> str:
    """A plausible policy sample (about 30% exact, 30% near misses, 15% wrong, 15% chatty, 10% the question
    echoed), for testing the judge and the labeler without a model."""
    style = rng.choice(["exact", "near", "wrong", "chatty", "echo"], p=[0.3, 0.3, 0.15, 0.15, 0.1])
    if style == "exact":
        return spec.reference
    if style == "near":
        return near_miss(spec, rng)
    if style == "wrong":
        return wrong_answer(spec, rng)
    if style == "echo":
        return question_text(spec).replace(IMAGE_MARKER, "").strip()
    return _pick(rng, CHAT_WRAPPERS).format(near_miss(spec, rng) if rng.random() < 0.5 else spec.reference)
