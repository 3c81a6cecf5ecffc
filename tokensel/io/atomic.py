"""Atomic output files: write `.<name>.tmp-<pid>` beside the target, rename only when complete.

One mechanism for every file tokensel writes, so that a failure (bad input, disk full, a read-only
folder, Ctrl-C) leaves the target as it was and no partial file behind, and a process killed with
SIGKILL (which runs no cleanup) leaves only a temporary file that the next run for the same target
removes. Every OSError becomes a TokenselError naming the target.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from tokensel.errors import TokenselError


def os_error(path: Path, exc: OSError, doing: str = "write") -> TokenselError:
    """One message for a filesystem failure, naming the file and saying what the user can do."""
    hint = {
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is exceeded",
        errno.EROFS: f"the folder {path.parent} is on a read-only file system",
        errno.EACCES: f"no permission to write in {path.parent}",
        errno.EPERM: f"no permission to write in {path.parent}",
    }.get(exc.errno, exc.strerror or str(exc))
    return TokenselError(f"{path}: cannot {doing} it ({hint})")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(path: Path) -> list[Path]:
    """Remove temporary files of earlier runs for `path` whose process is gone (killed runs)."""
    removed = []
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            try:
                tmp.unlink()
                removed.append(tmp)
            except OSError:
                pass
    return removed


class AtomicTarget:
    """The temporary path for `path`; `commit()` renames it onto `path`, `discard()` removes it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise os_error(self.path, exc, "create the folder for") from None
        remove_stale_temps(self.path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")

    def commit(self) -> None:
        try:
            os.replace(self.tmp, self.path)
        except OSError as exc:
            self.discard()
            raise os_error(self.path, exc) from None

    def discard(self) -> None:
        try:
            self.tmp.unlink(missing_ok=True)
        except OSError:
            pass
