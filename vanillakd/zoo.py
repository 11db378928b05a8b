"""The VanillaKD model zoo: the published students (ImageNet-1k, distilled with vanilla KD), plain timm
checkpoints of their architectures."""
from __future__ import annotations

import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .checkpoint import atomic_write, writable_folder
from .errors import UserError

RELEASE = "https://github.com/Hao840/vanillaKD/releases/download/checkpoint"


@dataclass(frozen=True)
class ZooModel:
    name: str
    arch: str
    top1: float
    top5: float
    file: str

    @property
    def url(self) -> str:
        return f"{RELEASE}/{self.file}"


ZOO = {m.name: m for m in (
    ZooModel("resnet50", "resnet50", 83.08, 96.35, "resnet50-83.078.pth"),
    ZooModel("vit_tiny_patch16_224", "vit_tiny_patch16_224", 78.11, 94.26, "vit_tiny_patch16_224-78.106.pth"),
    ZooModel("vit_small_patch16_224", "vit_small_patch16_224", 84.33, 97.09, "vit_small_patch16_224-84.328.pth"),
    ZooModel("convnextv2_tiny", "convnextv2_tiny", 85.03, 97.44, "convnextv2_tiny-85.030.pth"),
)}


def default_dir() -> Path:
    return Path(os.environ.get("VANILLAKD_ZOO_DIR", Path.home() / ".cache" / "vanillakd" / "zoo"))


def get(name: str) -> ZooModel:
    if name not in ZOO:
        raise UserError(f"unknown zoo model {name!r}; choose one of: {', '.join(ZOO)}")
    return ZOO[name]


def local_file(name: str, directory: str | os.PathLike | None = None) -> Path:
    return Path(directory or default_dir()) / get(name).file


def fetch(name: str, directory: str | os.PathLike | None = None, timeout: float = 8.0, progress: bool = True) -> Path:
    """Download a zoo checkpoint (atomically), then check that it loads into its architecture."""
    m = get(name)
    dest = local_file(name, directory)
    if dest.is_file():
        verify(m, dest)
        return dest
    if os.environ.get("VANILLAKD_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise UserError(f"offline (HF_HUB_OFFLINE / VANILLAKD_OFFLINE is set): cannot fetch {m.url}; "
                        f"download it elsewhere and put it at {dest}")
    writable_folder(dest.parent, "zoo folder")  # before the download, not after it
    # into a temp file beside dest (named as every temp of ours, so a killed download is recognisable), renamed
    # into place only once it loads into its architecture
    atomic_write(dest, lambda f: _download(m, f, dest, timeout, progress), check=lambda tmp: verify(m, tmp))
    return dest


def _download(m: ZooModel, f: IO[bytes], dest: Path, timeout: float, progress: bool) -> None:
    """``m``'s file into ``f``. A network failure is a UserError here; a failed write of ``f`` stays an OSError,
    which ``atomic_write`` reports as the write it is (not as a download problem)."""
    def failed(e: BaseException) -> UserError:
        reason = getattr(e, "reason", e)
        return UserError(f"cannot download {m.url} ({reason}); without a network, put the file at {dest}")

    try:
        response = urllib.request.urlopen(m.url, timeout=timeout)
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
        raise failed(e) from None
    with response:
        total = int(response.headers.get("Content-Length") or 0)
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=total or None, unit="B", unit_scale=True, desc=m.file)
        while True:
            try:
                chunk = response.read(1 << 20)
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                raise failed(e) from None
            if not chunk:
                break
            f.write(chunk)
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
        if total and f.tell() != total:
            raise UserError(f"download of {m.url} stopped at {f.tell()} of {total} bytes")


def verify(m: ZooModel, path: Path) -> None:
    """The file must be a complete checkpoint of the zoo model's architecture with a 1000-class head."""
    import timm

    from .weights import load_weights
    load_weights(timm.create_model(m.arch, num_classes=1000), path, what=f"zoo {m.name}")
