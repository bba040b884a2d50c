"""The difforge cache folder: where `cache-all` puts Inductor's and Triton's artifacts.

Layout under the root (``DIFFORGE_CACHE_DIR`` > ``$TORCHINDUCTOR_CACHE_DIR/difforge``
> the user cache directory)::

    <root>/.difforge-cache   marker: this root was created by difforge
    <root>/inductor          Inductor FX-graph, AOT-autograd and autotune caches
    <root>/triton            compiled Triton kernels
    <root>/autotune          autotune winners shared between nearby sizes (autotune_buckets)
    <root>/precompile        Dynamo's stored traces, one folder per key (cache.precompile)

`cache clear` removes only these folders, and only under a root that carries the
marker, so a mistyped ``--dir`` cannot delete somebody else's ``inductor`` folder.

Robustness (what torch 2.13 does on its own, and what we add):

- A truncated or garbage FX-graph / AOT-autograd entry makes Inductor log a warning with a
  traceback at every lookup (twice per graph, in every later process), count a miss and
  recompile, leaving the bad file in place for ever. A corrupt generated module (``.py``)
  or shared object (``.so``) is worse: the compile raises. So the first time a process
  compiles into a root, :func:`prepare_cache` checks its artifacts, cheaply: Inductor names
  entries and modules by the hash of their content (the names are the manifest), shared
  objects and cubins must be whole ELF files, JSON must parse. What fails is removed (under
  Inductor's own per-artifact lock) and reported in one warning; Inductor then recompiles.
- What no check can see (a damaged ``.cpp`` next to a missing ``.so``) surfaces as an error
  naming a file in the cache; :func:`compile_in_cache` removes the files the error names and
  compiles once more.
- Concurrent processes are safe: Inductor and Triton write atomically (temp file +
  rename) or under a file lock, and an unfinished shared object is only judged after
  taking the lock its writer holds.
- A root that cannot be written degrades to compiling without the persistent cache, with
  one warning.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import hashlib
import json
import os
import pickle
import re
import shutil
import struct
import tempfile
import threading
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from difforge.errors import warn
from difforge.options import default_cache_dir

T = TypeVar("T")

OWNED_SUBDIRS: tuple[str, ...] = ("inductor", "triton", "autotune", "precompile")
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
    def autotune(self) -> Path:
        return self.root / "autotune"

    @property
    def precompile(self) -> Path:
        return self.root / "precompile"

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


class CacheWarning(UserWarning):
    """A problem with the difforge cache folder that difforge worked around."""


# ----------------------------------------------------------------------------- checks

#: Files whose (size, mtime) passed a check in this process: not re-read until they change.
_verified: dict[Path, tuple[int, int]] = {}
_ENTRY_FOLDERS = ("fxgraph", "aotautograd")
_ENTRY_NAME = re.compile(r"[a-z2-7]{51}")
_ELF_SUFFIXES = (".so", ".cubin", ".hsaco")  # not .o: intermediates of a locked build
_JSON_SUFFIXES = (".json", ".best_config")
_LOCK_TIMEOUT_S = 60.0


def _content_key(data: bytes) -> str:
    """The name Inductor gives an FX-graph or AOT-autograd entry holding ``data``."""
    try:
        from torch._inductor.codecache import sha256_hash
    except ImportError:  # pragma: no cover - the same scheme, spelled out
        return base64.b32encode(hashlib.sha256(data).digest())[:51].decode().lower()
    return sha256_hash(data)


def _code_key(text: str) -> str | None:
    try:
        from torch._inductor.codecache import code_hash
    except ImportError:  # pragma: no cover
        return None
    return code_hash(text.strip())


def _entry_problem(path: Path) -> str | None:
    # An entry that does not look like one of today's names may come from another torch
    # version sharing the folder: it cannot be judged, so it is left alone.
    if not _ENTRY_NAME.fullmatch(path.name):
        return None
    if _content_key(path.read_bytes()) != path.name:
        return "content does not match the hash in its name (truncated or damaged)"
    return None


def _python_problem(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return "not UTF-8 text"
    if _code_key(text) == path.stem:
        return None
    # Modules written with an extra key component have other names; they must parse.
    try:
        compile(text, str(path), "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as exc:
        return f"does not parse ({type(exc).__name__})"
    return None


def _elf_problem(path: Path) -> str | None:
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(64)
    if len(head) < 52 or head[:4] != b"\x7fELF" or head[4] not in (1, 2) or head[5] not in (1, 2):
        return "not an ELF file"
    order = "<" if head[5] == 1 else ">"
    if head[4] == 2:  # 64-bit: e_phoff, e_shoff at 0x20/0x28; sizes and counts at 0x36..
        if len(head) < 64:
            return "not an ELF file"
        phoff, shoff = struct.unpack_from(order + "QQ", head, 0x20)
        phentsize, phnum, shentsize, shnum = struct.unpack_from(order + "HHHH", head, 0x36)
    else:
        phoff, shoff = struct.unpack_from(order + "II", head, 0x1C)
        phentsize, phnum, shentsize, shnum = struct.unpack_from(order + "HHHH", head, 0x2A)
    # The linker writes the section table last: a cut-off file lacks its end.
    if phoff + phentsize * phnum > size or shoff + shentsize * shnum > size:
        return f"truncated ELF file ({size} bytes)"
    return None


def _json_problem(path: Path) -> str | None:
    try:
        json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError):
        return "not valid JSON"
    return None


def check_file(path: Path, layout: CacheLayout) -> str | None:
    """Why ``path`` (a file of ``layout``) cannot be a sound artifact, or None if it may be."""
    relative = _relative_parts(path, layout)
    try:
        if len(relative) > 2 and relative[0] == "inductor" and relative[1] in _ENTRY_FOLDERS:
            return _entry_problem(path)
        if path.suffix == ".py":
            return _python_problem(path)
        if path.suffix in _ELF_SUFFIXES:
            return _elf_problem(path)
        if path.suffix in _JSON_SUFFIXES:
            return _json_problem(path)
    except FileNotFoundError:
        return None  # replaced or removed meanwhile: nothing left to judge
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    return None


def _relative_parts(path: Path, layout: CacheLayout) -> tuple[str, ...]:
    for base in (layout.root, layout.root.resolve()):
        with contextlib.suppress(ValueError):
            return path.relative_to(base).parts
    return ()


def _artifact_files(folder: Path) -> Iterator[Path]:
    """Regular files under ``folder``, without locks and writers' temporaries."""
    for current, dirs, files in os.walk(folder):
        # "." prefixes: Inductor's write_atomic temporaries; "tmp.": Triton's staging dirs.
        dirs[:] = [d for d in dirs if not d.startswith((".", "tmp.")) and d != "locks"]
        for name in files:
            if not name.startswith((".", "tmp.")) and not name.endswith(".lock"):
                yield Path(current) / name


