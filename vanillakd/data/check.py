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
    if fmt == "JPEG" and b"\xff\xd9" not in tail.rstrip(b"\x00"):
        return "truncated JPEG (no end-of-image marker)"
    if fmt == "PNG" and _PNG_END not in tail:
        return "truncated PNG (no IEND chunk)"
    return None


def _check(path: str) -> tuple[str, str | None]:
    return path, image_problem(path)


def scan_images(paths: Sequence[str], workers: int = 0) -> list[tuple[str, str]]:
    """``(path, problem)`` for every bad file among ``paths``."""
    if workers > 1 and len(paths) > 2000:
        with get_context("spawn").Pool(workers) as pool:
            results: Iterable = pool.imap(_check, paths, chunksize=256)
            return [(p, why) for p, why in results if why]
    return [(p, why) for p, why in map(_check, paths) if why]
