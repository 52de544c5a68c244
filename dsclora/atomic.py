"""Atomic file replacement: write a temporary file beside the target, then ``os.replace`` it."""
import contextlib
import os
import stat
import tempfile
import threading
from pathlib import Path

_UMASK_LOCK = threading.Lock()


def _new_file_mode(path: Path) -> int:
    """Permission bits for ``path``: those of the file it replaces, else what ``open`` would give
    a new file (0o666 minus the umask; mkstemp's temporary is 0o600)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        pass
    with _UMASK_LOCK:  # reading the umask means setting it: keep other threads of ours out
        umask = os.umask(0o077)
        os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: Path, *, suffix: str = ".tmp", durable: bool = False):
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds,
    and is removed otherwise (never a partial file under the final name). The result has the
    permissions of the file it replaces, or the umask's for a new file. ``durable`` fsyncs the
    file and its folder, so the replacement also survives a power loss. The folder must exist."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _new_file_mode(path))
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    if durable:
        _fsync_directory(path.parent)


def write_bytes(path: Path, data: bytes, *, suffix: str = ".tmp", durable: bool = False) -> None:
    """Replace ``path`` by ``data`` through ``atomic_path`` (no other temporary file is made:
    serialise to bytes first rather than letting a library write through its own)."""
    with atomic_path(path, suffix=suffix, durable=durable) as tmp:
        tmp.write_bytes(data)


def _fsync_directory(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible on every platform
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
