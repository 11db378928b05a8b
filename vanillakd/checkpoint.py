"""Checkpoint files: crash-safe writes and safe, explained loading.

Every file we write holds only tensors and plain containers, so it loads with ``weights_only=True``;
files from elsewhere that need pickled code are refused with a one-line explanation.

Every write goes through ``atomic_write``: a temp file ``.NAME.<random>.tmp`` beside the target, fsynced, then
renamed over it. So a file is never modified in place (a second name the user gave it, e.g. a ``cp -al``
backup, keeps the old bytes), a failure leaves the old file and no temp, and a killed save leaves only a temp
that ``remove_stale_temps`` recognises.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from .errors import UserError

TEMP_SUFFIX = ".tmp"
WriteFn = Callable[[IO[bytes]], Any]
_OUR_TEMP = re.compile(r"^\..+\.[a-z0-9_]{8}" + re.escape(TEMP_SUFFIX) + "$")
# torch.save reports a failed write of its zip writer as a RuntimeError, not an OSError
_TORCH_WRITE_FAILED = ("file write failed", "unexpected pos", "inline_container")


def temp_name_pattern(name: str = "*") -> str:
    """The glob of the temp files ``atomic_write`` makes beside ``name`` (``.NAME.<random>.tmp``)."""
    return f".{name}.*{TEMP_SUFFIX}"


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temp files a killed save left in ``folder`` (not below it); return them. Call it only while
    no other process can be saving there (a run folder's lock held)."""
    removed = []
    for p in Path(folder).glob(temp_name_pattern()):
        # only names mkstemp made (8 random characters): a user's own '.notes.old.tmp' is not ours to delete
        if _OUR_TEMP.match(p.name) and p.is_file() and not p.is_symlink():
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


