"""Training dataset: folder scan and preprocessing (host-free); `encode_cache` encodes it once.

Folder layout (scanned recursively; hidden files/folders such as a cache dir are ignored):
  * images with same-name ``.txt`` captions (kohya); a ``.txt`` wins over metadata;
  * ``metadata.jsonl`` / ``metadata.csv`` with columns ``file_name,text`` (Hugging Face
    imagefolder; ``caption`` is accepted for ``text``), ``file_name`` relative to the
    metadata file's folder;
  * top-level subfolders named ``N_name`` repeat their images N times per epoch.
Images: first frame, EXIF orientation applied, RGB (alpha composited on white), scaled so
the target is covered (upscaling is counted), then cropped to ``resolution`` x ``resolution``
(center, or seeded random crop) or, with ``bucketing``, to the nearest-aspect bucket
(area ~ resolution^2, sides multiples of 64). Items are [H,W,3] float 0..1 (ComfyUI IMAGE).
`split_indices` splits the images into training and validation.
"""
from __future__ import annotations

import copy
import csv
import json
import math
import random
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from afa_nodes import logger
from afa_nodes.core.errors import DatasetError

CROPS = ("center", "random")  # how a training image is cut to its size (validation: always center)
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SHOW_NAMES = 5  # file names (or image indices) listed in log summaries and errors


@dataclass
class DatasetReport:
    images: int = 0            # usable images
    skipped_corrupt: int = 0   # unreadable files skipped
    missing_captions: int = 0  # images given an empty caption
    upscaled: int = 0          # images smaller than their target size
    repeats: int = 0           # samples per epoch after kohya N_ repeats
    corrupt_files: list[str] = field(default_factory=list)
    uncaptioned_files: list[str] = field(default_factory=list)


@dataclass
class ImageEntry:
    path: Path
    caption: str
    repeats: int
    size: tuple[int, int]               # (w, h) after EXIF transpose
    target: tuple[int, int] = (0, 0)    # (w, h) output size


def load_image(path: Path) -> Image.Image:
    """First frame, EXIF-transposed, RGB (transparency composited on white; 16-bit grey scaled
    to 8 bits). A decompression bomb (more pixels than PIL's MAX_IMAGE_PIXELS) is an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            im.seek(0)
            im = ImageOps.exif_transpose(im)  # returns a loaded copy
    if im.mode.startswith("I"):  # 16-bit grey ("I;16*", or "I" holding 0..65535): 8 bits, not clipped
        im = Image.fromarray((np.asarray(im, dtype=np.float64) / 257.0).round().clip(0, 255).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    return im.convert("RGB")


def make_buckets(resolution: int, step: int = 64, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(w, h) buckets: sides multiples of `step`, area <= ~resolution^2, aspect <= max_ratio."""
    area, out = resolution * resolution, set()
    for w in range(step, int(resolution * math.sqrt(max_ratio)) + step + 1, step):
        h = int(area / w) // step * step
        if h >= step and max(w, h) / min(w, h) <= max_ratio + 1e-9:
            out.add((w, h))
    return sorted(out)


def nearest_bucket(size: tuple[int, int], buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """Bucket with the closest log aspect ratio (ties: larger area)."""
    r = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (round(abs(r - math.log(b[0] / b[1])), 9), -b[0] * b[1]))


def to_model_pixels(images: torch.Tensor) -> torch.Tensor:
    """[B,H,W,3] in 0..1 -> [B,3,H,W] in -1..1."""
    return images.permute(0, 3, 1, 2) * 2.0 - 1.0


def _hidden(path: Path, root: Path) -> bool:
    return any(p.startswith(".") for p in path.relative_to(root).parts)


def _read_metadata(folder: Path) -> dict[Path, str]:
    caps: dict[Path, str] = {}
    metas = sorted(folder.rglob("metadata.jsonl")) + sorted(folder.rglob("metadata.csv"))
    for meta in (m for m in metas if not _hidden(m, folder)):
        try:
            with open(meta, encoding="utf-8-sig", newline="") as f:
                if meta.suffix == ".csv":
                    rows = list(csv.DictReader(f))
                else:
                    rows = [json.loads(line) for line in f if line.strip()]
        except (OSError, ValueError) as e:
            raise DatasetError(f"Cannot read '{meta}': {e}. Fix or remove it.") from e
        for row in rows:
            if not isinstance(row, dict) or not row.get("file_name"):
                raise DatasetError(f"'{meta}': every row needs a 'file_name' and a 'text' column.")
            text = row.get("text", row.get("caption"))
            caps[(meta.parent / row["file_name"]).resolve()] = "" if text is None else str(text).strip()
    return caps


def _read_caption(txt: Path, folder: Path) -> str:
    try:
        return txt.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError as e:
        raise DatasetError(f"caption '{txt.relative_to(folder)}' in '{folder}' is not UTF-8 text ({e.reason} at byte "
                           f"{e.start}): save it as UTF-8 (e.g. iconv -f latin1 -t utf-8).") from None


