"""The studio's checkpoint cache: loaded checkpoints kept across requests and across modes.

Every generation (the ensemble in any mode, each expert alone, the block-wise average of
compare mode) takes its checkpoints from here, so a checkpoint is loaded once while it stays
cached. The cache holds at most `capacity` checkpoints (least recently used go first; the
ones the current request needs always stay), a file changed on disk (size or mtime) is
loaded again, and `entries()` / `clear()` back the UI's cache panel. LoRAs are applied per
request on clones (service.models.with_loras): the cached checkpoints stay as loaded. DiT split
files are cached file by file (each diffusion model, the text encoder(s) with their type, the VAE:
an entry each), so an ensemble of diffusion models sharing one text encoder and VAE loads each once.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from .. import logger
from ..core.errors import AFAError
from ..core.spec import MAX_MODELS
from ..service import models, split_files

DEFAULT_CAPACITY = MAX_MODELS  # one full ensemble


@dataclass
class CacheEntry:
    name: str
    fingerprint: str
    value: object      # a models.Checkpoint (checkpoints, diffusion models), a CLIP or a VAE
    bytes: int


class CheckpointCache:
    def __init__(self, capacity: int = DEFAULT_CAPACITY):
        if int(capacity) < 1:
            raise AFAError(f"the checkpoint cache must hold at least 1 checkpoint, got {capacity}.")
        self.capacity = int(capacity)
        self.loads = 0     # checkpoint (and split) files read since the studio started
        self.hits = 0      # checkpoints served from memory
        self._entries: OrderedDict = OrderedDict()   # key -> CacheEntry, least recently used first
        self._lock = threading.Lock()

    def checkpoints(self, names: list) -> list:
        """The loaded checkpoints for `names` (in order, repeats allowed), loading the missing ones."""
        with self._lock:
            out = {name: self._get(name, name, models.files_fingerprint("checkpoints", [name]),
                                   lambda n=name: models.load_checkpoint(n), models.checkpoint_bytes)
                   for name in dict.fromkeys(names)}
            self._evict(keep=set(out))
            return [out[name] for name in names]

    def split_files(self, split) -> tuple:
        """DiT split files (catalog.SplitFiles) -> (a Checkpoint per diffusion model, in order, sharing
        the text encoder and the VAE; the text encoder type used), each file loaded once while cached."""
        with self._lock:
            used = set()

            def cached(folder, names, clip_type, load):
                key = (folder, tuple(names), clip_type)
                used.add(key)
                return self._get(key, split_files.file_label(folder, names, clip_type),
                                 models.files_fingerprint(folder, names), load, split_files.loaded_bytes)
            try:
                return split_files.load_split_files(list(split.diffusion_models), list(split.text_encoders),
                                                    split.vae, split.clip_type, cached)
            finally:
                self._evict(keep=used)

    def _get(self, key, name: str, fingerprint: str, load, size):
        """The cached value of `key`, or load() (also when the file changed on disk)."""
        entry = self._entries.get(key)
        if entry is not None and entry.fingerprint == fingerprint:
            self.hits += 1
            self._entries.move_to_end(key)
            return entry.value
        self._entries.pop(key, None)  # changed on disk: drop the old copy before loading
        value = load()
        self.loads += 1
        entry = CacheEntry(name, fingerprint, value, size(value))
        self._entries[key] = entry
        logger.info("AFA Studio: loaded %s (%.0f MB) into the checkpoint cache", name, entry.bytes / 2**20)
        return value

    def _evict(self, keep: set):
        for key in [k for k in self._entries if k not in keep]:
            if len(self._entries) <= self.capacity:
                break
            logger.info("AFA Studio: %s left the checkpoint cache (capacity %d)", self._entries.pop(key).name,
                        self.capacity)

    def entries(self) -> list:
        """[(name, MB)] most recently used first."""
        with self._lock:
            return [(e.name, round(e.bytes / 2**20, 1)) for e in reversed(self._entries.values())]

    def clear(self) -> int:
        """Forget every cached checkpoint (ComfyUI frees them once no model uses them); returns how many."""
        with self._lock:
            count = len(self._entries)
            self._entries.clear()
        if count:
            models.free_memory()
        return count

    def summary(self) -> str:
        entries = self.entries()
        total = sum(mb for _, mb in entries)
        listed = ", ".join(f"{name} ({mb:.0f} MB)" for name, mb in entries) or "nothing loaded"
        return (f"Model cache: {len(entries)}/{self.capacity} files (checkpoints, or diffusion models, text encoders "
                f"and VAEs), {total:.0f} MB: {listed}. "
                f"{self.loads} loaded from disk, {self.hits} served from memory.")