def _read_umask() -> int | None:
    """The umask from /proc: reading it through ``os.umask`` means setting it, and until it is set back another
    thread would create its files with the wrong mode."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


_IMPORT_UMASK = _read_umask()
if _IMPORT_UMASK is None:  # no /proc: set and restore once, at import, before a run starts its threads
    _IMPORT_UMASK = os.umask(0o022)
    os.umask(_IMPORT_UMASK)


def file_mode() -> int:
    """The mode ``open()`` gives a new file (0o666 less the umask); mkstemp's temp files are 0600 whatever
    the umask, which would make every output private to its owner."""
    umask = _read_umask()
    return 0o666 & ~(_IMPORT_UMASK if umask is None else umask)


def atomic_write(path: str | os.PathLike, write_fn: WriteFn, check: Callable[[Path], None] | None = None) -> None:
    """Write through ``write_fn(file)`` into a temp file beside ``path``, fsync, then rename over it;
    ``check(temp_path)`` (if given) may refuse the written file before it replaces ``path``.

    A crash or a full disk leaves either the old file or the new one, never half of one; a failed write is
    one UserError naming the file and the reason.
    """
    path = Path(path)
    tmp = _write_temp(path, write_fn)
    try:
        if check is not None:
            check(tmp)
        _publish(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def atomic_write_many(writes: Mapping[str | os.PathLike, WriteFn]) -> None:
    """Files that belong together (an export's weights and config): every one is written to its temp before
    any is renamed, so a full disk replaces none of them rather than leaving a new one beside an old one."""
    temps: list[tuple[Path, Path]] = []
    try:
        for path, write_fn in writes.items():
            temps.append((_write_temp(Path(path), write_fn), Path(path)))
        for tmp, path in temps:
            _publish(tmp, path)
    except BaseException:
        for tmp, _ in temps:
            _unlink_quietly(tmp)  # those already renamed are gone: nothing to remove
        raise


def _write_temp(path: Path, write_fn: WriteFn) -> Path:
    """The written, fsynced temp file beside ``path`` (removed again if anything fails)."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    except OSError as e:
        raise UserError(f"could not write {path}: {os_reason(e, path.parent)}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), file_mode())
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        _unlink_quietly(Path(tmp))
        reason = _write_failure(e, path.parent)
        if reason is None:  # not a failed write (a bug, an interrupt, a UserError of write_fn's own): as it is
            raise
        raise UserError(f"could not write {path}: {reason}") from None
    return Path(tmp)


def _publish(tmp: Path, path: Path) -> None:
    """Rename the temp over ``path``, and make the rename itself durable."""
    try:
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"could not write {path}: {os_reason(e, path.parent)}") from None
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _write_failure(e: BaseException, folder: Path) -> str | None:
    """Why a write failed, in words, when ``e`` is a failed write (None for any other exception)."""
    if isinstance(e, OSError):
        return os_reason(e, folder)
    if isinstance(e, RuntimeError) and any(s in str(e) for s in _TORCH_WRITE_FAILED):
        cause = e.__context__ or e.__cause__
        if isinstance(cause, OSError):  # torch's writer drops the errno; the file's own write kept it
            return os_reason(cause, folder)
        return f"the write failed (is the disk full? {_free_space(folder)} free there)"
    return None


def os_reason(e: OSError, folder: Path) -> str:
    """An OSError of a write into ``folder`` as a reason a user can act on."""
    folder = Path(folder)
    code = e.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"{e.strerror} ({_free_space(folder)} free there)"
    if code == errno.EFBIG:
        return f"{e.strerror} (over a file size limit: ulimit -f, or the file system's largest file)"
    if code == errno.EROFS:
        return f"{folder} is on a read-only file system"
    if code in (errno.EACCES, errno.EPERM):
        return f"no permission to write in {folder}"
    if code in (errno.ENOENT, errno.ENOTDIR, errno.EEXIST):
        blocker = folder
        while not blocker.exists() and blocker != blocker.parent:
            blocker = blocker.parent
        if blocker.exists() and not blocker.is_dir():
            return f"{blocker} is a file, not a folder"
        if blocker != folder:
            return f"the folder {folder} does not exist"
        if code == errno.ENOENT:
            return f"cannot create files in {folder}"
    return e.strerror or str(e)


def _free_space(folder: Path) -> str:
    try:
        st = os.statvfs(folder)
    except OSError:
        return "unknown space"
    return human_size(st.f_bavail * st.f_frsize)


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def writable_folder(folder: str | os.PathLike, what: str) -> Path:
    """``folder``, created if need be and probed with a temp file: a job that ends by writing there learns
    before it starts that it could not."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-test.", suffix=TEMP_SUFFIX)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        where = folder if folder.is_dir() else folder.parent
        raise UserError(f"{what} {folder} is not writable: {os_reason(e, where)}") from None
    return folder


def check_writable_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` can be written (its folder exists and takes files; it is no folder itself), checked before
    the work whose result goes there."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder, not a file")
    folder = path.parent
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{what} {path} cannot be written: {os_reason(e, folder)}") from None
    return path


def copy_file(src: str | os.PathLike, dest: str | os.PathLike) -> None:
    """``dest`` as an independent copy of ``src``, written atomically: a hard link would share the bytes, so
    damaging one name (an in-place write, a truncation) would damage the other."""
    def copy(f: IO[bytes]) -> None:
        with open(src, "rb") as s:
            _copy_bytes(s, f)
    atomic_write(dest, copy)


def _copy_bytes(src: IO[bytes], dest: IO[bytes]) -> None:
    """In the kernel where it can (``copy_file_range``, which may share blocks copy-on-write: safe, as a write
    to either file never reaches the other), else through Python."""
    copied = 0
    if hasattr(os, "copy_file_range"):
        try:
            while n := os.copy_file_range(src.fileno(), dest.fileno(), 1 << 30):
                copied += n
            return
        except OSError as e:  # another file system, or no such call: copy by hand, unless it failed midway
            if copied or e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
    shutil.copyfileobj(src, dest, 1 << 22)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` made crash-safe (see ``atomic_write``)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


# how the weights-only unpickler says that the pickle needs a class or function beyond tensors and containers
_NEEDS_CODE = ("GLOBAL ", "must be imported to load", "unrecognized function", "Can only build",
               "Can only create new object")
# a legacy (pre-zip) torch.save file begins with torch's magic number pickled alone, at the protocol it used
_LEGACY_STARTS = tuple(pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=p)
                       for p in range(2, pickle.HIGHEST_PROTOCOL + 1))


def load_file(path: str | os.PathLike, trust: bool = False) -> Any:
    """Load a checkpoint file (PyTorch or safetensors) on the CPU, refusing pickled code unless ``trust``.

    A file that fails to load is named in one line saying what it is (damaged, truncated, another kind of
    file); ``--trust-checkpoint`` is suggested only for a genuine PyTorch file whose pickle needs code."""
    path = Path(path)
    kind = _readable_kind(path)
    if path.suffix == ".safetensors" or kind == "safetensors":
        return _load_safetensors(path, kind)
    if kind in ("empty", "text", "npy", "pickle"):
        # torch.load could only fail on these, and only after unpickling a foreign pickle (running its code,
        # under trust): refused before it reads them
        raise UserError(f"checkpoint {path} is corrupt or not a PyTorch checkpoint: {describe_kind(path, kind)}")
    try:
        # timm-style training checkpoints (the seed's among them) store their flags as an argparse.Namespace:
        # a plain attribute bag, safe to rebuild, so it is the one class allowed beyond tensors and containers
        with _allow_namespace():
            obj = torch.load(path, map_location="cpu", weights_only=not trust)
    except Exception as e:  # noqa: BLE001 - a damaged file can fail anywhere inside the unpickler
        raise UserError(_load_problem(path, kind, e, trust)) from None
    _check_crcs(path)
    return obj


def _check_crcs(path: Path) -> None:
    """torch.load does not check the zip's CRC-32s: flipped bytes inside a tensor load silently as other weights.
    Reading the file once more to check them costs about a second per GB."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, RuntimeError, ValueError):
        return  # not a zip (torch's legacy format has no checksums): nothing to check
    if bad is not None:
        raise UserError(f"checkpoint {path} is corrupt: its part {bad} does not match its checksum (damaged on "
                        "disk or in a copy)")


def _readable_kind(path: Path) -> str:
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise UserError(f"checkpoint {path} is not a regular file")
    try:
        return file_kind(path)
    except OSError as e:
        raise UserError(f"cannot read checkpoint {path}: {e.strerror or e}") from None


def file_kind(path: str | os.PathLike) -> str:
    """What a file is, from its first bytes: 'empty', 'zip' (torch.save's format, or another archive),
    'torch-pickle' (torch.save's legacy format), 'pickle' (another pickle), 'npy', 'safetensors', 'text' or
    'unknown'."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "empty"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head.startswith(_LEGACY_STARTS) or any(start.startswith(head) for start in _LEGACY_STARTS):
        return "torch-pickle"  # (or what is left of one cut inside its magic number)
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= pickle.HIGHEST_PROTOCOL:  # pickle's PROTO opcode
        return "pickle"
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if len(head) > 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= 100_000_000:
        return "safetensors"
    return "text" if _text_start(head) is not None else "unknown"


def _text_start(head: bytes) -> str | None:
    """The start of ``head`` as text, when it is text (UTF-8, printable; a character cut at the end allowed)."""
    if b"\x00" in head:
        return None
    for cut in range(4):
        try:
            text = head[:len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        return text if all(c.isprintable() or c in "\t\r\n\f" for c in text) else None
    return None


def describe_kind(path: str | os.PathLike, kind: str) -> str:
    """A file that is no checkpoint, in words ('it is a text file beginning ...')."""
    if kind == "text":
        with open(path, "rb") as f:
            start = " ".join((_text_start(f.read(512)) or "").split())[:40]
        return f"it is a text file beginning {start!r}"
    return {"empty": "it is empty (0 bytes)", "npy": "it is a NumPy .npy array file",
            "pickle": "it is a Python pickle that torch.save did not write",
            "zip": "it is a zip archive without PyTorch's data.pkl",
            "safetensors": "it is a safetensors file", "torch-pickle": "it is a PyTorch checkpoint",
            }.get(kind, "its bytes match no checkpoint format (damaged, or another kind of file)")


def _load_problem(path: Path, kind: str, e: Exception, trust: bool) -> str:
    """Why torch.load failed on ``path`` (a ``kind`` file), in one line."""
    if kind not in ("zip", "torch-pickle"):
        return f"checkpoint {path} is corrupt or not a PyTorch checkpoint: {describe_kind(path, kind)}"
    if kind == "zip":
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            return (f"checkpoint {path} is corrupt or truncated: an incomplete zip archive (a copy cut short, or "
                    "a save that did not finish)")
        if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
            return f"checkpoint {path} is corrupt or not a PyTorch checkpoint: {describe_kind(path, 'zip')}"
    if any(s in str(e) for s in _NEEDS_CODE):
        return _needs_code(path, kind, str(e))
    if trust and isinstance(e, (ImportError, AttributeError)):
        return (f"checkpoint {path} needs Python code that is not available here ({_torch_reason(e)}); install "
                "the package that saved it")
    return f"checkpoint {path} is corrupt or truncated ({_torch_reason(e)})"


def _torch_reason(e: Exception) -> str:
    """The informative first line of a torch.load error (inside weights_only's wrapping text)."""
    text = str(e).split("WeightsUnpickler error:", 1)[-1]
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    first = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", first).split(". ")[0].strip(" .")
    if not first or first == "Ran out of input":
        return "the file ends early" if isinstance(e, EOFError) else first or type(e).__name__
    return first[:200]


def _needs_code(path: Path, kind: str, message: str) -> str:
    names = re.findall(r"GLOBAL (\S+) (?:was not|whose module)", message)
    find_all = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)  # torch >= 2.5, zip only
    if kind == "zip" and find_all is not None:
        try:
            names += [n for n in find_all(path) if n != "argparse.Namespace"]
        except Exception:  # noqa: BLE001 - only a fuller list; the refusal stands without it
            pass
    names = list(dict.fromkeys(names)) or ["an unknown class"]
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return (f"checkpoint {path} holds pickled Python objects whose loading runs code ({shown}); refusing to load "
            "it. Re-save it as a plain state_dict, or pass --trust-checkpoint only for a file whose source you "
            "trust: trusting it runs that code from the file")


def _load_safetensors(path: Path, kind: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file as load_safetensors
    try:
        return load_safetensors(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if kind == "safetensors":
        reason = reason.split("Error while deserializing header: ", 1)[-1]
        raise UserError(f"checkpoint {path} is corrupt or truncated (safetensors: {reason})")
    if kind in ("zip", "torch-pickle"):
        raise UserError(f"checkpoint {path} is not a safetensors file but a PyTorch checkpoint: name it .pth")
    raise UserError(f"checkpoint {path} is corrupt or not a safetensors file: {describe_kind(path, kind)}")


def _allow_namespace():
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    if safe_globals is None:  # torch 2.4: only the process-wide list exists
        torch.serialization.add_safe_globals([argparse.Namespace])
        return contextlib.nullcontext()
    return safe_globals([argparse.Namespace])


def mismatched_keys(module: nn.Module, state: Mapping[str, torch.Tensor]) -> tuple[list, list, list]:
    """(missing, unexpected, mis-shaped) keys of ``state`` against ``module``."""
    model_state = module.state_dict()
    missing = [k for k in model_state if k not in state]
    unexpected = [k for k in state if k not in model_state]
    wrong = [k for k in state if k in model_state and state[k].shape != model_state[k].shape]
    return missing, unexpected, wrong


def mismatch_message(module: nn.Module, state: Mapping[str, torch.Tensor]) -> str | None:
    """Missing / unexpected / mis-shaped keys of ``state`` against ``module``, in one line (None if it fits)."""
    missing, unexpected, wrong = mismatched_keys(module, state)
    model_state = module.state_dict()
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    if wrong:
        k = wrong[0]
        parts.append(f"{len(wrong)} shape mismatches (e.g. {k}: file {tuple(state[k].shape)} vs "
                     f"model {tuple(model_state[k].shape)})")
    return "; ".join(parts) or None


def load_state_strict(module: nn.Module, state: Mapping[str, torch.Tensor], path: str | os.PathLike,
                      what: str = "model") -> None:
    """``module.load_state_dict(state)``, with missing / unexpected / mis-shaped keys named in one line."""
    problem = mismatch_message(module, state)
    if problem:
        arch = getattr(module, "pretrained_cfg", {}).get("architecture", type(module).__name__)
        raise UserError(f"{what} checkpoint {path} does not fit architecture {arch}: {problem}")
    module.load_state_dict(state, strict=True)


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as tensors and plain containers (weights_only-loadable)."""
    import random

    import numpy as np
    np_state = np.random.get_state()
    state = {"python": plain(random.getstate()), "torch": torch.get_rng_state(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    import random

    import numpy as np
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def plain(obj: Any) -> Any:
    """Args and metrics as plain Python containers, so checkpoints load with ``weights_only=True``."""
    if isinstance(obj, Mapping):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def training_flags(ckpt: object) -> dict[str, Any]:
    """The training flags a checkpoint stores: a dict (ours) or an argparse.Namespace (timm's, the seed's)."""
    args = ckpt.get("args") if isinstance(ckpt, Mapping) else None
    if hasattr(args, "__dict__") and not isinstance(args, Mapping):
        args = vars(args)
    return dict(args) if isinstance(args, Mapping) else {}


def one_value(value: object) -> object:
    """One student's value of a training flag (a multi-student run stores lists of one value per student)."""
    if isinstance(value, (list, tuple)):
        return value[0] if len(value) == 1 else None
    return value


def recorded_arch(ckpt: object) -> str | None:
    """The timm architecture a checkpoint records: ``arch`` (ours), else timm's ``args.model`` (timm's saver
    stores the model's class name as ``arch``, e.g. 'resnet')."""
    import timm
    meta = ckpt if isinstance(ckpt, Mapping) else {}
    for name in (meta.get("arch"), one_value(training_flags(meta).get("model"))):
        if isinstance(name, str) and name and timm.is_model(name):
            return name
    return None
