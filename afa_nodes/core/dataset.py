"""Training dataset: folder scan, preprocessing and an encode-once disk cache (host-free).

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

Cache: latents (one ``encode_images`` call per batch) and text embeddings (per text encoder)
are stored as safetensors under ``cache_dir``, written atomically, keyed by sha256 of
(file content, exact resize size + crop box, ``encoder_key``), so a re-run encodes nothing
and an edited image re-encodes only itself. Random crop vs. cache: one fixed crop would
defeat random cropping and per-step encoding would need the VAE in the loop, so we cache
``crop_variants`` seeded random crops per image (center mode always caches 1) and
`CachedLatentDataset` picks one per sample and epoch (`at(k, epoch)`, seeded: a resumed run
sees the same crops). Validation should use a center-crop view (`ImageDataset.with_crop`).
The cache stores exactly what ``encode_images`` returns (e.g. raw VAE latents, before
``process_latent_in``).
"""
from __future__ import annotations

import copy
import csv
import hashlib
import json
import math
import os
import random
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors.torch import load_file, save_file

from afa_nodes import logger
from afa_nodes.core.errors import DatasetError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CACHE_VERSION = "afa-dataset-cache-v1"
_SHOW = 5  # file names listed in log summaries
Progress = Callable[[int, int], None]  # (done, total)
TextOut = Union[torch.Tensor, Mapping[str, torch.Tensor], Sequence]


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
    """First frame, EXIF-transposed, RGB (transparency composited on white)."""
    with Image.open(path) as im:
        im.seek(0)
        im = ImageOps.exif_transpose(im)  # returns a loaded copy
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
            caption = txt.read_text(encoding="utf-8", errors="replace").strip()
        elif p.resolve() in meta:
            caption = meta[p.resolve()]
        else:
            caption = ""
            report.missing_captions += 1
            report.uncaptioned_files.append(str(p.relative_to(folder)))
        entries.append(ImageEntry(p, caption, repeats, size))
    if not entries:
        raise DatasetError(f"None of the {len(paths)} image files in '{folder}' could be read "
                           f"(e.g. {report.corrupt_files[:_SHOW]}). {expect}")
    report.images = len(entries)
    report.repeats = sum(e.repeats for e in entries)
    return entries, report


