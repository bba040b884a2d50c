"""Save and load a compiled pipeline's artifacts, so a new process skips Inductor.

>>> pipe = compile_pipe(pipe, options=opts); pipe(...)          # first process
>>> save_pipe(pipe, "compiled/pixart")
>>> pipe = compile_pipe(pipe, options=opts)                      # any later process
>>> load_pipe(pipe, "compiled/pixart")                           # before the first run
>>> pipe(...)                                                    # cache hits, no codegen

The folder holds torch's portable cache artifacts (``torch.compiler.save_cache_artifacts``:
FX-graph and AOT-autograd cache entries, with their Triton kernels and autotune results)
plus ``difforge_meta.json`` describing where and how they were made. ``load_pipe`` hot-loads
them into the local caches only when that description matches this process and the pipe's
compile options; otherwise it warns and the pipe compiles as usual, so a stale folder costs
time, never correctness. Dynamo still traces each graph on load (cheap); Inductor's lowering
and code generation are what is skipped. On the CPU, Inductor still runs the C++ compiler
on the loaded kernel sources; on GPUs the compiled Triton kernels come with the artifacts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import difforge
from difforge.cache import CacheLayout, using_cache
from difforge.diffusers.pipe import PipeState, _original, pipe_state
from difforge.diffusers.pipe_methods import component
from difforge.errors import DifforgeError, warn

__all__ = ["ARTIFACTS_FILE", "META_FILE", "LoadResult", "environment", "load_pipe", "save_pipe"]

META_FILE = "difforge_meta.json"
ARTIFACTS_FILE = "cache_artifacts.bin"
FORMAT = 1


@dataclass
class LoadResult:
    """What :func:`load_pipe` did. Truthy when the artifacts were loaded."""

    loaded: bool
    reason: str
    mismatches: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    """Field -> (saved value, current value) for every field that differed."""
    artifacts: dict[str, int] = field(default_factory=dict)
    """Artifact kind (``inductor``, ``aot_autograd``, ``autotune`` …) -> how many loaded."""

    def __bool__(self) -> bool:
        return self.loaded


# --------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return str(getattr(triton, "__version__", None))


def _cpu_isa() -> str | None:
    # Inductor's C++ kernels are specialised to the vector ISA it picks (AVX2, AVX512 …).
    try:
        from torch._inductor.cpu_vec_isa import pick_vec_isa

        return str(pick_vec_isa()) or "none"
    except Exception:  # private API: an unknown answer just means "not compared"
        return None


def environment(device: torch.device | str = "cpu") -> dict[str, Any]:
    """The facts that decide whether compiled artifacts made elsewhere are valid here."""
    device = torch.device(device)
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "difforge": difforge.__version__,
    }
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        env["device"] = torch.cuda.get_device_name(index)
        env["compute_capability"] = f"{major}.{minor}"
    else:
        env["device"] = device.type
        env["compute_capability"] = None
        if device.type == "cpu":
            env["cpu_isa"] = _cpu_isa()
    return env


def _pipe_device(pipe: Any, state: PipeState) -> torch.device:
    """Where the compiled components run: the pipeline's execution device (right under
    CPU offload too), else their parameters' device."""
    with contextlib.suppress(Exception):  # diffusers internals; the fallback is fine
        device = pipe._execution_device
        if isinstance(device, torch.device):
            return device
    for name in state.compiled:
        module = _original(component(pipe, name))
        param = next(iter(module.parameters()), None) if module is not None else None
        if param is not None:
            return param.device
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the new one, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _cache_api() -> tuple[Any, Any] | None:
    """``torch.compiler``'s save/load of portable cache artifacts (torch >= 2.7)."""
    compiler = getattr(torch, "compiler", None)
    save = getattr(compiler, "save_cache_artifacts", None)
    load = getattr(compiler, "load_cache_artifacts", None)
    return (save, load) if save is not None and load is not None else None


def _counts(info: Any) -> dict[str, int]:
    artifacts = getattr(info, "artifacts", None) or {}
    return {str(kind): len(keys) for kind, keys in artifacts.items()}


def _require_state(pipe: Any, action: str) -> PipeState:
    state = pipe_state(pipe)
    if state is None or not state.compiled:
        raise DifforgeError(
            f"{action} needs a pipe that went through difforge.diffusers.compile_pipe(); "
            "this one has no compiled components"
        )
    return state


# --------------------------------------------------------------------------------------------
# save_pipe
# --------------------------------------------------------------------------------------------


def _bypassed_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["inductor"].get("fxgraph_cache_bypass", 0))


def save_pipe(pipe: Any, path: str | os.PathLike[str]) -> Path:
    """Save what this process compiled for ``pipe`` into the folder ``path``.

    Call it after the pipe has run at least once (torch compiles at the first call).
    The artifacts are everything Inductor compiled in this process, so a folder saved
    after several pipes can serve them all. Returns the folder.
    """
    state = _require_state(pipe, "save_pipe")
    if not state.ran:
        raise DifforgeError(
            "save_pipe: the pipe has not run yet, so nothing is compiled (torch compiles at "
            "the first call); run it once at the shapes you serve, then save"
        )
    api = _cache_api()
    if api is None:
        raise DifforgeError(
            f"save_pipe needs torch.compiler.save_cache_artifacts (torch >= 2.7); "
            f"this is torch {torch.__version__}"
        )
    result = api[0]()
    if result is None:
        raise DifforgeError(
            "save_pipe: torch recorded no cache artifacts in this process; Inductor's FX graph "
            "cache is probably off (torch._inductor.config.fx_graph_cache / "
            "TORCHINDUCTOR_FX_GRAPH_CACHE=0)"
        )
    data, info = result
    bypassed = _bypassed_graphs()
    if bypassed:
        warn(
            f"difforge: {bypassed} graph(s) could not be put in Inductor's FX graph cache; "
            "they will be compiled again after load_pipe",
        )
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "environment": environment(_pipe_device(pipe, state)),
        "pipeline": type(pipe).__name__,
        "components": sorted(state.compiled),
        "options": dict(sorted(state.compiled.items())),
        "artifacts": {
            "file": ARTIFACTS_FILE,
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "counts": _counts(info),
        },
    }
    # Artifacts first, metadata last: the metadata's checksum pairs them up for readers.
    _atomic_write(folder / ARTIFACTS_FILE, data)
    _atomic_write(folder / META_FILE, json.dumps(meta, indent=2, sort_keys=True).encode())
    return folder


