"""Files, the one home of hashing and atomic writing (aggregators, resume state, caches, PNGs).

`atomic_write` never leaves a half-written file in place of a good one: it writes a temp
file beside the target and renames it over the target only when the write succeeded; a write
that fails (a full disk) raises FileWriteError naming the file and the reason. A process
killed mid-write leaves only its temp file, which `remove_stale_temps` clears.
"""
from __future__ import annotations

import functools
import hashlib
import os
import tempfile
import threading
from pathlib import Path

from .errors import FileWriteError

_hash_cache: dict = {}
_umask_lock = threading.Lock()


def file_sha256(path) -> str:
    """sha256 of a file, cached by (path, inode, size, mtime, ctime): a file replaced or rewritten
    changes its ctime even when its size and mtime are put back (cp -p, rsync -t), so the cache
    never answers for old content."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _hash_cache:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
        _hash_cache[key] = digest.hexdigest()
    return _hash_cache[key]


@functools.lru_cache(maxsize=1)
def process_umask() -> int:
    """The process umask, read once on first use: from /proc where it can be read without
    changing it; else by setting and restoring it under a lock."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    with _umask_lock:
        umask = os.umask(0o022)
        os.umask(umask)
    return umask


def atomic_write(path, write) -> Path:
    """Call write(tmp_path) for a temp file beside `path`, then rename it over `path`; a crash or a
    full disk leaves the previous file untouched. The file gets normal (umask) permissions."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise _write_error(path, e) from e
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~process_umask())  # mkstemp makes 0600
        os.replace(tmp, path)
    except OSError as e:
        raise _write_error(path, e) from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def _write_error(path: Path, e: OSError) -> FileWriteError:
    kept = "the previous file is unchanged" if path.exists() else "nothing was written"
    return FileWriteError(f"cannot write {path}: {e.strerror or e} (errno {e.errno}); {kept}. "
                          "Free disk space or choose another folder, then retry.")


def remove_stale_temps(path) -> list:
    """Delete the temp files an atomic_write of `path` left behind when its process was killed
    mid-write; returns their names. Call it only where no other process writes `path`."""
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(_temp_prefix(path) + "*.tmp"):
        try:
            tmp.unlink()
            removed.append(tmp.name)
        except OSError:
            pass
    return removed
