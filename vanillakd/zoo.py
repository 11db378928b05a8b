"""The VanillaKD model zoo: the published students (ImageNet-1k, distilled with vanilla KD), plain timm
checkpoints of their architectures."""
from __future__ import annotations

import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

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
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(m.url, timeout=timeout) as response, open(tmp, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0)
            bar = None
            if progress:
                from tqdm import tqdm
                bar = tqdm(total=total or None, unit="B", unit_scale=True, desc=m.file)
            while chunk := response.read(1 << 20):
                f.write(chunk)
                if bar is not None:
                    bar.update(len(chunk))
            if bar is not None:
                bar.close()
            if total and f.tell() != total:
                raise UserError(f"download of {m.url} stopped at {f.tell()} of {total} bytes")
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
        tmp.unlink(missing_ok=True)
        reason = getattr(e, "reason", e)
        raise UserError(f"cannot download {m.url} ({reason}); without a network, put the file at {dest}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        verify(m, tmp)
    except UserError:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, dest)
    return dest


def verify(m: ZooModel, path: Path) -> None:
    """The file must be a complete checkpoint of the zoo model's architecture with a 1000-class head."""
    import timm

    from .weights import load_weights
    load_weights(timm.create_model(m.arch, num_classes=1000), path, what=f"zoo {m.name}")