def find_corrupt(layout: CacheLayout) -> list[tuple[Path, str]]:
    """Files of ``layout`` that fail their check, with the reason; unchanged files that
    passed before are not read again."""
    bad = []
    for folder in (layout.inductor, layout.triton):
        for path in _artifact_files(folder):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            signature = (stat.st_size, stat.st_mtime_ns)
            if _verified.get(path) == signature:
                continue
            reason = check_file(path, layout)
            if reason is None:
                _verified[path] = signature
            else:
                bad.append((path, reason))
    return bad


# --------------------------------------------------------------------------- removal


def _artifact_lock(layout: CacheLayout, path: Path) -> contextlib.AbstractContextManager[object]:
    """Inductor's lock for the artifact ``path`` (``<key>.so`` / ``<key>.main.so`` ...), held
    by whoever is still building it; a no-op outside Inductor's code folders."""
    in_code_folder = path.parent.parent.resolve() == layout.inductor.resolve()
    if not in_code_folder or path.suffix not in (*_ELF_SUFFIXES, ".cpp"):
        return contextlib.nullcontext()
    from filelock import FileLock  # a dependency of torch, which Inductor uses the same way

    locks = layout.inductor / "locks"
    locks.mkdir(exist_ok=True)
    return FileLock(str(locks / f"{path.name.split('.')[0]}.lock"), timeout=_LOCK_TIMEOUT_S)


def _remove(layout: CacheLayout, path: Path, recheck: bool) -> bool:
    """Delete one artifact; with ``recheck``, only if it still fails its check once its
    writer (if any) is done."""
    from filelock import Timeout

    try:
        with _artifact_lock(layout, path):
            if recheck and check_file(path, layout) is None:
                return False  # another process was still writing it
            path.unlink()
    except (OSError, Timeout):
        return False  # gone already, still being built after a minute, or not ours to delete
    _verified.pop(path, None)
    return True


def prepare_cache(layout: CacheLayout) -> list[str]:
    """Remove the corrupted artifacts of ``layout``; returns ``"<path> (<reason>)"`` each.

    Inductor then misses on them and recompiles, instead of logging a traceback per lookup
    (entries) or failing the compile (modules, shared objects)."""
    return [
        f"{path} ({reason})"
        for path, reason in find_corrupt(layout)
        if _remove(layout, path, recheck=True)
    ]


