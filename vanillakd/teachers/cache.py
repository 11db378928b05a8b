"""Teacher-output cache: the teacher's logits for every batch of a replayable training stream, so that later
runs (other students, methods, loss weights) train without running the teacher.

Why it stays correct under strong augmentation: the stream (data/stream.py) derives every sample's
augmentation and every batch's mixup / cutmix / random erasing from (seed, rank, epoch, position), so the
batch a run sees at (epoch, step) is a pure function of the flags recorded in the manifest. A run whose
stream flags differ is refused up front; each cached batch also carries a fingerprint of its input and
target, checked on the device (read at log points), which catches what flags cannot (files changed on disk).

Layout of a cache folder::

    manifest.json                    what the stream depends on, the storage format, finished epochs
    val_top1.npy                     the teacher's top-1 class of each val image (for the agreement metric)
    epoch0003-rank0/values.npy       top-k: (steps, B, k) log-probabilities, float16
                    indices.npy      top-k: (steps, B, k) class indices, int16 (int32 beyond 32767 classes)
                    lse.npy          top-k: (steps, B) logsumexp of the logits, float32
                    tail.npy         top-k: (steps, B) probability mass outside the top k, float32
                    logits.npy       full: (steps, B, C) logits, float32 (or float16)
                    fingerprint.npy  (steps, B, 2) float32: mean of the input, label checksum

An epoch folder is written under a temporary name and renamed when complete, so a cache interrupted midway
holds only whole epochs and the same command continues it.

Top-k reconstruction: the k stored classes get ``log p_i + lse`` (their exact logits up to float16 rounding
of ``log p_i``), every other class the same logit carrying the remaining probability mass ``m = 1 - sum_topk
p_i``, computed in float32 before rounding and stored, at temperature 1. So at T = 1 the teacher's distribution
p' differs from p, per sample, by ``||p' - p||_1 <= 2 m [C - k > 1] + 2 S + 2^-21 (|lse| + 1)`` with
``S = sum_topk p_i (exp(2^-11 |log p_i|) - 1)`` (float16 rounding, counted once in the kept classes and once in
the normalisation) and the last term float32 rounding of ``log p_i + lse``. Because the gradient of
``KL(p || softmax(z_s))`` with respect to the student's logits is ``softmax(z_s) - p``, the KD gradient per
sample differs by exactly ``p - p'``: at most that bound in L1. The cache measures ``||p' - p||_1`` (at T = 1
and at the run's ``--temperature``) while it is written and records mean / max in the manifest.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..checkpoint import atomic_write, os_reason
from ..config import TeacherConfig
from ..errors import UserError

MANIFEST = "manifest.json"
VAL_TOP1 = "val_top1.npy"  # the teacher's top-1 class per val image, in the eval loader's order
FORMAT_VERSION = 1
# input fingerprints agree to ~1e-6 between devices and worker counts; a different image or crop moves the
# per-sample mean by far more than this
FINGERPRINT_TOL = 1e-3
DTYPES = ("float16", "float32")
# what to do about a damaged manifest (re-running cache-teacher rewrites a damaged epoch, not the manifest)
REBUILD = "delete the cache folder and write it again with `vanillakd cache-teacher`"
# what to do about a damaged epoch or val file: the same command checks every finished epoch and rewrites those
# that are damaged
RECACHE = "re-run the `vanillakd cache-teacher` command that wrote the cache: it rewrites what is damaged"

# the flags that decide which batch a run sees at (epoch, step); `data_config`, the training-file list and the
# world size are recorded beside them
STREAM_FLAGS = ("batch_size", "seed", "no_aug", "scale", "ratio", "hflip", "vflip", "color_jitter", "aa",
                "aug_repeats", "reprob", "remode", "recount", "mixup", "cutmix", "cutmix_minmax", "mixup_prob",
                "mixup_switch_prob", "mixup_mode", "mixup_off_epoch", "train_interpolation", "max_train_steps",
                "data_pipeline", "dataset", "train_split", "epoch_repeats")
# what a manifest written before a flag existed means by its absence (such caches stay usable)
STREAM_DEFAULTS = {"dataset": "", "train_split": "train", "epoch_repeats": 0.0}


def file_digest(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def samples_digest(samples: list[tuple[str, int]], root: str | os.PathLike) -> str:
    """The training files (relative to the split folder) and their labels: moving the data keeps the digest."""
    h = hashlib.sha256()
    for path, target in samples:
        h.update(f"{os.path.relpath(path, root)}\t{target}\n".encode())
    return h.hexdigest()


def stream_description(flags: Mapping[str, Any], data_config: dict, train_files: str, train_images: int,
                       world_size: int, steps: int, num_classes: int, streaming: bool = False) -> dict[str, Any]:
    """Everything the training stream depends on, as plain JSON values. ``flags``: the run's flag values by
    name (``RunConfig.flags``); ``train_files``: the training split's identity (``SplitDataset.identity``);
    streamed shards' order also depends on the loader's worker count."""
    desc = {k: _plain(flags.get(k, STREAM_DEFAULTS.get(k))) for k in STREAM_FLAGS}
    desc.update(data_config={k: _plain(data_config[k]) for k in ("input_size", "mean", "std", "interpolation")},
                train_files=train_files, train_images=train_images, world_size=world_size,
                steps_per_epoch=steps, num_classes=num_classes)
    if streaming:
        desc["workers"] = flags["workers"]
    return desc


def teacher_description(teacher: TeacherConfig) -> dict[str, Any]:
    return {"name": teacher.name, "weights_sha256": file_digest(teacher.weights) if teacher.weights else None,
            "resize": teacher.resize, "norm": teacher.norm}


def teacher_difference(cached: dict, run: dict, compare_weights: bool = True) -> list[str]:
    """'teacher ...: cache X, run Y' for each way the run's teacher differs from the cache's; the weights file
    only when ``compare_weights`` (a training run need not name the file the cache was made with)."""
    diff = []
    if cached.get("name") != run["name"]:
        diff.append(f"teacher: cache {cached.get('name')}, run {run['name']}")
    if compare_weights and cached.get("weights_sha256") != run["weights_sha256"]:
        diff.append("teacher weights: --teacher-pretrained is not the file the cache was written with")
    diff += [f"teacher {k}: cache {cached.get(k)}, run {run[k]}" for k in ("resize", "norm")
             if cached.get(k) != run[k]]
    return diff


def _plain(v):
    """Tuples as lists, as JSON reads them back (numbers are compared as numbers, so 1 == 1.0)."""
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def describe_difference(cached: dict, wanted: dict) -> list[str]:
    """'key: cache X, run Y' for each differing key (numbers compared as numbers)."""
    out = []
    for key in sorted(set(cached) | set(wanted)):
        a, b = cached.get(key, STREAM_DEFAULTS.get(key)), wanted.get(key, STREAM_DEFAULTS.get(key))
        if json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True) and not _num_equal(a, b):
            if key == "train_files":
                out.append("train_files: the training images or their labels differ")
            else:
                out.append(f"{key}: cache {json.dumps(a)}, run {json.dumps(b)}")
    return out


def _num_equal(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return all(_num_equal(x, y) or x == y for x, y in zip(a, b))
    return False


def read_manifest(root: str | os.PathLike) -> dict:
    path = Path(root) / MANIFEST
    if not Path(root).is_dir():
        raise UserError(f"--teacher-cache {root} does not exist")
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"--teacher-cache {root} has no {MANIFEST}: not a teacher cache, or one still being "
                        "started") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg}); the cache is damaged: {REBUILD}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path} ({getattr(e, 'strerror', None) or e}); the cache is damaged: "
                        f"{REBUILD}") from None
    problem = _manifest_problem(manifest)
    if problem:
        raise UserError(f"{path} is damaged ({problem}): {REBUILD}")
    if manifest.get("version") != FORMAT_VERSION:
        raise UserError(f"--teacher-cache {root}: format version {manifest.get('version')}, this vanillakd reads "
                        f"{FORMAT_VERSION}")
    return manifest


def _manifest_problem(manifest: object) -> str | None:
    """What a manifest lacks that every reader relies on (None: nothing)."""
    if not isinstance(manifest, dict):
        return f"it holds a JSON {type(manifest).__name__}, not an object"
    for key in ("stream", "storage"):
        if not isinstance(manifest.get(key), dict):
            return f"no {key!r} section"
    if not isinstance(manifest["stream"].get("num_classes"), int):
        return "no stream.num_classes"
    if not isinstance(manifest["storage"].get("topk"), int) or manifest["storage"].get("dtype") not in DTYPES:
        return "no valid storage.topk / storage.dtype"
    if not isinstance(manifest.get("epochs_done", []), list):
        return "epochs_done is not a list"
    return None


def write_manifest(root: str | os.PathLike, manifest: dict) -> None:
    atomic_write(Path(root) / MANIFEST, lambda f: f.write((json.dumps(manifest, indent=2) + "\n").encode()))


def save_val_predictions(root: str | os.PathLike, top1: torch.Tensor) -> None:
    atomic_write(Path(root) / VAL_TOP1, lambda f: np.save(f, top1.cpu().numpy().astype(np.int64)))


def epoch_dir(root: str | os.PathLike, epoch: int, rank: int) -> Path:
    return Path(root) / f"epoch{epoch:04d}-rank{rank}"


def input_fingerprint(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, 2): each sample's input mean and a label checksum (sum_c c * y_c for soft targets)."""
    if target.ndim == 2:
        label = (target.float() * torch.arange(target.shape[1], device=target.device, dtype=torch.float32)).sum(1)
    else:
        label = target.float()
    return torch.stack([x.float().mean(dim=(1, 2, 3)), label], dim=1)


