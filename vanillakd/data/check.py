"""A fast scan for truncated or non-image files: open each file's header with PIL and check that the file
ends where its format says it must (JPEG's end-of-image marker, PNG's IEND chunk). No full decode, so a
million files take minutes, spread over worker processes."""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from multiprocessing import get_context

from PIL import Image, UnidentifiedImageError

_PNG_END = b"IEND\xaeB`\x82"


def image_problem(path: str) -> str | None:
    """Why ``path`` cannot be trusted as an image, or None."""
    try:
        with Image.open(path) as im:
            fmt = im.format
            im.size  # noqa: B018 - header parsed
    except UnidentifiedImageError:
        return "not an image"
    except Image.DecompressionBombError as e:  # PIL's size limit: decoding it would take gigabytes
        return f"too large ({e})"
    except (OSError, ValueError, SyntaxError) as e:
        return f"unreadable ({e})"
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            f.seek(max(size - 64, 0))
            tail = f.read()
    except OSError as e:
        return f"unreadable ({e.strerror})"
    if fmt == "JPEG" and b"\xff\xd9" not in tail.rstrip(b"\x00") and not jpeg_has_end(path):
        return "truncated JPEG (no end-of-image marker)"
    if fmt == "PNG" and _PNG_END not in tail:
        return "truncated PNG (no IEND chunk)"
    return None


def _main_scan_start(f) -> int | None:
    """The offset of a JPEG's first top-level start-of-scan, walking the segments from the start (so markers
    inside an EXIF thumbnail are not mistaken for the image's); None if the header is malformed."""
    f.seek(2)
    while True:
        head = f.read(4)
        if len(head) < 2 or head[0] != 0xFF:
            return None
        marker = head[1]
        if marker == 0xFF:  # fill byte
            f.seek(-3, os.SEEK_CUR)
            continue
        if marker == 0xDA:
            return f.tell() - 4
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            f.seek(-2, os.SEEK_CUR)
            continue
        if len(head) < 4:
            return None
        f.seek(int.from_bytes(head[2:4], "big") - 2, os.SEEK_CUR)


def jpeg_has_end(path: str, chunk: int = 1 << 20) -> bool:
    """Whether an end-of-image marker follows the JPEG's main scan anywhere: data after it (a phone's motion
    photo appends a video) or long zero padding is fine. Only read for files whose last bytes hold no marker."""
    try:
        with open(path, "rb") as f:
            start = _main_scan_start(f)
            if start is None:
                return False
            f.seek(start + 2)
            carry = b""
            while block := f.read(chunk):
                if b"\xff\xd9" in carry + block:
                    return True
                carry = block[-1:]
    except OSError:
        return False
    return False


def _check(path: str) -> tuple[str, str | None]:
    return path, image_problem(path)


def scan_images(paths: Sequence[str], workers: int = 0) -> list[tuple[str, str]]:
    """``(path, problem)`` for every bad file among ``paths``."""
    if workers > 1 and len(paths) > 2000:
        with get_context("spawn").Pool(workers) as pool:
            results: Iterable = pool.imap(_check, paths, chunksize=256)
            return [(p, why) for p, why in results if why]
    return [(p, why) for p, why in map(_check, paths) if why]
