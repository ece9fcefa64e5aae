"""Encode once, train many times: the disk cache of a dataset's latents and text embeddings,
and the dataset that reads it (host-free).

Latents (one ``encode_images`` call per batch) and text embeddings (per text encoder) are
stored as safetensors under ``cache_dir``, written atomically, keyed by sha256 of (file
content, exact resize size + crop box, ``encoder_key``), so a re-run encodes nothing and an
edited image re-encodes only itself. Random crop vs. cache: one fixed crop would defeat
random cropping and per-step encoding would need the VAE in the loop, so we cache
``crop_variants`` seeded random crops per image (center mode always caches 1) and
`CachedLatentDataset` picks one per sample and epoch (`at(k, epoch)`, seeded: a resumed run
sees the same crops). Validation should use a center-crop view (`ImageDataset.with_crop`).
The cache stores exactly what ``encode_images`` returns (e.g. raw VAE latents, before
``process_latent_in``).
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence, Union

import torch
from safetensors.torch import load_file, save_file

from afa_nodes import logger
from afa_nodes.core.dataset import SHOW_NAMES, ImageDataset
from afa_nodes.core.errors import DatasetError
from afa_nodes.core.files import atomic_write, file_sha256

CACHE_VERSION = "afa-dataset-cache-v1"
Progress = Callable[[int, int], None]  # (done, total)
TextOut = Union[torch.Tensor, Mapping[str, torch.Tensor], Sequence]


def _key(*parts) -> str:
    return hashlib.sha256("|".join(map(str, (CACHE_VERSION,) + parts)).encode()).hexdigest()


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, meta: dict[str, str]) -> None:
    atomic_write(path, lambda tmp: save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
                                             str(tmp), metadata=meta))


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
            raise DatasetError(f"Latent cache has no entries for image(s) {unbuilt[:SHOW_NAMES]}; build it with "
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
