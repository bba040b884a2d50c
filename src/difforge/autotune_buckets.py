"""Autotune winners shared between nearby GEMM sizes (``autotune.bucket``).

Inductor's ``max-autotune`` benchmarks every GEMM shape once per process (and, with
``cache-all``, once per cache folder), keyed by the exact sizes. A static-shape recompile
at a new resolution (PixArt 1024² = 4096 tokens, then 4080) changes M, the dimension that
scales with ``batch * tokens``, so every GEMM is tuned again although N, K and the best
kernel are the same. This module remembers each autotune's winner under a key in which
M is left out (N, K, batch dims, dtypes, strides, device, torch version and the set of
candidate kernel families stay exact), next to the M it was measured at. A later
autotune whose key has a winner measured at an M within ``autotune.bucket_ratio``
(default 1.25: ``max(M, M0) / min(M, M0) <= 1.25``) is restricted to that winner's
kernel and config, so Inductor takes its single-choice path and benchmarks nothing.

Why a window around measured sizes and not fixed buckets (next power of two, or
geometric buckets): fixed bucket edges split sizes 0.1% apart (4095 | 4097 for powers of
two) while grouping sizes up to 2x apart (4097 with 8191: twice the row tiles, a
different wave count on the GPU). The window shares exactly the sizes within the ratio
of a *measured* one, picks the nearest, and never drifts: only benchmarked winners are
recorded, never reused ones. 1.25 keeps the number of M tiles within 25% of the
measured case; whether that costs step time is unmeasured on a GPU (README).

Correctness never depends on the table: Inductor regenerates the candidates for the new
shape and we only pick among them. When the winner is not among them (its config is
invalid for the new M, another backend set, another torch), Inductor autotunes as usual.

How it hooks in (private Inductor API, present from torch 2.9 to 2.13; checked at import,
else bucketing is off with one log line): the global ``AlgorithmSelectorCache`` runs its
``preprocessing_fns`` on the candidate list before its ``len(choices) == 1`` shortcut,
and calls its ``feedback_saver_fns`` with the timings after benchmarking. Both are
installed only while difforge's Inductor call runs (:func:`bucketing`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from difforge.errors import warn

if TYPE_CHECKING:
    from difforge.options import CompileConfig

log = logging.getLogger("difforge")

try:  # private Inductor API, guarded: bucketing is off where it differs
    import torch._inductor.select_algorithm as _select_algorithm

    _AVAILABLE = all(
        hasattr(_select_algorithm.AlgorithmSelectorCache, name)
        for name in ("add_preprocessing_fn", "add_feedback_saver")
    )
except ImportError:  # pragma: no cover - depends on the torch build
    _select_algorithm = None  # type: ignore[assignment]
    _AVAILABLE = False

#: Table file format; a file with another version is ignored (and replaced on save).
FORMAT_VERSION = 1
DEFAULT_RATIO = 1.25
_COUNTERS = "difforge"
_INDEX_SUFFIX = re.compile(r"_\d+$")

_lock = threading.Lock()
_warned_unavailable = False


def counter(name: str) -> None:
    """Bump ``torch._dynamo.utils.counters['difforge'][name]`` (tests read it)."""
    from torch._dynamo.utils import counters

    counters[_COUNTERS][f"autotune.{name}"] += 1


def available() -> bool:
    """Whether this torch has the two selector hooks bucketing needs."""
    return _AVAILABLE


# ------------------------------------------------------------------------- the key


def _as_int(value: Any) -> int | None:
    """An int for a concrete size or stride; None for a symbolic one (dynamic shapes)."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _dims(values: Sequence[Any], m: int, stride: bool) -> list[int | str] | None:
    """Sizes (or strides) with M written as the token "M" (strides: "M*q" for multiples
    of M, which is how a row-major operand's outer strides grow with M). Callers pass
    ``stride=True`` only for tensors with an M-sized dim: a packed weight's 2048 is not
    "4 * M" at M = 512."""
    out: list[int | str] = []
    for value in values:
        v = _as_int(value)
        if v is None:
            return None
        if not m:
            out.append(v)
        elif v == m:
            out.append("M")
        elif stride and v and v % m == 0:
            out.append(f"M*{v // m}")
        else:
            out.append(v)
    return out