def _warn_corrupt(problems: list[str]) -> None:
    shown = "; ".join(problems[:5]) + (
        f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
    )
    noun = "entry" if len(problems) == 1 else f"entries ({len(problems)})"
    warn(
        f"difforge: corrupted cache {noun} {shown} removed; recompiling",
        CacheWarning,
    )


# ------------------------------------------------------------------------ writability

_writable_roots: set[Path] = set()
#: The layout a compile_in_cache call of this thread compiles against (None outside one).
_state = threading.local()
_warned_unwritable: set[Path] = set()
_prepared_roots: set[Path] = set()


def unwritable_reason(layout: CacheLayout) -> str | None:
    """Why difforge cannot write under ``layout`` (None when it can).

    ``os.access`` answers for permissions; the probe write catches what it cannot see
    (a read-only mount, a full disk, a root that is a file)."""
    try:
        layout.create()  # every time: `cache clear` may have removed the folders meanwhile
    except OSError as exc:
        return f"cannot create it: {exc.strerror or exc}"
    if layout.root in _writable_roots:
        return None
    for folder in (layout.root, layout.inductor, layout.triton):
        if not os.access(folder, os.W_OK | os.X_OK):
            return f"no write permission on {folder}"
    try:
        with tempfile.NamedTemporaryFile(dir=layout.inductor, prefix=".difforge-probe-") as probe:
            probe.write(b"ok")
            probe.flush()
    except OSError as exc:
        return f"a test write failed: {exc.strerror or exc}"
    _writable_roots.add(layout.root)
    return None


@contextlib.contextmanager
def using_cache(layout: CacheLayout) -> Iterator[bool]:
    """Point Inductor and Triton at ``layout`` for the duration of a compilation.

    Yields True when it did; False (after one warning per root and process) when the
    folder cannot be written, and then Inductor keeps its own folders. At the first use
    of a root in a process, corrupted artifacts are removed (:func:`prepare_cache`), with
    one warning.

    Both read their folder from the environment at each use, so a scoped change is
    enough and leaves the rest of the process as it was.
    """
    if getattr(_state, "layout", None) is not None:
        yield True  # inside compile_in_cache, which already chose the folder
        return
    reason = unwritable_reason(layout)
    if reason is not None:
        if layout.root not in _warned_unwritable:
            _warned_unwritable.add(layout.root)
            warn(
                f"difforge: cache folder {layout.root} is not writable ({reason}); "
                "compiling without the persistent cache",
                CacheWarning,
            )
        yield False
        return
    if layout.root not in _prepared_roots:
        # Once per process: damage is left by earlier runs; what this and concurrent runs
        # write is atomic or locked, and a failure later names its file (compile_in_cache).
        problems = prepare_cache(layout)
        _prepared_roots.add(layout.root)
        if problems:
            _warn_corrupt(problems)
    with _redirected(layout):
        yield True


@contextlib.contextmanager
def _redirected(layout: CacheLayout) -> Iterator[None]:
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


# ------------------------------------------------------------------ recover and retry

_scratch_dirs: list[Path] = []
#: Exception types that hint at unreadable or unloadable files rather than a compiler bug.
_IO_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ImportError,
    EOFError,
    SyntaxError,
    pickle.UnpicklingError,
)


def _exception_chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        # Dynamo's BackendCompilerFailed keeps the original as inner_exception.
        todo += [current.__cause__, current.__context__, getattr(current, "inner_exception", None)]


def files_named_in(exc: BaseException, layout: CacheLayout) -> list[Path]:
    """Artifacts of ``layout`` that ``exc`` (its chain, messages and traceback) names."""
    prefixes = {str(layout.root), str(layout.root.resolve())}
    pattern = re.compile(
        "(?:" + "|".join(re.escape(p) for p in prefixes) + r")/[^\s'\"`,;:()\[\]<>]+"
    )
    texts = []
    for item in _exception_chain(exc):
        texts.append(str(item))
        texts += [frame.filename for frame in traceback.extract_tb(item.__traceback__)]
        texts += [str(arg) for arg in item.args if isinstance(arg, (str, os.PathLike))]
    owned = (layout.inductor.resolve(), layout.triton.resolve())
    found: dict[Path, None] = {}
    for match in pattern.finditer("\n".join(texts)):
        path = Path(match.group(0).rstrip(".")).resolve()
        inside = any(path.is_relative_to(folder) for folder in owned)
        if inside and path.is_file() and path.parent.name != "locks":
            found[path] = None
    return list(found)


