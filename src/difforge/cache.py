"""The difforge cache folder: where `cache-all` puts Inductor's and Triton's artifacts.

Layout under the root (``DIFFORGE_CACHE_DIR`` > ``$TORCHINDUCTOR_CACHE_DIR/difforge``
> the user cache directory)::

    <root>/.difforge-cache   marker: this root was created by difforge
    <root>/inductor          Inductor FX-graph, AOT-autograd and autotune caches
    <root>/triton            compiled Triton kernels

`cache clear` removes only these folders, and only under a root that carries the
marker, so a mistyped ``--dir`` cannot delete somebody else's ``inductor`` folder.
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
MARKER = ".difforge-cache"


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

    @property
    def marker(self) -> Path:
        return self.root / MARKER

    def owned(self) -> list[Path]:
        """The folders `cache clear` may remove: none unless the marker is there."""
        if not self.marker.is_file():
            return []
        return [self.root / name for name in OWNED_SUBDIRS]

    def create(self) -> None:
        """Make the folders and the marker (idempotent)."""
        self.inductor.mkdir(parents=True, exist_ok=True)
        self.triton.mkdir(parents=True, exist_ok=True)
        if not self.marker.exists():
            self.marker.write_text("created by difforge; `difforge cache clear` may empty this\n")


def inductor_default_dir() -> Path:
    """Inductor's own cache folder, resolved the way torch resolves it."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir as inductor_default

    return Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or inductor_default())


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
    layout.create()
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
    for path in (layout.root / name for name in OWNED_SUBDIRS):
        size, files = folder_size(path)
        folders[str(path)] = {"bytes": size, "files": files}
    inductor_dir = str(inductor_default_dir())
    size, files = folder_size(Path(inductor_dir))
    return {
        "root": str(layout.root),
        "is_difforge_cache": layout.marker.is_file(),
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
    if removed:
        layout.marker.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            layout.root.rmdir()  # only if now empty: never delete what we did not create
    if include_inductor_default:
        inductor_dir = inductor_default_dir()
        if inductor_dir.exists():
            shutil.rmtree(inductor_dir)
            removed.append(inductor_dir)
    return removed
