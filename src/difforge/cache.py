"""The difforge cache folder: where `cache-all` puts Inductor's and Triton's artifacts.

Layout under the root (``DIFFORGE_CACHE_DIR`` > ``TORCHINDUCTOR_CACHE_DIR`` > the
user cache directory)::

    <root>/inductor   Inductor FX-graph, AOT-autograd and autotune caches
    <root>/triton     compiled Triton kernels

`cache clear` removes only these folders (and the root if it is then empty).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from difforge.options import default_cache_dir

OWNED_SUBDIRS: tuple[str, ...] = ("inductor", "triton")


@dataclass(frozen=True)
class CacheLayout:
    """The folders of one cache root."""

    root: Path

    @property
    def inductor(self) -> Path:
        return self.root / "inductor"

    @property
    def triton(self) -> Path:
        return self.root / "triton"

    def owned(self) -> list[Path]:
        return [self.root / name for name in OWNED_SUBDIRS]


def folder_size(path: Path) -> tuple[int, int]:
    """(bytes, files) under ``path``; (0, 0) when it does not exist."""
    total = files = 0
    if not path.exists():
        return 0, 0
    for entry in path.rglob("*"):
        with contextlib.suppress(OSError):
            if entry.is_file() and not entry.is_symlink():
                total += entry.stat().st_size
                files += 1
    return total, files


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


@contextlib.contextmanager
def using_cache(layout: CacheLayout) -> Iterator[None]:
    """Point Inductor and Triton at ``layout`` for the duration of a compilation.

    Both read their folder from the environment at each use, so a scoped change is
    enough and leaves the rest of the process as it was.
    """
    layout.inductor.mkdir(parents=True, exist_ok=True)
    layout.triton.mkdir(parents=True, exist_ok=True)
    saved = {name: os.environ.get(name) for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(layout.inductor)
    os.environ["TRITON_CACHE_DIR"] = str(layout.triton)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def cache_info(root: Path | None = None) -> dict[str, object]:
    """Where the difforge cache and the default Inductor cache live, and their sizes."""
    layout = CacheLayout(root or default_cache_dir())
    folders = {}
    for path in layout.owned():
        size, files = folder_size(path)
        folders[str(path)] = {"bytes": size, "files": files}
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir as inductor_default

    inductor_dir = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or inductor_default()
    size, files = folder_size(Path(inductor_dir))
    return {
        "root": str(layout.root),
        "folders": folders,
        "torch_inductor_default": {"path": inductor_dir, "bytes": size, "files": files},
    }


def clear_cache(root: Path | None = None, *, include_inductor_default: bool = False) -> list[Path]:
    """Remove difforge's cache folders (and optionally Inductor's default one)."""
    layout = CacheLayout(root or default_cache_dir())
    removed = []
    for path in layout.owned():
        if path.exists():
            shutil.rmtree(path)
            removed.append(path)
    with contextlib.suppress(OSError):
        layout.root.rmdir()  # only if now empty: never delete what we did not create
    if include_inductor_default:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir as inductor_default

        inductor_dir = Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or inductor_default())
        if inductor_dir.exists():
            shutil.rmtree(inductor_dir)
            removed.append(inductor_dir)
    return removed