def _with_siblings(paths: list[Path]) -> list[Path]:
    """Each file plus the others built from the same key (``x.cpp`` with ``x.so``): a
    damaged source must not leave its stale object behind, nor the other way round."""
    out: dict[Path, None] = {}
    for path in paths:
        key = path.name.split(".")[0]
        out[path] = None
        for sibling in path.parent.glob(f"{key}.*"):
            if sibling.is_file() and not sibling.name.endswith(".lock"):
                out[sibling] = None
    return list(out)


def _forget_loaded_code() -> None:
    # Inductor memoises loaded modules, build jobs and probe results per key; a retry must
    # write and build them again rather than reuse what the failed attempt loaded.
    with contextlib.suppress(ImportError, AttributeError):
        from torch._inductor.utils import clear_caches

        clear_caches()


def _never_retried(exc: BaseException) -> bool:
    """Errors that are no cache's fault: ours on purpose, and Dynamo's control flow."""
    from difforge.errors import DifforgeError

    try:
        from torch._dynamo.exc import RestartAnalysis, SkipFrame
    except ImportError:  # pragma: no cover
        return isinstance(exc, DifforgeError)
    return isinstance(exc, (DifforgeError, RestartAnalysis, SkipFrame))


def _summary(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__


def _compile_in_scratch(compile_fn: Callable[[], T]) -> T:
    """``compile_fn`` against an empty cache folder of its own.

    The folder stays until the process exits: what was compiled may still read from it."""
    if not _scratch_dirs:
        atexit.register(lambda: [shutil.rmtree(d, ignore_errors=True) for d in _scratch_dirs])
    scratch = CacheLayout(Path(tempfile.mkdtemp(prefix="difforge-scratch-")))
    _scratch_dirs.append(scratch.root)
    scratch.create()
    _forget_loaded_code()
    _state.layout = scratch
    with _redirected(scratch):
        return compile_fn()


def _quarantine(layout: CacheLayout) -> None:
    """Empty ``layout``'s folders: renamed aside first (atomic for other processes, which
    then simply miss), then deleted."""
    for folder in (layout.inductor, layout.triton):
        aside = layout.root / f".quarantine-{os.getpid()}-{folder.name}"
        with contextlib.suppress(OSError):
            folder.rename(aside)
            shutil.rmtree(aside, ignore_errors=True)
    _verified.clear()
    layout.create()


def _recover(layout: CacheLayout, compile_fn: Callable[[], T], first: Exception) -> T:
    """After ``compile_fn`` raised ``first`` with ``layout`` in use: remove what the error
    points at and retry; failing that, if the same compile works without the cache, the
    cache is what broke it and is emptied. Otherwise ``first`` is raised."""
    named = files_named_in(first, layout)
    suspects = _with_siblings(named + [path for path, _ in find_corrupt(layout)])
    removed = [path for path in suspects if _remove(layout, path, recheck=False)]
    if removed:
        _forget_loaded_code()
        try:
            result = compile_fn()
        except Exception:  # the damage is elsewhere: the last resort below
            pass
        else:
            shown = ", ".join(str(p) for p in removed[:5])
            warn(
                f"difforge: corrupted cache entry {shown} removed ({_summary(first)}); recompiled",
                CacheWarning,
            )
            return result
    if not named and not any(isinstance(e, _IO_ERRORS) for e in _exception_chain(first)):
        raise first
    recompiled = False
    try:
        result = _compile_in_scratch(compile_fn)
        recompiled = True
    except Exception:  # a real compile error: report the original one, unchanged
        pass
    finally:
        _state.layout = layout
    if not recompiled:
        raise first
    _quarantine(layout)
    warn(
        f"difforge: the cache folder {layout.root} broke this compile ({_summary(first)}) "
        "but an empty one did not; emptied it and recompiled",
        CacheWarning,
    )
    return result


def compile_in_cache(layout: CacheLayout, compile_fn: Callable[[], T]) -> T:
    """Run ``compile_fn`` with Inductor and Triton pointed at ``layout`` (:func:`using_cache`).

    If it raises and the error names artifacts of the cache (or a check now fails on some),
    they are removed, one warning says so, and ``compile_fn`` runs once more; if that is not
    enough, or the error looks like an unreadable file, it runs against an empty folder and,
    when that works, the cache is emptied. Any other error is raised unchanged. Nested
    calls (and nested :func:`using_cache` of the same root) run as they are: the outermost
    owns the folder and the retry.
    """
    if getattr(_state, "layout", None) is not None:
        return compile_fn()
    with using_cache(layout) as active:
        if not active:
            return compile_fn()
        _state.layout = layout
        try:
            try:
                return compile_fn()
            except Exception as exc:
                if _never_retried(exc):
                    raise
                first = exc
            return _recover(layout, compile_fn, first)
        finally:
            _state.layout = None


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
