"""A run's scratch arrays: f's lower-layer states for a whole catalogue, in RAM or in a memory-mapped file.

Item tuning `top` and stage 2's e2e objective read, per step, the inputs of f's last block for the
items the step touches, so every item's states are written once and kept for the run. Held as float32
in RAM they grow as items x positions x hidden x 4 bytes (tens of GB for a catalogue of 100k items);
on disk (`CacheConfig.store` "disk") they are a half-precision file, mapped into memory, that the
kernel pages in and out as the steps read it: anonymous memory stays bounded by a batch.

The file must never outlive its run, whatever ends it. It is named with the owner's process id and
unlinked as soon as it is mapped (POSIX keeps the space until the mapping goes: when the array is
freed, or when the process ends, even by kill -9). Where a file cannot be unlinked while mapped
(Windows) it is removed when the array is freed, and files left by dead processes are removed by the
next run that uses the folder.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import uuid
import weakref
from pathlib import Path

import numpy as np
import torch

from tokensel.config import CacheConfig
from tokensel.errors import TokenselError

PREFIX = "tokensel-blocks-"
_NAME = re.compile(rf"^{PREFIX}(\d+)-[0-9a-f]+\.f16$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's live process
    return True


def remove_stale(folder: Path) -> list[Path]:
    """Remove scratch files in `folder` whose owning process is gone; returns what was removed."""
    removed = []
    for path in folder.glob(f"{PREFIX}*.f16"):
        m = _NAME.match(path.name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def scratch_states(shape: tuple[int, int, int], cache: CacheConfig, what: str) -> torch.Tensor:
    """A zeroed [N, W, d] tensor for f's lower-layer states: float32 in RAM (store "ram", refused past
    half the machine's memory) or float16 in a memory-mapped file in cache.folder() (refused past its
    free disk). Both refusals name the size needed and the way out."""
    need_values = math.prod(shape)
    if cache.store == "ram":
        need, ram = need_values * 4, _physical_memory()
        if ram and need > ram // 2:
            raise TokenselError(
                f"{what}: {shape[0]:,} items x {shape[1]} positions x {shape[2]} floats = {_gib(need)}, more than half of "
                f"this machine's {ram / 2**30:.0f} GiB: use --cache-store disk (half precision, memory-mapped), or shorter texts"
            )
        return torch.zeros(shape)
    folder = cache.folder()
    if not folder.is_dir():
        raise TokenselError(f"cache folder {folder}: no such folder (choose one with --cache-dir)")
    remove_stale(folder)
    need, free = need_values * 2, shutil.disk_usage(folder).free
    if need > free:
        raise TokenselError(
            f"{what}: {shape[0]:,} items x {shape[1]} positions x {shape[2]} half floats need {_gib(need)} of disk in "
            f"{folder}, which has {_gib(free)} free: choose a folder with room with --cache-dir, or shorter texts"
        )
    path = folder / f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}.f16"
    try:
        array = np.memmap(path, dtype=np.float16, mode="w+", shape=shape)
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise TokenselError(f"cache folder {folder}: cannot write the block-input cache there ({exc}); choose another with --cache-dir") from None
    try:
        path.unlink()  # POSIX: the mapping keeps the space until it goes; nothing outlives the process
    except OSError:
        weakref.finalize(array, path.unlink, missing_ok=True)  # a file that cannot be unlinked while open
    return torch.from_numpy(array)

