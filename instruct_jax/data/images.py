"""Images for the vision tower (issue 29, item 2 in part): decoding, resizing and normalisation with Pillow, and
the check that a row's image markers and its images agree.

`load_image` reads any of the forms a conversation row may carry — a file path, encoded bytes, a numpy array
(uint8 H x W [x C], or floats in [0, 1]), a PIL image, or a `datasets` Image feature's dict ({"bytes", "path"}) —
and returns [size, size, channels] float32 scaled as SigLIP was trained: (pixel / 255 - 0.5) / 0.5, in [-1, 1].
Resizing is Pillow's bicubic, to a square (no crop: the whole image is seen).

`check_image_markers` is what the data path runs on every row before any batch is built: the number of
`IMAGE_MARKER`s in the row's messages must equal its number of images, else a MalformedDataError naming the row
("file:line") and both counts — never a silent drop, never a mismatch found hundreds of steps into a run.
"""

from __future__ import annotations

import base64
import io
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from instruct_jax.data.stats import MalformedDataError

IMAGE_MARKER = "<image>"  # where an image goes in a message's text; the chat template expands it to image tokens


def _to_pil(source: Any):
    from PIL import Image

    if isinstance(source, Image.Image):
        return source
    if isinstance(source, dict):  # a datasets Image feature, decoded=False: {"bytes": ..., "path": ...}
        if source.get("bytes"):
            return Image.open(io.BytesIO(source["bytes"]))
        if source.get("path"):
            return Image.open(source["path"])
        raise MalformedDataError("bad_image", "an image dict needs 'bytes' or 'path'", "images")
    if isinstance(source, (bytes, bytearray)):
        return Image.open(io.BytesIO(source))
    if isinstance(source, str) and source.startswith("data:"):  # a data URL: data:image/png;base64,....
        header, _, payload = source.partition(",")
        if not header.endswith(";base64"):
            raise MalformedDataError("bad_image", "a data URL image must be base64 (data:image/...;base64,...)",
                                     "images")
        return Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
    if isinstance(source, str):
        return Image.open(source)
    if isinstance(source, np.ndarray):
        array = source
        if array.dtype != np.uint8:
            if not np.issubdtype(array.dtype, np.floating) or array.min() < 0 or array.max() > 1:
                raise MalformedDataError("bad_image", f"a {array.dtype} image array must hold floats in [0, 1] "
                                         "(or be uint8)", "images")
            array = np.round(array * 255).astype(np.uint8)
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
            raise MalformedDataError("bad_image", f"an image array must be H x W, H x W x 1, 3 or 4, got shape "
                                     f"{array.shape}", "images")
        return Image.fromarray(array)
    raise MalformedDataError("bad_image", f"an image must be a path, bytes, an array, a PIL image or a datasets "
                             f"Image dict, got {type(source).__name__}", "images")


def load_image(source: Any, size: int, channels: int = 3) -> np.ndarray:
    """[size, size, channels] float32 in [-1, 1] from any supported form (module docstring)."""
    from PIL import Image

    try:
        image = _to_pil(source)
        image = image.convert("RGB" if channels == 3 else "L")
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    except MalformedDataError:
        raise
    except (OSError, ValueError) as e:  # an unreadable file, undecodable bytes or bad base64
        raise MalformedDataError("bad_image", f"cannot read the image: {e}", "images") from None
    pixels = np.asarray(image, np.float32).reshape(size, size, channels)
    return (pixels / 255.0 - 0.5) / 0.5


def count_markers(messages: Sequence[dict], marker: str = IMAGE_MARKER) -> int:
    """How many image markers the row's messages hold (text content only)."""
    return sum(m.get("content", "").count(marker) for m in messages if isinstance(m.get("content"), str))


def check_image_markers(messages: Sequence[dict], images: Sequence[Any], where: str, max_images: int,
                        marker: str = IMAGE_MARKER) -> None:
    """MalformedDataError naming `where` and both counts unless the markers and the images agree and fit the
    model's `max_images` slots."""
    markers = count_markers(messages, marker)
    if markers != len(images):
        raise MalformedDataError("image_marker_mismatch", f"{markers} image marker(s) {marker!r} in the messages "
                                 f"but {len(images)} image(s)", "images", where)
    if len(images) > max_images:
        raise MalformedDataError("too_many_images", f"{len(images)} images, more than model.vision.max_images="
                                 f"{max_images}", "images", where)


@dataclass(frozen=True)
class ImageLayout:
    """What the data path needs to know of the model's vision tower (model.vision): the image token and how many
    of them an image takes, the pixel size, and the image slots of a batch row."""

    token_id: int
    tokens_per_image: int
    size: int
    channels: int
    max_images: int
    prefix_lm: bool = False  # rows also carry `prefix` flags (packing.py): the prompt attends bidirectionally

    @classmethod
    def of(cls, vision) -> Optional["ImageLayout"]:
        """The layout of a `model.vision` section (a VisionConfig), or None when the model takes no images."""
        if vision is None or not vision.enabled:
            return None
        return cls(vision.image_token_id, vision.tokens_per_image, vision.image_size, vision.channels,
                   vision.max_images, vision.prefix_lm)

    @property
    def slot_shape(self) -> tuple[int, int, int, int]:
        """[M, H, W, C]: a row's image slots."""
        return (self.max_images, self.size, self.size, self.channels)

    def no_images(self) -> np.ndarray:
        return np.zeros((0, self.size, self.size, self.channels), np.float32)

    def slots(self, images: Optional[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(images [M, H, W, C] zero-filled past the row's own, image_mask [M] int32: 1 for a used slot)."""
        out, mask = np.zeros(self.slot_shape, np.float32), np.zeros((self.max_images,), np.int32)
        n = 0 if images is None else len(images)
        if n > self.max_images:
            raise ValueError(f"{n} images, the row has {self.max_images} slots")
        if n:
            out[:n], mask[:n] = images, 1
        return out, mask


@dataclass(frozen=True)
class WithImages:
    """A parsed record (a conversation, a prompt or a ranking) and its images [n, H, W, C] float32."""

    record: Any
    images: np.ndarray


def row_images(row: Any, field: str, layout: ImageLayout, where: str = "") -> np.ndarray:
    """The images of a row's `field` (a list, or one image; missing or null = none) loaded to [n, H, W, C].

    An image is anything `load_image` reads; a relative path is taken relative to the data file's folder
    (`where` = "file:line"), so a jsonl and its pictures can move together."""
    value = row.get(field) if isinstance(row, dict) else None
    if value is None:
        return layout.no_images()
    items = value if isinstance(value, list) else [value]
    folder = os.path.dirname(where.rpartition(":")[0]) if ":" in where else ""
    loaded = []
    for i, item in enumerate(items):
        if isinstance(item, str) and not item.startswith("data:") and not os.path.isabs(item) and folder:
            item = os.path.join(folder, item)
        try:
            loaded.append(load_image(item, layout.size, layout.channels))
        except MalformedDataError as e:
            raise MalformedDataError(e.reason, str(e.detail), f"{field}[{i}]") from None
    return np.stack(loaded) if loaded else layout.no_images()


def record_messages(record: Any) -> list:
    """The messages of a record whose markers count: a conversation's or prompt's, or a ranking's prompt."""
    return list(getattr(record, "prompt", record))
