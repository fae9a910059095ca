"""Atomic file IO: a file is replaced by a complete new one or left as it was.

A file is written to a hidden temporary name beside it, fsynced and renamed, so a process killed
at any moment leaves the previous complete file in place; ``remove_stale_temporaries`` cleans up
after such a kill.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import zipfile

import torch

logger = logging.getLogger(__name__)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # not supported on every filesystem
    finally:
        os.close(fd)


def _temporary_name(path: str) -> str:
    d, base = os.path.split(path)
    return os.path.join(d, f".{base}.tmp-{os.getpid()}")


def atomic_write(path: str, mode: str, write) -> None:
    """``write(f)`` into a temporary file beside ``path``, fsync, then rename over ``path``."""
    tmp = _temporary_name(path)
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _fsync_dir(os.path.dirname(path))


def atomic_torch_save(obj, path: str) -> None:
    """``torch.save`` that leaves either the previous file or the complete new one."""
    atomic_write(path, "wb", lambda f: torch.save(obj, f))


def atomic_write_text(path: str, text: str) -> None:
    atomic_write(path, "w", lambda f: f.write(text))


def remove_stale_temporaries(save_dir: str) -> list[str]:
    """Delete partial files left by a process killed while saving; return their names."""
    if not os.path.isdir(save_dir):
        return []
    stale = sorted(n for n in os.listdir(save_dir) if n.startswith(".") and ".tmp-" in n)
    for n in stale:
        os.unlink(os.path.join(save_dir, n))
    if stale:
        logger.warning("Removed %d partial file(s) of an interrupted save in %s: %s",
                       len(stale), save_dir, stale)
    return stale


def is_complete_checkpoint(path: str) -> bool:
    """True if ``path`` is a complete ``torch.save`` zip archive (its central directory reads).

    A truncated file has no end-of-archive record. Files in other formats (Detectron2's .pkl) are
    assumed complete.
    """
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return False
    if not path.endswith(".pth"):
        return True
    try:
        with zipfile.ZipFile(path) as z:
            return len(z.namelist()) > 0
    except (zipfile.BadZipFile, OSError):
        return False


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def json_safe(x):
    """``x`` with every non-finite float (an undefined metric: NaN) replaced by None, so that it
    dumps as strict JSON (``null``)."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