@dataclass
class Storage:
    topk: int            # 0: full logits
    dtype: str           # 'float16' | 'float32' (values / logits)
    num_classes: int
    batch_size: int
    steps: int

    @property
    def full(self) -> bool:
        return self.topk == 0 or self.topk >= self.num_classes

    def arrays(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        s, b, c = self.steps, self.batch_size, self.num_classes
        shapes: dict[str, tuple[tuple[int, ...], Any]] = {"fingerprint": ((s, b, 2), np.float32)}
        if self.full:
            shapes["logits"] = ((s, b, c), np.dtype(self.dtype))
        else:
            index_dtype = np.int16 if c <= np.iinfo(np.int16).max else np.int32
            shapes.update(values=((s, b, self.topk), np.dtype(self.dtype)), indices=((s, b, self.topk), index_dtype),
                          lse=((s, b), np.float32), tail=((s, b), np.float32))
        return shapes

    def bytes_per_sample(self) -> int:
        return sum(int(np.prod(shape[2:], dtype=np.int64)) * np.dtype(dt).itemsize
                   for shape, dt in self.arrays().values())


def manifest_storage(manifest: dict, steps_and_batch: tuple[int, ...] = ()) -> Storage:
    """The storage format a (checked) manifest records; the steps and batch size from ``steps_and_batch`` (an
    epoch's fingerprint shape) where the manifest lacks them."""
    stream, storage = manifest["stream"], manifest["storage"]
    found = list(steps_and_batch[:2]) + [0, 0]
    return Storage(topk=int(storage["topk"]), dtype=str(storage["dtype"]), num_classes=int(stream["num_classes"]),
                   batch_size=int(stream.get("batch_size", found[1])),
                   steps=int(stream.get("steps_per_epoch", found[0])))


class CacheDamaged(UserError):
    """A cache file that cannot be what the manifest says it is (truncated, missing, another shape)."""

    def __init__(self, path: Path, problem: str):
        super().__init__(f"teacher cache file {path} is damaged ({problem}): {RECACHE}")
        self.what = f"{path} is damaged ({problem})"


def open_array(path: Path, shape: tuple[int, ...] | None, dtype: Any) -> np.ndarray:
    """The .npy file at ``path``, memory-mapped, refused with ``CacheDamaged`` unless it is a whole array of
    ``shape`` (None: any) and ``dtype``."""
    if not path.is_file():
        raise CacheDamaged(path, "missing")
    size = path.stat().st_size
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CacheDamaged(path, f"truncated or unreadable: {size} bytes, {reason}") from None
    if arr.dtype != np.dtype(dtype) or (shape is not None and arr.shape != tuple(shape)):
        want = f"{np.dtype(dtype)} {tuple(shape)}" if shape is not None else str(np.dtype(dtype))
        raise CacheDamaged(path, f"it holds {arr.dtype} {arr.shape}, the cache's format is {want}")
    if size != arr.offset + arr.nbytes:
        raise CacheDamaged(path, f"{size} bytes where its array takes {arr.offset + arr.nbytes}")
    return arr


def open_epoch(folder: Path, manifest: dict) -> dict[str, np.ndarray]:
    """An epoch folder's arrays, memory-mapped, each checked against the format the manifest records."""
    fingerprint = open_array(folder / "fingerprint.npy", None, np.float32)
    storage = manifest_storage(manifest, fingerprint.shape)
    return {name: open_array(folder / f"{name}.npy", shape, dtype) for name, (shape, dtype) in storage.arrays().items()}


def epoch_problem(folder: Path, manifest: dict) -> str | None:
    """Why a finished epoch folder cannot be read (None: it can)."""
    try:
        open_epoch(folder, manifest)
    except CacheDamaged as e:
        return e.what
    return None


def val_problem(root: str | os.PathLike, manifest: dict) -> str | None:
    """Why the cached val predictions cannot be read (None: they can, or there are none)."""
    val = manifest.get("val")
    if not val:
        return None
    try:
        open_array(Path(root) / VAL_TOP1, None, np.int64)  # its length: the images the eval loader served
    except CacheDamaged as e:
        return e.what
    return None


def encode(logits: torch.Tensor, storage: Storage) -> dict[str, np.ndarray]:
    """One batch's logits in the storage format (host arrays)."""
    z = logits.detach().float()
    if storage.full:
        return {"logits": z.to(getattr(torch, storage.dtype)).cpu().numpy()}
    lse = torch.logsumexp(z, dim=1)
    values, indices = torch.topk(z - lse[:, None], storage.topk, dim=1)
    # the tail mass from the float32 values: rounding the kept values must not move mass into the tail
    tail = (1.0 - values.exp().sum(1)).clamp_min(0.0)
    return {"values": values.to(getattr(torch, storage.dtype)).cpu().numpy(),
            "indices": indices.cpu().numpy().astype(storage.arrays()["indices"][1]), "lse": lse.cpu().numpy(),
            "tail": tail.cpu().numpy()}


def decode(arrays: dict[str, torch.Tensor], num_classes: int) -> torch.Tensor:
    """float32 (B, C) logits from one batch's stored arrays (already on the target device)."""
    if "logits" in arrays:
        return arrays["logits"].float()
    logp, lse = arrays["values"].float(), arrays["lse"].float()[:, None]
    k = logp.shape[1]
    if k >= num_classes:
        z = torch.empty(logp.shape[0], num_classes, device=logp.device)
    else:
        # the tail keeps its mass at T = 1, spread evenly (a floor keeps its logit finite when the mass is 0)
        tail = arrays["tail"].float()[:, None].clamp_min(1e-30)
        z = (torch.log(tail / (num_classes - k)) + lse).expand(-1, num_classes).contiguous()
    return z.scatter_(1, arrays["indices"].long(), logp + lse)


def reconstruction_l1(logits: torch.Tensor, encoded: dict[str, np.ndarray], num_classes: int,
                      temperatures: tuple[float, ...]) -> dict[float, torch.Tensor]:
    """Per-sample ``||softmax(z'/T) - softmax(z/T)||_1`` at each T, z' decoded from ``encoded`` (what
    ``encode(logits, ...)`` stored for these logits)."""
    z = logits.detach().float()
    z2 = decode({k: torch.from_numpy(v).to(z.device) for k, v in encoded.items()}, num_classes)
    return {t: (torch.softmax(z2 / t, 1) - torch.softmax(z / t, 1)).abs().sum(1) for t in temperatures}


class EpochWriter:
    """One rank's outputs for one epoch, written into memory-mapped .npy files in a temporary folder and
    renamed into place by ``commit``.

    The arrays are written in place (through the memory map), which is safe: they are new files in a folder of
    this writer's own (an earlier attempt's folder is deleted first), so no other name can share their bytes.
    Their space is reserved when they are created: a full disk is then an error up front, where writing into
    a memory-mapped hole would kill the process (SIGBUS) midway."""

    def __init__(self, root: str | os.PathLike, epoch: int, rank: int, storage: Storage):
        self.final = epoch_dir(root, epoch, rank)
        self.tmp = self.final.with_name(self.final.name + ".partial")
        self.storage = storage
        self.written = np.zeros(storage.steps, dtype=bool)
        try:
            if self.tmp.exists():
                shutil.rmtree(self.tmp)  # an interrupted earlier attempt at this epoch
            self.tmp.mkdir(parents=True)
            self.arrays = {name: _reserved_memmap(self.tmp / f"{name}.npy", shape, dt)
                           for name, (shape, dt) in storage.arrays().items()}
        except OSError as e:
            self._give_up(e)

    def add(self, step: int, logits: torch.Tensor, fingerprint: torch.Tensor) -> dict[str, np.ndarray]:
        """Store batch ``step``; return what was stored for it (the caller may measure its error)."""
        encoded = encode(logits, self.storage)
        for name, value in encoded.items():
            self.arrays[name][step] = value
        self.arrays["fingerprint"][step] = fingerprint.float().cpu().numpy()
        self.written[step] = True
        return encoded

    def commit(self) -> None:
        if not self.written.all():
            raise RuntimeError(f"epoch folder {self.final.name}: steps {np.flatnonzero(~self.written)[:5]} missing")
        try:
            for arr in self.arrays.values():
                arr.flush()
                fd = os.open(arr.filename, os.O_RDONLY)
                try:
                    os.fsync(fd)  # on disk before the rename publishes the epoch
                finally:
                    os.close(fd)
            self.arrays.clear()
            if self.final.exists():
                shutil.rmtree(self.final)
            os.replace(self.tmp, self.final)
        except OSError as e:
            self._give_up(e)

    def _give_up(self, e: OSError) -> None:
        """A failed write: the partial folder removed (no half epoch left behind), one line naming it."""
        self.arrays = {}
        shutil.rmtree(self.tmp, ignore_errors=True)
        raise UserError(f"could not write the teacher cache epoch {self.final}: {os_reason(e, self.final.parent)}"
                        ) from None


def _reserved_memmap(path: Path, shape: tuple[int, ...], dtype: Any) -> np.memmap:
    """A new .npy file of ``shape`` opened as a writable memory map, its disk space allocated."""
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    size = path.stat().st_size
    if hasattr(os, "posix_fallocate") and size:
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # a file system that cannot
                raise
        finally:
            os.close(fd)
    return arr


class _Staging:
    """Host-to-device copies of cache rows without a host synchronisation per step.

    A copy from ordinary (pageable) memory waits for the device's queue to drain; pinned buffers copy
    asynchronously. Each array cycles through ``depth`` pinned buffers, a buffer being reused only once the
    copy that last read it has finished (so the host runs at most ``depth`` steps ahead of the device)."""

    def __init__(self, device: torch.device, depth: int = 4):
        self.device, self.depth = device, depth
        self.cuda = device.type == "cuda"
        self._buffers: dict[str, list] = {}
        self._turn = 0

    def to_device(self, name: str, row: np.ndarray) -> torch.Tensor:
        if not self.cuda:
            return torch.from_numpy(np.array(row))
        ring = self._buffers.setdefault(name, [None] * self.depth)
        slot = self._turn % self.depth
        if ring[slot] is None or ring[slot][0].shape != row.shape:
            ring[slot] = (torch.from_numpy(np.empty(row.shape, row.dtype)).pin_memory(),
                          torch.cuda.Event())
        buf, done = ring[slot]
        done.synchronize()  # the copy from this buffer `depth` steps ago
        buf.numpy()[...] = row
        out = buf.to(self.device, non_blocking=True)
        done.record()
        return out

    def next_step(self) -> None:
        self._turn += 1


class CachedTeacher(nn.Module):
    """Answers ``batch_output(x, target, epoch, step)`` from a cache, as ``FrozenTeacher`` does by running the model.

    ``check()`` (called at log points: one host read) stops the run at the first batch whose input or labels
    do not match the cached fingerprint."""

    def __init__(self, root: str | os.PathLike, manifest: dict, rank: int, device: torch.device):
        super().__init__()
        self.root, self.manifest, self.rank, self.device = Path(root), manifest, rank, device
        self.num_classes = int(manifest["stream"]["num_classes"])
        self._epoch, self._arrays = None, None
        self._staging = _Staging(device)
        self._bad = torch.full((2,), -1, dtype=torch.int64, device=device)  # first mismatching (epoch, step)

    def train(self, mode: bool = True) -> CachedTeacher:
        return self

    def describe(self) -> str:
        storage, teacher = self.manifest["storage"], self.manifest.get("teacher", {})
        kind = "full logits" if storage["topk"] == 0 else f"top-{storage['topk']}"
        return f"{kind} {storage['dtype']} of {teacher.get('name')}"

    def _open(self, epoch: int) -> dict[str, np.ndarray]:
        folder = epoch_dir(self.root, epoch, self.rank)
        if not folder.is_dir():
            raise UserError(f"--teacher-cache {self.root} lacks epoch {epoch} for rank {self.rank} ({folder.name})")
        return open_epoch(folder, self.manifest)

    def batch_output(self, x: torch.Tensor, target: torch.Tensor, epoch: int, step: int) -> torch.Tensor:
        """The cached logits of batch ``step`` of ``epoch``; x and target are checked against the batch's
        fingerprint on the device (no host sync)."""
        if epoch != self._epoch:
            self._arrays, self._epoch = self._open(epoch), epoch
        if step >= len(self._arrays["fingerprint"]):
            raise UserError(f"--teacher-cache {self.root} holds {len(self._arrays['fingerprint'])} steps per epoch; "
                            f"this run asked for step {step}")
        rows = {name: self._staging.to_device(name, arr[step]) for name, arr in self._arrays.items()}
        self._staging.next_step()
        diff = (input_fingerprint(x, target) - rows.pop("fingerprint")).abs().amax()
        first = (self._bad[0] < 0) & (diff > FINGERPRINT_TOL)
        here = torch.tensor([epoch, step], dtype=torch.int64, device=self.device)
        self._bad.copy_(torch.where(first, here, self._bad))
        return decode(rows, self.num_classes)

    def val_predictions(self, val_files: str, batch_size: int) -> list[torch.Tensor] | None:
        """The teacher's top-1 class on each val batch (for the agreement metric), when the cache holds them for
        these val files (``val_files``: the val split's identity); batches of ``batch_size`` in the eval
        loader's fixed order."""
        val = self.manifest.get("val")
        if not val or val.get("files") != val_files or not (self.root / VAL_TOP1).is_file():
            return None
        top1 = open_array(self.root / VAL_TOP1, None, np.int64)
        preds = torch.from_numpy(np.array(top1)).to(self.device)
        return list(torch.split(preds, batch_size))

    def check(self) -> None:
        epoch, step = self._bad.tolist()
        if epoch >= 0:
            raise UserError(f"--teacher-cache {self.root}: the batch at epoch {epoch} step {step} is not the one the "
                            "cache was written for (the training images or their augmentation changed); "
                            "rebuild the cache with `vanillakd cache-teacher`")


def open_cache(root: str | os.PathLike, stream: dict, teacher: dict, num_epochs: int, rank: int,
               device: torch.device, explicit_weights: bool) -> CachedTeacher:
    """The cache at ``root`` for this run, refused with one line naming what differs."""
    manifest = read_manifest(root)
    diff = describe_difference(manifest["stream"], stream)
    diff += teacher_difference(manifest.get("teacher", {}), teacher, compare_weights=explicit_weights)
    if diff:
        raise UserError(f"--teacher-cache {root} was written for another training stream: {'; '.join(diff)}")
    done = set(manifest.get("epochs_done", []))
    missing = [e for e in range(num_epochs) if e not in done]
    if missing:
        raise UserError(f"--teacher-cache {root} holds {len(done)} finished epoch(s) but this run trains "
                        f"{num_epochs} (epoch {missing[0]} missing); finish it by re-running the same "
                        "`vanillakd cache-teacher` command with enough --epochs")
    for epoch in range(num_epochs):  # every file checked now (headers and sizes), not when training reaches it
        folder = epoch_dir(root, epoch, rank)
        if not folder.is_dir():
            raise UserError(f"--teacher-cache {root} lacks epoch {epoch} for rank {rank} ({folder.name}): {RECACHE}")
        open_epoch(folder, manifest)
    return CachedTeacher(root, manifest, rank, device)


def disk_bytes(images: int, epochs: int, storage: Storage) -> int:
    """Bytes a cache of ``epochs`` epochs over ``images`` training images takes (the few bytes of a partial last
    batch excepted)."""
    return images * epochs * storage.bytes_per_sample()


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def topk_bound(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Per-sample bound on ``||p' - p||_1`` at T = 1 for top-k float16 storage (see the module docstring)."""
    z = logits.double()
    lse = torch.logsumexp(z, 1)
    top = (z - lse[:, None]).topk(k, dim=1).values
    tail = (1 - top.exp().sum(1)).clamp_min(0) if z.shape[1] - k > 1 else torch.zeros_like(lse)
    fp16 = (top.exp() * torch.expm1(top.abs() * 2.0 ** -11)).sum(1)
    return (2 * tail + 2 * fp16 + 2.0 ** -21 * (lse.abs() + 1)).to(logits.dtype)
