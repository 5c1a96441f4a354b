"""Decoding and augmentation, one sample at a time, driven by an explicit per-sample RNG.

Every random choice comes from ``random.Random`` seeded by the sample's place in the stream, so a resumed run
draws the same crops as an uninterrupted one, whatever worker or process decodes the sample. Output is a uint8
CHW tensor; scaling to [0,1] happens on the device (4x fewer bytes through the loader and the host copy).

ImageNet training crops use PIL's JPEG draft mode: the DCT decodes at 1/2, 1/4 or 1/8 scale when the crop that
follows would shrink the image anyway, never below the output resolution of the crop. Same crop, same output size.
Evaluation decodes at full size and reproduces torchvision's Resize(256) + CenterCrop(224) pixel for pixel, the
preprocessing RobustBench's ImageNet numbers are measured with.
"""

from __future__ import annotations

import io
import math
import random
from typing import Literal

import torch
from PIL import Image

Augment = Literal["none", "cifar", "imagenet"]


def _to_tensor(img: Image.Image) -> torch.Tensor:
    h, w = img.height, img.width
    c = len(img.getbands())
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(h, w, c).permute(2, 0, 1)


def _rrc_box(
    rng: random.Random, w: int, h: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, drawn from ``rng``."""
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw = int(round(math.sqrt(target_area * aspect)))
        ch = int(round(math.sqrt(target_area / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            x0 = rng.randint(0, w - cw)
            y0 = rng.randint(0, h - ch)
            return x0, y0, cw, ch
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    return (w - cw) // 2, (h - ch) // 2, cw, ch


def _resize_center_crop(img: Image.Image, size: int, crop_pct: float = 0.875) -> Image.Image:
    """Evaluation: the short side resized to ``floor(size / crop_pct)`` (256 for 224), then the center ``size`` x
    ``size`` crop, pixel for pixel as torchvision's ``Resize(256)`` + ``CenterCrop(224)`` on a PIL image (RobustBench's
    ImageNet protocol, timm's eval transform). The full-size decode is kept: a reduced-scale one would shift it."""
    w, h = img.size
    short = math.floor(size / crop_pct)
    if w <= h:
        nw, nh = short, int(short * h / w)
    else:
        nw, nh = int(short * w / h), short
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BILINEAR)
    left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def _crop_resize(img: Image.Image, box: tuple[int, int, int, int], size: int) -> Image.Image:
    x0, y0, cw, ch = box
    if img.format == "JPEG":
        # Decode at reduced scale where the crop still keeps >= size pixels per side.
        full_w, full_h = img.size
        want = (max(1, math.ceil(full_w * size / cw)), max(1, math.ceil(full_h * size / ch)))
        img.draft(img.mode if img.mode in ("RGB", "L") else "RGB", want)
        sx, sy = img.size[0] / full_w, img.size[1] / full_h
        box_f = (x0 * sx, y0 * sy, (x0 + cw) * sx, (y0 + ch) * sy)
    else:
        box_f = (x0, y0, x0 + cw, y0 + ch)
    return img.resize((size, size), Image.BILINEAR, box=box_f)


def decode(
    data: bytes,
    *,
    channels: int,
    augment: Augment,
    train: bool,
    image_size: int,
    rng: random.Random | None,
) -> torch.Tensor:
    if not data:
        raise ValueError("the sample has no image member (.jpg, .jpeg, .png or .webp)")
    img = Image.open(io.BytesIO(data))
    mode = "L" if channels == 1 else "RGB"
    if augment == "imagenet":
        if train:
            img = _crop_resize(img, _rrc_box(rng, *img.size), image_size)
        else:
            img = _resize_center_crop(img, image_size)
        if img.mode != mode:
            img = img.convert(mode)
        out = _to_tensor(img)
        if train and rng.random() < 0.5:
            out = out.flip(-1)
        return out

    if img.mode != mode:
        img = img.convert(mode)
    if image_size and img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.BILINEAR)
    out = _to_tensor(img)
    if augment == "cifar" and train:
        # RandomCrop(size, padding=4) with zero fill, then horizontal flip (Fast AT / Madry CIFAR recipe).
        pad = 4
        _, h, w = out.shape
        padded = torch.zeros((out.shape[0], h + 2 * pad, w + 2 * pad), dtype=out.dtype)
        padded[:, pad : pad + h, pad : pad + w] = out
        y0, x0 = rng.randint(0, 2 * pad), rng.randint(0, 2 * pad)
        out = padded[:, y0 : y0 + h, x0 : x0 + w]
        if rng.random() < 0.5:
            out = out.flip(-1)
        out = out.contiguous()
    return out