def _device(device: Any) -> str:
    """The device part of the key: tuned results do not carry over between GPU models."""
    kind = getattr(device, "type", str(device))
    if kind == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return f"cuda:{props.name}:{props.major}.{props.minor}"
    return str(kind)


def family(choice: Any) -> str:
    """A kernel's family: its name without the per-call index ('triton_mm_7' -> 'triton_mm')."""
    return _INDEX_SUFFIX.sub("", str(getattr(choice, "name", type(choice).__name__)))


def identity(choice: Any, m: int) -> str:
    """What identifies a candidate across sizes: family, config description (block sizes,
    warps, stages) and an extern kernel's keyword arguments (alpha, beta), with M written
    as "M" where it appears (the CPU's packed linear passes ``batch_size=M``)."""
    kwargs = getattr(choice, "kwargs", None) or {}
    parts = []
    if isinstance(kwargs, dict):
        for name in sorted(kwargs):
            value = kwargs[name]
            shown = "M" if type(value) is int and value == m else repr(value)
            parts.append(f"{name}={shown}")
    description = re.sub(rf"(?<![\w.]){m}(?![\w.])", "M", str(getattr(choice, "description", "")))
    return f"{family(choice)}|{description}|{','.join(parts)}"


def shape_key(choices: Sequence[Any]) -> tuple[str, int] | None:
    """``(key without M, M)`` for one autotune's candidates, or None when it is not a GEMM
    with concrete sizes (convolutions, flex attention, dynamic shapes: left to Inductor).

    M is the output's second-to-last size (``[*batch, M, N]`` for mm, addmm, bmm and
    Inductor's packed CPU linear). Where M's value also sits at another place (N == M, or
    an input with M twice, such as K == M), the key keeps M exactly: no sharing, rather
    than sharing across a different N or K.
    """
    if not choices:
        return None
    first = choices[0]
    layout = first.layout
    size = list(layout.size)
    if len(size) not in (2, 3):
        return None
    m = _as_int(size[-2])
    if m is None or m < 1:
        return None
    out_size = _dims(size, m, stride=False)
    out_stride = _dims(list(layout.stride), m, stride=True)
    if out_size is None or out_stride is None:
        return None
    exact = out_size.count("M") != 1
    inputs = []
    for node in first.input_nodes:
        sizes = _dims(list(node.get_size()), m, stride=False)
        if sizes is None:
            return None
        # Strides of a tensor without an M-sized dim (a packed weight) stay exact.
        strides = _dims(list(node.get_stride()), m if "M" in sizes else 0, stride=True)
        if strides is None:
            return None
        exact = exact or sizes.count("M") > 1
        inputs.append([str(node.get_dtype()), sizes, strides])
    families = sorted({family(c) for c in choices})
    key = [
        torch.__version__,
        _device(layout.device),
        families,
        [str(layout.dtype), out_size, out_stride],
        inputs,
    ]
    if exact:
        key.append(f"M={m}")
    return json.dumps(key, separators=(",", ":")), m


def within(m0: int, m: int, ratio: float) -> bool:
    """Whether a winner measured at M = ``m0`` may serve M = ``m``."""
    return max(m0, m) <= ratio * min(m0, m)


# ------------------------------------------------------------------------- the table


@dataclass
class Winner:
    choice: str
    """:func:`identity` of the fastest candidate."""
    ms: float
    """Its benchmark time in milliseconds as Inductor measured it (for the record only)."""