# --------------------------------------------------------------------------------------------
# load_pipe
# --------------------------------------------------------------------------------------------


def _mismatches(meta: dict[str, Any], pipe: Any, state: PipeState) -> dict[str, tuple[Any, Any]]:
    """Every field where the saved folder and this process/pipe differ."""
    out: dict[str, tuple[Any, Any]] = {}
    if meta.get("format") != FORMAT:
        out["format"] = (meta.get("format"), FORMAT)
    saved_env = meta.get("environment") or {}
    current_env = environment(_pipe_device(pipe, state))
    for key in sorted(set(saved_env) | set(current_env)):
        if saved_env.get(key) != current_env.get(key):
            out[key] = (saved_env.get(key), current_env.get(key))
    saved_components = sorted(meta.get("components") or [])
    if saved_components != sorted(state.compiled):
        out["components"] = (saved_components, sorted(state.compiled))
    saved_options = meta.get("options") or {}
    for name in sorted(set(saved_options) & set(state.compiled)):
        if saved_options[name] != state.compiled[name]:
            out[f"options[{name}]"] = (saved_options[name], state.compiled[name])
    return out


def _not_loaded(reason: str, mismatches: dict[str, tuple[Any, Any]] | None = None) -> LoadResult:
    warn(f"difforge: load_pipe did not load anything: {reason}")
    return LoadResult(False, reason, mismatches or {})


def _describe(mismatches: dict[str, tuple[Any, Any]]) -> str:
    def short(value: Any) -> str:
        text = repr(value)
        return text if len(text) <= 120 else f"{text[:117]}..."

    fields = "; ".join(f"{k}: saved {short(a)}, now {short(b)}" for k, (a, b) in mismatches.items())
    return (
        f"the saved folder does not match this process or the pipe's compile options "
        f"(mismatched fields: {', '.join(mismatches)}): {fields}; compiling normally instead"
    )


def _graph_cache_off(state: PipeState) -> bool:
    import torch._inductor.config as inductor_config

    default = bool(getattr(inductor_config, "fx_graph_cache", False))
    for config in state.configs.values():
        patched = config.inductor_patches().get("fx_graph_cache") if config else None
        if (default if patched is None else bool(patched)) is False:
            return True
    return False


@contextlib.contextmanager
def _cache_dir(layout: CacheLayout | None) -> Iterator[None]:
    with using_cache(layout) if layout is not None else contextlib.nullcontext():
        yield


def _target_layouts(state: PipeState) -> list[CacheLayout | None]:
    """The cache folders the compiled components will read: ``cache-all`` points a
    component at the difforge cache (its own layout), else Inductor's current folder."""
    layouts: list[CacheLayout | None] = []
    for config in state.configs.values():
        layout = CacheLayout(config.cache_dir) if config and config.cache_enabled else None
        if layout not in layouts:
            layouts.append(layout)
    return layouts or [None]


def load_pipe(pipe: Any, path: str | os.PathLike[str]) -> LoadResult:
    """Load artifacts saved by :func:`save_pipe` for a pipe just set up by ``compile_pipe``.

    Call it after ``compile_pipe`` (same options as when saved) and before the first run.
    Any difference in torch/triton/CUDA/Python/difforge versions, the device, the compiled
    components or their options is reported in one warning and nothing is loaded; the pipe
    then compiles as usual. Raises ``FileNotFoundError`` when ``path`` holds no saved pipe.
    """
    state = _require_state(pipe, "load_pipe")
    folder = Path(path)
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"load_pipe: no {META_FILE} in {folder} (save it with save_pipe)")
    if state.ran:
        return _not_loaded(
            "the pipe has already run, so its graphs are compiled in this process; it is too "
            "late for load_pipe here (call it right after compile_pipe, before the first run)"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        return _not_loaded(f"{meta_path} is unreadable ({err})")
    mismatches = _mismatches(meta, pipe, state)
    if mismatches:
        return _not_loaded(_describe(mismatches), mismatches)
    api = _cache_api()
    if api is None:
        return _not_loaded(f"torch {torch.__version__} has no torch.compiler.load_cache_artifacts")
    if _graph_cache_off(state):
        return _not_loaded(
            "Inductor's FX graph cache is off (torch._inductor.config.fx_graph_cache), so "
            "loaded artifacts would never be read"
        )
    artifacts = meta.get("artifacts") or {}
    try:
        data = (folder / str(artifacts.get("file", ARTIFACTS_FILE))).read_bytes()
    except OSError as err:
        return _not_loaded(f"cannot read the artifacts ({err})")
    if hashlib.sha256(data).hexdigest() != artifacts.get("sha256"):
        return _not_loaded("the artifacts file does not match the checksum in its metadata")

    counts: dict[str, int] = {}
    for layout in _target_layouts(state):
        with _cache_dir(layout):
            info = api[1](data)
        if info is None:
            return _not_loaded("torch could not read the artifacts file")
        counts = _counts(info)
    return LoadResult(True, "loaded", {}, counts)