class ImageDataset(torch.utils.data.Dataset):
    """Preprocessed folder. Sample k (repeats expanded) -> {"image": [H,W,3] float 0..1,
    "caption": str, "index": image index}. H,W = resolution, or the image's bucket."""

    def __init__(self, folder, resolution: int = 512, crop: str = "center", seed: int = 0,
                 bucketing: bool = False, max_ratio: float = 2.0):
        if crop not in ("center", "random"):
            raise DatasetError(f"crop must be 'center' or 'random', got {crop!r}.")
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
            msg.append(f"skipped {r.skipped_corrupt} unreadable file(s) {r.corrupt_files[:_SHOW]}")
        if r.missing_captions:
            msg.append(f"{r.missing_captions} image(s) without caption use an empty caption "
                       f"{r.uncaptioned_files[:_SHOW]}")
        if upscaled:
            msg.append(f"{len(upscaled)} image(s) smaller than the target were upscaled {upscaled[:_SHOW]}")
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
        if crop not in ("center", "random"):
            raise DatasetError(f"crop must be 'center' or 'random', got {crop!r}.")
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


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _key(*parts) -> str:
    return hashlib.sha256("|".join(map(str, (CACHE_VERSION,) + parts)).encode()).hexdigest()


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, meta: dict[str, str]) -> None:
    """safetensors to a temp name in the same folder, then os.replace (never a partial file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _load(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as e:
        raise DatasetError(f"Cache file '{path}' is unreadable ({e}); delete it and rebuild the cache.") from e


@dataclass
class LatentCache:
    files: list[list[Path]]        # [image][variant] -> safetensors with "latent" [C,h,w]; [] = not built
    captions: list[str]            # per image
    repeats: list[int]             # per image
    targets: list[tuple[int, int]]  # per image pixel (w, h); equal targets -> equal latent shapes
    hits: int = 0
    misses: int = 0
    sizes: list[tuple[int, int]] = field(default_factory=list)  # per image original (w, h), post-EXIF
    boxes: list[list[tuple[int, int, int, int]]] = field(default_factory=list)  # [image][variant] crop_box

    def latent(self, i: int, variant: int = 0) -> torch.Tensor:
        return _load(self.files[i][variant])["latent"]


def build_latent_cache(dataset: ImageDataset, encode_images: Callable[[torch.Tensor], torch.Tensor],
                       encoder_key: str, cache_dir, batch_size: int = 4, crop_variants: int = 1,
                       progress: Progress | None = None, indices: Sequence[int] | None = None) -> LatentCache:
    """Encode missing (image, crop) pairs: encode_images([B,H,W,3] 0..1) -> [B,C,h,w].
    Batches hold one target size. `progress(done, misses)` is called after each batch.
    `indices`: only these images (the others get empty rows), e.g. the validation split."""
    variants = 1 if dataset.crop == "center" else max(1, crop_variants)
    wanted = set(range(len(dataset.entries)) if indices is None else indices)
    root = Path(cache_dir) / "latents"
    files, boxes, todo, pending, hits = [], [], {}, set(), 0
    for i, e in enumerate(dataset.entries):
        row, box_row = [], [dataset.crop_box(i, v) for v in range(variants)] if i in wanted else []
        sha = file_sha256(e.path) if box_row else ""
        for v, box in enumerate(box_row):
            p = root / f"{_key('latent', sha, box, e.target, encoder_key)}.safetensors"
            row.append(p)
            if p.exists() or p in pending:
                hits += 1
            else:
                pending.add(p)
                todo.setdefault(e.target, []).append((i, v, p))
        files.append(row)
        boxes.append(box_row)
    misses, done = len(pending), 0
    for jobs in todo.values():
        for s in range(0, len(jobs), batch_size):
            chunk = jobs[s:s + batch_size]
            with torch.no_grad():
                lat = encode_images(torch.stack([dataset.image(i, v) for i, v, _ in chunk]))
            if not isinstance(lat, torch.Tensor) or lat.ndim != 4 or lat.shape[0] != len(chunk):
                raise DatasetError(f"encode_images must return [B,C,h,w] with B={len(chunk)}, got "
                                   f"{getattr(lat, 'shape', type(lat).__name__)} (encoder {encoder_key}).")
            for (i, _, p), one in zip(chunk, lat):
                _atomic_save({"latent": one}, p, {"source": dataset.name(i), "encoder_key": encoder_key})
            done += len(chunk)
            if progress:
                progress(done, misses)
    logger.info("Latent cache '%s': %d hit(s), %d encoded", root, hits, misses)
    return LatentCache(files, dataset.captions, [e.repeats for e in dataset.entries],
                       [e.target for e in dataset.entries], hits, misses,
                       [e.size for e in dataset.entries], boxes)


@dataclass
class TextCache:
    files: dict[str, Path]  # caption -> safetensors (a Tensor result is stored as "cond")
    hits: int = 0
    misses: int = 0

    def get(self, caption: str) -> dict[str, torch.Tensor]:
        return _load(self.files[caption])


def _split_text(out: TextOut, n: int, encoder_key: str) -> list[dict[str, torch.Tensor]]:
    if isinstance(out, (list, tuple)) and len(out) == n:  # one result per caption
        return [dict(o) if isinstance(o, Mapping) else {"cond": o} for o in out]
    batch = dict(out) if isinstance(out, Mapping) else {"cond": out}
    batch = {k: v for k, v in batch.items() if v is not None}
    if not batch or any(not isinstance(v, torch.Tensor) or v.shape[0] != n for v in batch.values()):
        raise DatasetError(f"encode_texts (encoder {encoder_key}) must return a Tensor [B,...], a dict of "
                           f"[B,...] Tensors or a list of B results for B={n} captions.")
    return [{k: v[j] for k, v in batch.items()} for j in range(n)]


def build_text_cache(captions: Sequence[str], encode_texts: Callable[[list[str]], TextOut],
                     encoder_key: str, cache_dir, batch_size: int = 16, include_empty: bool = True,
                     progress: Progress | None = None) -> TextCache:
    """Encode each distinct caption once per encoder. include_empty adds "" (caption dropout)."""
    unique = list(dict.fromkeys(([""] if include_empty else []) + list(captions)))
    root = Path(cache_dir) / "text"
    files = {c: root / f"{_key('text', encoder_key, c)}.safetensors" for c in unique}
    todo = [c for c in unique if not files[c].exists()]
    for s in range(0, len(todo), batch_size):
        chunk = todo[s:s + batch_size]
        with torch.no_grad():
            parts = _split_text(encode_texts(chunk), len(chunk), encoder_key)
        for c, part in zip(chunk, parts):
            _atomic_save(part, files[c], {"encoder_key": encoder_key})
        if progress:
            progress(s + len(chunk), len(todo))
    logger.info("Text cache '%s': %d hit(s), %d encoded", root, len(unique) - len(todo), len(todo))
    return TextCache(files, len(unique) - len(todo), len(todo))


def split_indices(n: int, val_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Deterministic (train, val) image indices; >= 1 val when n >= 2 and val_fraction > 0."""
    if not 0.0 <= val_fraction < 1.0:
        raise DatasetError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    if n < 2 or val_fraction == 0:
        return list(range(n)), []
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    perm = random.Random(seed).sample(range(n), n)
    return sorted(perm[n_val:]), sorted(perm[:n_val])


