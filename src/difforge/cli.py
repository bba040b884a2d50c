"""The ``difforge`` command line: ``info``, ``cache info|clear``, ``bench``.

Also reachable as ``python -m difforge``. :func:`main` returns an exit code instead of
exiting, so tests and other tools can call it in-process.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from tabulate import tabulate

from difforge._version import __version__

PROG = "difforge"

INFO_HELP = "versions, GPUs, and which features are available here (and why not)"
CACHE_HELP = "show or clear difforge's compile cache"
BENCH_HELP = "the text-to-image benchmark (all further arguments go to it)"

CLEAR_DESCRIPTION = """\
Remove difforge's own cache folders, <root>/inductor, <root>/triton, <root>/autotune and
<root>/precompile, and the root itself if that leaves it empty. Nothing else under the root
is touched.

With --inductor-default, also remove torch Inductor's default cache folder
($TORCHINDUCTOR_CACHE_DIR, or /tmp/torchinductor_$USER), which difforge does not own:
this replaces the seed's `python3 -m nexfort.utils.clear_inductor_cache`.
"""


class CliError(Exception):
    """A user-facing failure: printed as 'difforge: error: ...' with exit code 1."""


def _table(rows: Sequence[Sequence[Any]], headers: Sequence[str], out: TextIO | None = None) -> str:
    """A plain-text table; on a terminal the last column wraps to fit its width."""
    widths = None
    if out is not None and out.isatty() and rows:
        used = sum(
            max(len(str(r[i])) for r in [headers, *rows]) + 2 for i in range(len(headers) - 1)
        )
        last = max(30, shutil.get_terminal_size().columns - used - 1)
        widths = [None] * (len(headers) - 1) + [last]
    return tabulate(
        rows, headers=headers, tablefmt="simple", disable_numparse=True, maxcolwidths=widths
    )


def _section(title: str, out: TextIO) -> None:
    print(f"\n{title}", file=out)
    print("-" * len(title), file=out)


# ---------------------------------------------------------------------------- info


def _cmd_info(args: argparse.Namespace, out: TextIO) -> int:
    from difforge.info import ENV_VARS, report

    data = report()
    if args.json:
        json.dump(data, out, indent=2)
        print(file=out)
        return 0

    _section("Versions", out)
    print(_table(list(data["versions"].items()), ["package", "version"]), file=out)
    print(f"platform: {data['platform']}", file=out)

    cuda = data["cuda"]
    _section("GPU", out)
    print(f"CUDA available: {'yes' if cuda['available'] else 'no'}", file=out)
    print(f"CUDA version (torch built with): {cuda['cuda_version'] or 'none'}", file=out)
    if cuda["hip_version"]:
        print(f"ROCm/HIP version: {cuda['hip_version']}", file=out)
    print(f"cuDNN version: {cuda['cudnn_version'] or 'not available'}", file=out)
    if cuda["gpus"]:
        rows = [
            [g["index"], g["name"], g["capability"], f"{g['memory_gib']:.1f} GiB", g["sm_count"]]
            for g in cuda["gpus"]
        ]
        print(_table(rows, ["#", "name", "compute capability", "memory", "SMs"]), file=out)
    else:
        print("GPUs: none visible", file=out)

    _section("Features", out)
    rows = [
        [f["name"], "available" if f["available"] else "not available", f["reason"]]
        for f in data["features"]
    ]
    print(_table(rows, ["feature", "status", "why"], out), file=out)

    _section("Modes (options={'mode': 'a:b'})", out)
    print(_table(list(data["modes"].items()), ["mode", "what it does"]), file=out)
    rows = [
        [name, " + ".join(modes) or "(Inductor defaults)"]
        for name, modes in data["presets"].items()
    ]
    print(file=out)
    print(_table(rows, ["preset", "modes"]), file=out)

    _section("Environment", out)
    rows = [
        [name, value if value is not None else "(not set)", ENV_VARS[name]]
        for name, value in data["environment"].items()
    ]
    print(_table(rows, ["variable", "value", "meaning"], out), file=out)
    print(f"\ndifforge cache folder: {data['cache_dir']}", file=out)
    return 0


# --------------------------------------------------------------------------- cache


def _cache_root(args: argparse.Namespace) -> Path:
    from difforge.options import default_cache_dir

    return Path(args.dir).expanduser() if args.dir else default_cache_dir()


def _cmd_cache_info(args: argparse.Namespace, out: TextIO) -> int:
    from difforge.cache import cache_info, human_size

    root = _cache_root(args)
    data = cache_info(root)
    if args.json:
        json.dump(data, out, indent=2)
        print(file=out)
        return 0

    print(f"difforge cache root: {data['root']}", file=out)
    rows = []
    total_bytes = total_files = 0
    for path, sizes in data["folders"].items():
        exists = Path(path).exists()
        rows.append(
            [
                path,
                human_size(sizes["bytes"]) if exists else "-",
                sizes["files"] if exists else "(missing)",
            ]
        )
        total_bytes += sizes["bytes"]
        total_files += sizes["files"]
    rows.append(["total", human_size(total_bytes), total_files])
    print(_table(rows, ["folder", "size", "files"]), file=out)

    default = data["torch_inductor_default"]
    print(
        f"\ntorch Inductor's default cache (not owned by difforge; "
        f"`difforge cache clear --inductor-default` removes it):\n"
        f"  {default['path']}: {human_size(default['bytes'])}, {_files(default['files'])}",
        file=out,
    )
    if _overlaps(Path(default["path"]), root):
        print("  (it overlaps the difforge cache root, so the sizes above are shared)", file=out)
    return 0


def _files(n: int) -> str:
    return f"{n} file" if n == 1 else f"{n} files"


def _overlaps(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def _is_precious(path: Path) -> bool:
    """The filesystem root, the home folder or one of its ancestors: never a cache."""
    resolved = path.expanduser().resolve()
    home = Path.home().resolve()
    return resolved == Path(resolved.anchor) or resolved == home or resolved in home.parents


def _refuse_unsafe_root(root: Path) -> None:
    # The owned folders have generic names ("triton"): under $HOME or / they may well be
    # a user's source checkout rather than a cache.
    resolved = root.expanduser().resolve()
    if _is_precious(resolved):
        raise CliError(
            f"refusing to clear {resolved}/inductor and {resolved}/triton: {resolved} is the "
            "filesystem root or your home folder, not a cache folder; pass --dir with the "
            "cache folder itself"
        )
    for sub in ("inductor", "triton"):
        if (resolved / sub / ".git").exists():
            raise CliError(
                f"refusing to clear {resolved / sub}: it is a git checkout, not a cache folder"
            )


def _cmd_cache_clear(args: argparse.Namespace, out: TextIO) -> int:
    from difforge.cache import CacheLayout, clear_cache, inductor_default_dir

    root = _cache_root(args)
    _refuse_unsafe_root(root)
    targets = [p for p in CacheLayout(root).owned() if p.exists()]
    if args.inductor_default:
        inductor_dir = inductor_default_dir()
        if _is_precious(inductor_dir):
            raise CliError(
                f"refusing to remove Inductor's cache folder {inductor_dir}: it is the "
                "filesystem root or contains your home folder (check TORCHINDUCTOR_CACHE_DIR)"
            )
        if inductor_dir.exists():
            targets.append(inductor_dir)
    if not targets:
        print(f"nothing to remove (cache root: {root})", file=out)
        return 0
    if args.dry_run:
        for path in targets:
            print(f"would remove {path}", file=out)
        return 0
    # Ask only when a person is there to answer; scripts and CI run straight through.
    if not args.yes and sys.stdin is not None and sys.stdin.isatty():
        print("This removes:", file=out)
        for path in targets:
            print(f"  {path}", file=out)
        answer = input("Proceed? [y/N] ").strip().lower()
        if answer not in ("y", "yes"):
            print("aborted, nothing removed", file=out)
            return 1
    removed = clear_cache(root, include_inductor_default=args.inductor_default)
    if not removed:
        print(f"nothing to remove (cache root: {root})", file=out)
    for path in removed:
        print(f"removed {path}", file=out)
    return 0


# --------------------------------------------------------------------------- bench


def _cmd_bench(argv: list[str], err: TextIO) -> int:
    """Hand everything after `bench` to ``difforge.bench.main`` if it is installed."""
    try:
        bench = importlib.import_module("difforge.bench")
    except ModuleNotFoundError as e:
        # Only a missing difforge.bench means "not installed"; a missing dependency of
        # the benchmark is a real error and must surface with its own name.
        if e.name != "difforge.bench":
            raise
        print(
            f"{PROG}: error: the benchmark is not installed in this version "
            f"(difforge {__version__} has no difforge.bench module)",
            file=err,
        )
        return 2
    entry = getattr(bench, "main", None)
    if not callable(entry):
        print(f"{PROG}: error: difforge.bench has no main(argv) function", file=err)
        return 2
    try:
        code = entry(argv)
    except SystemExit as e:  # the benchmark's own argparse exits on --help or bad args
        return _exit_code(e.code)
    return _exit_code(code)


# ---------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for docs and tests)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="difforge: a torch.compile backend for diffusion models.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    info = sub.add_parser("info", help=INFO_HELP, description=INFO_HELP)
    info.add_argument("--json", action="store_true", help="print JSON instead of tables")
    info.set_defaults(handler=_cmd_info)

    cache = sub.add_parser("cache", help=CACHE_HELP, description=CACHE_HELP)
    cache_sub = cache.add_subparsers(dest="cache_command", metavar="ACTION")
    dir_help = (
        "cache root (default: $DIFFORGE_CACHE_DIR, else $TORCHINDUCTOR_CACHE_DIR/difforge if "
        "you set it, else $XDG_CACHE_HOME/difforge or ~/.cache/difforge)"
    )

    cache_info = cache_sub.add_parser(
        "info", help="where the cache is and how big", description="Where the cache is and how big."
    )
    cache_info.add_argument("--dir", metavar="PATH", help=dir_help)
    cache_info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    cache_info.set_defaults(handler=_cmd_cache_info)

    clear = cache_sub.add_parser(
        "clear",
        help="remove difforge's cache folders",
        description=CLEAR_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    clear.add_argument("--dir", metavar="PATH", help=dir_help)
    clear.add_argument(
        "--inductor-default",
        action="store_true",
        help="also remove torch Inductor's default cache folder (replaces "
        "`python3 -m nexfort.utils.clear_inductor_cache`)",
    )
    clear.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    clear.add_argument("--dry-run", action="store_true", help="only print what would be removed")
    clear.set_defaults(handler=_cmd_cache_clear)
    cache.set_defaults(handler=None, subparser=cache)

    # Listed for --help only: main() hands `bench ...` over before argparse sees it.
    sub.add_parser("bench", help=BENCH_HELP, add_help=False)
    return parser


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)  # SystemExit("message") convention: print, exit 1
    return 1


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return _cmd_bench(argv[1:], sys.stderr)

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version and usage errors
        return _exit_code(e.code)

    handler = getattr(args, "handler", None)
    if handler is None:
        # `difforge` or `difforge cache` without an action: show what there is.
        (getattr(args, "subparser", None) or parser).print_help(sys.stderr)
        return 2
    try:
        return handler(args, sys.stdout)
    except BrokenPipeError:
        # `difforge info | head`: the reader left; exit quietly, and keep Python from
        # complaining again when it flushes stdout at shutdown.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except CliError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # permissions, a folder vanishing mid-walk: say so, no traceback
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
