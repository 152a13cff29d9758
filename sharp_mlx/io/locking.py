"""One writer per folder: an exclusive lock on an output (or run) folder, taken before any work.

The lock is ``fcntl.flock`` on a hidden file beside the folder (``.NAME.lock``; the folder itself
may not exist yet, it is renamed into place at the end), holding the writer's pid. The kernel drops
a flock when its process dies, so a lock file left by a killed run is free: the next run takes it
over and says whose it was. A second live writer is refused at once, naming the holder's pid.
Locks are reentrant within a process (the pipeline locks what ``train.run_stage`` locks again).
"""

import contextlib
import fcntl
import os
import sys
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Tuple, Union

from ..errors import SharpError

PathLike = Union[str, Path]
_held: Dict[Path, Tuple[int, int]] = {}  # lock file -> (fd, depth) of the locks this process holds


def lock_path(folder: PathLike) -> Path:
    folder = Path(folder).absolute()
    return folder.with_name(f".{folder.name}.lock")


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_pid(fd: int) -> Optional[int]:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 64).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None


def _acquire(path: Path, folder: Path, log: Callable[[str], None]) -> int:
    """An fd holding the flock of ``path`` (created if need be); SharpError if a live process holds it."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise SharpError(
                f"cannot write {folder}: {path.parent} is not writable ({e.strerror}; its lock {path.name} cannot be "
                "made): choose another output folder"
            )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"process {holder}" if holder else "another process"
            raise SharpError(
                f"{folder} is being written by {who} (lock {path}): wait for it to finish, or choose another folder"
            )
        # The file may have been unlinked by its last holder between our open and flock: then retry on the new one.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    previous = _read_pid(fd)
    if previous and previous != os.getpid():
        state = "no longer running" if not pid_alive(previous) else "not holding it"
        log(f"{folder}: took over the lock left by process {previous}, which is {state}")
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, f"{os.getpid()}\n".encode())
    os.fsync(fd)
    return fd


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


@contextlib.contextmanager
def folder_lock(folder: PathLike, log: Callable[[str], None] = _stderr) -> Iterator[Path]:
    """Hold the exclusive lock of ``folder`` (made beside it; its parent is created) for the block."""
    folder = Path(folder)
    path = lock_path(folder)
    if path in _held:
        fd, depth = _held[path]
        _held[path] = (fd, depth + 1)
    else:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SharpError(f"cannot create the folder {path.parent} for {folder} ({e.strerror}): choose another one")
        _held[path] = (_acquire(path, folder, log), 1)
    try:
        yield path
    finally:
        fd, depth = _held[path]
        if depth > 1:
            _held[path] = (fd, depth - 1)
        else:
            del _held[path]
            with contextlib.suppress(OSError):
                path.unlink()  # while still holding it, so no one else can be holding the unlinked file
            os.close(fd)