class CachedLatentDataset(torch.utils.data.Dataset):
    """Sample -> {"latent": [C,h,w], "caption": str, "caption_index": int (into .captions,
    "" is 0), "image_index": int, "text": {model: {key: Tensor}}, "size": original (w, h),
    "crop_box": (resized_w, resized_h, left, top), "target": (w, h)}. `indices` selects
    images (e.g. from split_indices); repeats expand them. With several cached crops per
    image, `at(k, epoch)` picks one from (seed, epoch, k); indexing uses `set_epoch`'s epoch."""

    def __init__(self, latents: LatentCache, text: Mapping[str, TextCache] | None = None,
                 indices: Sequence[int] | None = None, repeats: bool = True, seed: int = 0):
        self.latents, self.text, self.seed, self.epoch = latents, dict(text or {}), seed, 0
        idx = range(len(latents.files)) if indices is None else indices
        self.samples = [i for i in idx for _ in range(latents.repeats[i] if repeats else 1)]
        unbuilt = sorted({i for i in self.samples if not latents.files[i]})
        if unbuilt:
            raise DatasetError(f"Latent cache has no entries for image(s) {unbuilt[:_SHOW]}; build it with "
                               "these images' indices.")
        self.captions = list(dict.fromkeys([""] + latents.captions))
        self._cap = {c: k for k, c in enumerate(self.captions)}
        for name, tc in self.text.items():
            missing = [c for c in latents.captions if c not in tc.files]
            if missing:
                raise DatasetError(f"Text cache '{name}' lacks {len(missing)} caption(s) (e.g. "
                                   f"{missing[0]!r}); build it from this dataset's captions.")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def buckets(self) -> list[tuple[int, int]]:
        """Per sample its target (w, h): samples of one target have one latent shape."""
        return [self.latents.targets[i] for i in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, k: int) -> dict:
        return self.at(k, self.epoch)

    def variant(self, k: int, epoch: int) -> int:
        nv = len(self.latents.files[self.samples[k]])
        return random.Random(f"{self.seed}|{epoch}|{k}").randrange(nv) if nv > 1 else 0

    def at(self, k: int, epoch: int) -> dict:
        i, v = self.samples[k], self.variant(k, epoch)
        cap, lat = self.latents.captions[i], self.latents
        return {"latent": lat.latent(i, v), "caption": cap, "caption_index": self._cap[cap], "image_index": i,
                "text": {n: tc.get(cap) for n, tc in self.text.items()},
                "size": lat.sizes[i] if lat.sizes else None, "crop_box": lat.boxes[i][v] if lat.boxes else None,
                "target": lat.targets[i]}