class BucketTable:
    """Winners by key and measured M; kept in memory, persisted as JSON when ``path`` is set.

    The file is written atomically (temporary file + rename) after a compilation that
    recorded something, merged with what other processes wrote meanwhile. An unreadable
    or malformed file gives one warning and is treated as empty (and replaced).
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.entries: dict[str, dict[int, Winner]] = {}
        self.dirty = False
        if path is not None:
            self.entries = self._read(path, report=True)

    @staticmethod
    def _read(path: Path, report: bool) -> dict[str, dict[int, Winner]]:
        try:
            raw = json.loads(path.read_text())
            if not isinstance(raw, dict) or raw.get("version") != FORMAT_VERSION:
                raise ValueError(f"not a version-{FORMAT_VERSION} autotune bucket table")
            entries: dict[str, dict[int, Winner]] = {}
            for key, by_m in raw["entries"].items():
                entries[str(key)] = {
                    int(m): Winner(str(w["choice"]), float(w["ms"])) for m, w in by_m.items()
                }
            return entries
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            if report:
                from difforge.cache import CacheWarning

                warn(
                    f"difforge: ignoring the autotune bucket table {path} ({exc}); it is "
                    "replaced at the next autotune",
                    CacheWarning,
                )
            return {}

    def nearest(self, key: str, m: int, ratio: float) -> tuple[int, Winner] | None:
        """The winner measured at the M nearest to ``m`` (by ratio) within ``ratio``."""
        by_m = self.entries.get(key)
        if not by_m:
            return None
        m0 = min(by_m, key=lambda x: (abs(math.log(x / m)), x))
        return (m0, by_m[m0]) if within(m0, m, ratio) else None

    def record(self, key: str, m: int, winner: Winner) -> None:
        self.entries.setdefault(key, {})[m] = winner
        self.dirty = True

    def save(self) -> None:
        """Write the table (merged with the file's current contents) if anything changed."""
        if self.path is None or not self.dirty:
            return
        merged = self._read(self.path, report=False)
        for key, by_m in self.entries.items():
            merged.setdefault(key, {}).update(by_m)
        self.entries = merged
        data = {
            "version": FORMAT_VERSION,
            "entries": {
                key: {str(m): {"choice": w.choice, "ms": w.ms} for m, w in by_m.items()}
                for key, by_m in merged.items()
            },
        }
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".buckets.", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError as exc:  # an unwritable cache: keep the table in memory only
            log.warning(
                "difforge: could not write the autotune bucket table %s: %s", self.path, exc
            )
            with contextlib.suppress(OSError, UnboundLocalError):
                os.unlink(tmp)
            self.path = None  # warn once, not after every compilation
            return
        self.dirty = False


#: One table per file (None: the in-memory table of processes without cache-all).
_tables: dict[Path | None, BucketTable] = {}


def table_for(root: Path | None) -> BucketTable:
    """The process-wide table for a difforge cache root (``<root>/autotune/buckets.json``)."""
    from difforge.cache import CacheLayout

    path = None if root is None else CacheLayout(Path(root)).autotune / "buckets.json"
    with _lock:
        if path not in _tables:
            _tables[path] = BucketTable(path)
        return _tables[path]


# ------------------------------------------------------------------------- the hook


class BucketHook:
    """The preprocessing function and feedback saver installed on Inductor's selector."""

    def __init__(self, table: BucketTable, ratio: float) -> None:
        self.table = table
        self.ratio = ratio
        # Candidates of autotunes that were left to Inductor, by id (the objects are kept
        # alive here until the compilation ends, so ids are not reused meanwhile).
        self._pending: dict[int, tuple[Any, str, int]] = {}

    def preprocess(self, choices: list[Any]) -> list[Any]:
        """Restrict ``choices`` to a recorded winner of a nearby M, else return them all."""
        try:
            return self._preprocess(choices)
        except Exception as exc:  # private structures changed: never fail a compile
            log.debug("difforge: autotune bucketing skipped one GEMM: %r", exc)
            return choices

    def _preprocess(self, choices: list[Any]) -> list[Any]:
        if len(choices) < 2:
            return choices
        keyed = shape_key(choices)
        if keyed is None:
            return choices
        key, m = keyed
        found = self.table.nearest(key, m, self.ratio)
        if found is not None:
            m0, winner = found
            for choice in choices:
                if identity(choice, m) == winner.choice:
                    counter("bucket_hit")
                    log.debug("difforge: M=%d reuses the autotune winner of M=%d", m, m0)
                    return [choice]
            # The winner cannot be built for this M (config filtered out): tune normally.
            counter("bucket_fallback")
        else:
            counter("bucket_miss")
        for choice in choices:
            self._pending[id(choice)] = (choice, key, m)
        return choices

    def feedback(
        self, timings: dict[Any, float], name: str, input_nodes: Any, choices: Any, *rest: Any
    ) -> None:
        """Record the fastest finite candidate of an autotune that was left to Inductor."""
        try:
            finite = {c: t for c, t in timings.items() if math.isfinite(t)}
            if not finite:
                return
            best = min(finite, key=finite.__getitem__)
            pending = self._pending.get(id(best))
            if pending is None or pending[0] is not best:
                return  # not a GEMM we keyed (convolution, ...)
            _, key, m = pending
            self.table.record(key, m, Winner(identity(best, m), float(finite[best])))
            counter("bucket_recorded")
        except Exception as exc:  # pragma: no cover - defensive, as above
            log.debug("difforge: autotune bucketing could not record a winner: %r", exc)


def _selector_cache() -> Any:
    getter = getattr(_select_algorithm, "get_algorithm_selector_cache", None)
    if getter is not None:
        return getter()
    # Older layout: a module global created on first use.
    if getattr(_select_algorithm, "_ALGORITHM_SELECTOR_CACHE", None) is None:
        _select_algorithm._ALGORITHM_SELECTOR_CACHE = _select_algorithm.AlgorithmSelectorCache()
    return _select_algorithm._ALGORITHM_SELECTOR_CACHE


def _remove(items: list[Callable[..., Any]], fn: Callable[..., Any]) -> None:
    with contextlib.suppress(ValueError):
        items.remove(fn)


@contextlib.contextmanager
def bucketing(
    enabled: bool, ratio: float = DEFAULT_RATIO, cache_root: Path | None = None
) -> Iterator[BucketHook | None]:
    """Install the hook on Inductor's selector for the duration (no-op when disabled or
    when this torch lacks the hooks); saves the table afterwards."""
    global _warned_unavailable
    if not enabled:
        yield None
        return
    if not _AVAILABLE:
        if not _warned_unavailable:
            _warned_unavailable = True
            log.warning(
                "difforge: this torch's Inductor has no autotune preprocessing/feedback "
                "hooks (torch %s); autotune.bucket is off",
                torch.__version__,
            )
        yield None
        return
    hook = BucketHook(table_for(cache_root), ratio)
    cache = _selector_cache()
    cache.add_preprocessing_fn(hook.preprocess)
    cache.add_feedback_saver(hook.feedback)
    try:
        yield hook
    finally:
        # Remove only our own functions: other tools' savers (autoheuristic) stay.
        _remove(getattr(cache, "preprocessing_fns", []), hook.preprocess)
        _remove(getattr(cache, "feedback_saver_fns", []), hook.feedback)
        hook._pending.clear()
        with _lock:
            hook.table.save()


def settings_for(config: CompileConfig, patches: Mapping[str, Any]) -> tuple[bool, float]:
    """(on, ratio) for one compilation: on when ``autotune.bucket`` is set and Inductor
    autotunes GEMMs (``max-autotune``, an explicit option or the global Inductor config)."""
    import torch._inductor.config as inductor_config

    autotunes = any(
        patches.get(name, getattr(inductor_config, name, False))
        for name in ("max_autotune", "max_autotune_gemm")
    )
    on = bool(config.settings.get("autotune.bucket", False)) and bool(autotunes)
    return on, float(config.settings.get("autotune.bucket_ratio", DEFAULT_RATIO))


def bucketing_for(
    config: CompileConfig, patches: Mapping[str, Any]
) -> contextlib.AbstractContextManager[BucketHook | None]:
    """:func:`bucketing` as ``config`` asks for it; the table is on disk under cache-all."""
    on, ratio = settings_for(config, patches)
    return bucketing(on, ratio, config.cache_dir if config.cache_enabled else None)


def cache_salt(config: CompileConfig, patches: Mapping[str, Any]) -> bytes:
    """Part of the FX-graph cache key: graphs compiled with reused winners are not served
    to a compilation with bucketing off (an A/B run must really autotune)."""
    on, ratio = settings_for(config, patches)
    return f"autotune.bucket_ratio={ratio}".encode() if on and _AVAILABLE else b""
