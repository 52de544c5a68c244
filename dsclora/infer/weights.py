"""The default model: released weights downloaded once into a user cache, checksum-pinned."""
import hashlib
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_path


@dataclass(frozen=True)
class RemoteWeights:
    """A published checkpoint: where it lives and the sha256 it must have."""

    name: str
    url: str
    sha256: str
    filename: str


#: DSCF x4 (the DSCLoRA paper's model, NTIRE 2025 Efficient SR winner), as released by its
#: authors (github.com/Yaozzz666/DSCF-SR, MIT license).
DSCF_X4 = RemoteWeights(
    name="dscf_x4",
    url="https://raw.githubusercontent.com/Yaozzz666/DSCF-SR/main/model_zoo/team23_DSCF.pth",
    sha256="239e76bc4e4e738491c3963805c0a79f524400acf5fbde34b2cb1a855dd62cb1",
    filename="dscf_x4_team23.pth",
)


class DownloadError(RuntimeError):
    """Default weights could not be fetched or failed their checksum."""


def cache_dir() -> Path:
    """$DSCLORA_CACHE, else $XDG_CACHE_HOME/dsclora, else ~/.cache/dsclora."""
    if os.environ.get("DSCLORA_CACHE"):
        return Path(os.environ["DSCLORA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dsclora"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(remote: RemoteWeights = DSCF_X4, timeout: float = 60.0) -> Path:
    """Path of ``remote`` in the cache, downloading it first if needed (urllib only).

    The download goes to a temporary file in the cache folder and is moved into place only
    once its sha256 matches; a failed or corrupt download leaves nothing behind.
    """
    target = cache_dir() / remote.filename
    if target.is_file() and sha256_of(target) == remote.sha256:
        return target
    how_to = (f"download {remote.url} yourself and pass it with --weights PATH "
              f"(Python: dsclora.infer.load(PATH)), or place it at {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target, suffix=".part") as tmp:  # a failed download leaves nothing behind
        digest = hashlib.sha256()
        with open(tmp, "wb") as out:
            try:
                with urllib.request.urlopen(remote.url, timeout=timeout) as response:
                    for chunk in iter(lambda: response.read(1 << 20), b""):
                        digest.update(chunk)
                        out.write(chunk)
            except OSError as exc:  # URLError, HTTPError, timeouts
                raise DownloadError(f"cannot download the default {remote.name} weights "
                                    f"from {remote.url}: {exc}; {how_to}") from exc
        if digest.hexdigest() != remote.sha256:
            raise DownloadError(f"the {remote.name} weights downloaded from {remote.url} have "
                                f"sha256 {digest.hexdigest()}, expected {remote.sha256}; {how_to}")
    return target