def scan_folder(folder: Path) -> tuple[list[ImageEntry], DatasetReport]:
    """Readable images with captions/repeats; sizes are post-EXIF. Targets are left unset."""
    folder = Path(folder)
    expect = (f"Expected image files ({', '.join(IMAGE_EXTS)}) with same-name .txt captions, or a "
              f"metadata.jsonl/metadata.csv with columns file_name,text; kohya repeat subfolders "
              f"like '10_name' are supported.")
    if not folder.is_dir():
        raise DatasetError(f"Dataset folder '{folder}' does not exist or is not a folder. {expect}")
    meta = _read_metadata(folder)
    paths = sorted(p for p in folder.rglob("*")
                   if p.suffix.lower() in IMAGE_EXTS and p.is_file() and not _hidden(p, folder))
    if not paths:
        raise DatasetError(f"No images found in dataset folder '{folder}'. {expect}")
    entries, report = [], DatasetReport()
    for p in paths:
        try:
            size = load_image(p).size
        except Exception:  # any decoder failure means "unreadable": skip and count
            report.skipped_corrupt += 1
            report.corrupt_files.append(str(p.relative_to(folder)))
            continue
        parts = p.relative_to(folder).parts
        m = re.match(r"^(\d+)_.", parts[0]) if len(parts) > 1 else None
        repeats = max(1, int(m.group(1))) if m else 1
        txt = p.with_suffix(".txt")
        if txt.is_file():
            caption = _read_caption(txt, folder)
        elif p.resolve() in meta:
            caption = meta[p.resolve()]
        else:
            caption = ""
            report.missing_captions += 1
            report.uncaptioned_files.append(str(p.relative_to(folder)))
        entries.append(ImageEntry(p, caption, repeats, size))
    if not entries:
        raise DatasetError(f"None of the {len(paths)} image files in '{folder}' could be read "
                           f"(e.g. {report.corrupt_files[:SHOW_NAMES]}). {expect}")
    report.images = len(entries)
    report.repeats = sum(e.repeats for e in entries)
    return entries, report


class ImageDataset(torch.utils.data.Dataset):
    """Preprocessed folder. Sample k (repeats expanded) -> {"image": [H,W,3] float 0..1,
    "caption": str, "index": image index}. H,W = resolution, or the image's bucket."""

    def __init__(self, folder, resolution: int = 512, crop: str = "center", seed: int = 0,
                 bucketing: bool = False, max_ratio: float = 2.0):
        _check_crop(crop)
        if resolution < 8 or resolution % 8:
            raise DatasetError(f"resolution {resolution} must be a positive multiple of 8 (VAE).")
        self.folder, self.resolution, self.crop, self.seed = Path(folder), resolution, crop, seed
        self.entries, self.report = scan_folder(self.folder)
        self.buckets = make_buckets(resolution, max_ratio=max_ratio) if bucketing else [(resolution,) * 2]
        if not self.buckets:
            raise DatasetError(f"Bucketing needs resolution >= 64 (got {resolution}).")
        upscaled = []
        for i, e in enumerate(self.entries):
            e.target = nearest_bucket(e.size, self.buckets) if bucketing else (resolution, resolution)
            if e.size[0] < e.target[0] or e.size[1] < e.target[1]:
                upscaled.append(self.name(i))
        self.report.upscaled = len(upscaled)
        self.samples = [i for i, e in enumerate(self.entries) for _ in range(e.repeats)]
        self._log_summary(upscaled)

    def _log_summary(self, upscaled: list[str]) -> None:
        r, msg = self.report, []
        if r.skipped_corrupt:
            msg.append(f"skipped {r.skipped_corrupt} unreadable file(s) {r.corrupt_files[:SHOW_NAMES]}")
        if r.missing_captions:
            msg.append(f"{r.missing_captions} image(s) without caption use an empty caption "
                       f"{r.uncaptioned_files[:SHOW_NAMES]}")
        if upscaled:
            msg.append(f"{len(upscaled)} image(s) smaller than the target were upscaled {upscaled[:SHOW_NAMES]}")
        head = f"Dataset '{self.folder}': {r.images} image(s), {r.repeats} sample(s) per epoch"
        (logger.warning if msg else logger.info)("; ".join([head] + msg))

    def name(self, i: int) -> str:
        return self.entries[i].path.relative_to(self.folder).as_posix()

    @property
    def captions(self) -> list[str]:
        return [e.caption for e in self.entries]

    def crop_box(self, i: int, variant: int = 0) -> tuple[int, int, int, int]:
        """(resized_w, resized_h, left, top) for image i; random crops seeded by (seed, name, variant)."""
        (w, h), (tw, th) = self.entries[i].size, self.entries[i].target
        s = max(tw / w, th / h)
        rw, rh = max(tw, round(w * s)), max(th, round(h * s))
        if self.crop == "center":
            return rw, rh, (rw - tw) // 2, (rh - th) // 2
        rng = random.Random(f"{self.seed}|{self.name(i)}|{variant}")
        return rw, rh, rng.randint(0, rw - tw), rng.randint(0, rh - th)

    def with_crop(self, crop: str) -> "ImageDataset":
        """The same scanned images with another crop mode (no rescan), e.g. center for validation."""
        _check_crop(crop)
        view = copy.copy(self)
        view.crop = crop
        return view

    def image(self, i: int, variant: int = 0) -> torch.Tensor:
        """Image i -> [H,W,3] float32 0..1."""
        (tw, th), (rw, rh, left, top) = self.entries[i].target, self.crop_box(i, variant)
        try:
            im = load_image(self.entries[i].path)
        except Exception as e:
            raise DatasetError(f"Cannot read '{self.entries[i].path}' any more ({e}); rescan the folder.") from e
        im = im.resize((rw, rh), Image.Resampling.LANCZOS).crop((left, top, left + tw, top + th))
        return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, k: int) -> dict:
        i = self.samples[k]
        return {"image": self.image(i), "caption": self.entries[i].caption, "index": i}


def _check_crop(crop: str) -> None:
    if crop not in CROPS:
        raise DatasetError(f"crop must be one of {', '.join(CROPS)}, got {crop!r}.")


def split_indices(n: int, val_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Deterministic (train, val) image indices; >= 1 val when n >= 2 and val_fraction > 0."""
    if not 0.0 <= val_fraction < 1.0:
        raise DatasetError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    if n < 2 or val_fraction == 0:
        return list(range(n)), []
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    perm = random.Random(seed).sample(range(n), n)
    return sorted(perm[n_val:]), sorted(perm[:n_val])
