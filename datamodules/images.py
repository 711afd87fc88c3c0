"""Image files → uint8 RGB tensors, and the box clean-up every reader of real annotations needs."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as F

log = logging.getLogger(__name__)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# the first bytes of the formats read_image decodes (torchvision: JPEG, PNG, GIF, WebP; PIL: BMP, TIFF)
IMAGE_SIGNATURES = (b"\xff\xd8\xff", PNG_SIGNATURE, b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")
_truncation_warned: set[Path] = set()  # a truncated file is said once per process, not every epoch


class ImageReadError(RuntimeError):
    """An image file that is missing or cannot be decoded; the message names the file."""


def read_image(path: str | Path) -> Tensor:
    """(3, H, W) uint8 RGB whatever the file holds (grayscale, palette, RGBA, CMYK, 16-bit), EXIF rotation applied
    (torchvision's libjpeg-turbo/libpng decoders: several times faster than PIL for VOC/COCO JPEGs)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ImageReadError(f"{path}: cannot read the image file ({e.strerror or e})") from e
    if not raw:
        raise ImageReadError(f"{path}: the image file is empty (0 bytes); restore it or remove it from the split")
    check_pixel_limit(path, raw)
    if raw.startswith(PNG_SIGNATURE):
        return decode_with_pil(path, raw)
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    try:
        image = decode_image(data, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except RuntimeError:  # BMP or TIFF (torchvision's decoders lack them), or a truncated JPEG: PIL reads both
        return decode_with_pil(path, raw)
    if image.dtype != torch.uint8:  # 16-bit PNGs
        image = F.to_dtype(image, torch.uint8, scale=True)
    return image


def check_pixel_limit(path: Path, raw: bytes) -> None:
    """PIL's decompression-bomb limit, which torchvision's decoders lack, from the header alone (over
    ``Image.MAX_IMAGE_PIXELS``: PIL's warning; over twice that: refused)."""
    try:
        with Image.open(io.BytesIO(raw)):
            pass
    except Image.DecompressionBombError as e:
        raise ImageReadError(
            f"{path}: {e} (PIL's decompression-bomb limit, PIL.Image.MAX_IMAGE_PIXELS); shrink "
            f"the image, or raise the limit if the file is trusted"
        ) from None
    except Exception:  # a header PIL cannot read: the decoder names the problem
        pass


@contextlib.contextmanager
def _truncated_images_allowed() -> Iterator[None]:
    """PIL's switch (a module global) to decode a truncated file as far as it goes, on for one read."""
    before, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, True
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before


def decode_with_pil(path: Path, raw: bytes) -> Tensor:
    """(3, H, W) uint8 RGB through PIL: torchvision's libpng path crashes the process on some corrupt PNGs, and
    PIL reads BMP and TIFF. A truncated file (an interrupted copy or download) is read as far as it goes, the rest
    filled (JPEG: grey, PNG: black), with a warning naming it, as browsers and OpenCV show it: one damaged photo
    does not stop a run."""
    try:
        with Image.open(io.BytesIO(raw)) as opened:
            try:
                opened.load()
            except OSError as e:
                if "truncated" not in str(e):
                    raise
                with _truncated_images_allowed():
                    opened.load()
                if path not in _truncation_warned:
                    _truncation_warned.add(path)
                    log.warning("%s: the file is truncated (%s); read as far as it goes, the rest filled", path, e)
            image = ImageOps.exif_transpose(opened)
            if image.mode.startswith("I"):  # 16/32-bit gray: the top 8 of 16 bits, as torchvision's to_dtype
                gray = (np.asarray(image).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8)
                array = np.repeat(gray[..., None], 3, axis=2)
            else:
                array = np.asarray(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageReadError(f"{path}: cannot decode the image ({e}); the file may be truncated or not an image") from e
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def image_file_problem(path: Path) -> str | None:
    """What makes ``path`` unreadable, from its first bytes alone (missing, empty, not an image), or None. A file
    with no known format's signature is asked of PIL, which reads the header only."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except FileNotFoundError:
        return "no such file"
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if not head:
        return "empty (0 bytes)"
    if head.startswith(IMAGE_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return None
    try:
        with Image.open(path):
            return None
    except Exception:
        return f"not an image (it starts {head[:8]!r})"


def image_file_problems(paths: Sequence[Path], threads: int = 16) -> dict[int, str]:
    """{index: problem} of the ``paths`` that cannot be read, each checked from its first bytes: a few seconds for
    COCO's 118k files (threads: the time is the file system's)."""
    with ThreadPoolExecutor(threads) as pool:
        return {i: problem for i, problem in enumerate(pool.map(image_file_problem, paths)) if problem is not None}


def clip_boxes(
    boxes: Tensor, height: int, width: int, where: str, per_object: dict[str, Tensor]
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clip xyxy ``boxes`` to the image and drop those left with zero width or height, together with their
    ``per_object`` fields; the drop is logged once with ``where`` (the file) and the count."""
    boxes = boxes.clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    if keep.all():
        return boxes, per_object
    log.warning(
        "%s: dropped %d box(es) of zero width or height inside the %dx%d image",
        where,
        int((~keep).sum()),
        width,
        height,
    )
    return boxes[keep], {k: v[keep] for k, v in per_object.items()}
