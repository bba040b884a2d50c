"""Exceptions difforge raises: each says what was wrong and how to fix it."""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
import sysconfig
import warnings


class DifforgeError(Exception):
    """Base class of every error difforge raises on purpose."""


class OptionsError(DifforgeError, ValueError):
    """Bad compile options: unknown key or mode, wrong type, malformed JSON, conflicts."""


class PassError(DifforgeError, RuntimeError):
    """A difforge graph pass failed; the message names the pass and how to switch it off."""

    def __init__(self, pass_name: str, stage: str, cause: BaseException) -> None:
        self.pass_name = pass_name
        self.stage = stage
        super().__init__(
            f"difforge pass {pass_name!r} ({stage} stage) failed: "
            f"{type(cause).__name__}: {cause}. Turn it off with the option "
            f'{{"passes.{pass_name}": false}} and please report the model that triggered it.'
        )


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the first frame outside difforge and the libraries it
    runs inside (torch, Triton, diffusers, transformers, the standard library): the user's
    line that compiled or called the model, however deep in those the warning arose. A fixed
    ``stacklevel`` pointed into torch whenever the call path changed depth."""
    frame = sys._getframe(1)
    level = 2  # warnings.warn's level for warn()'s caller
    while frame.f_back is not None and _is_library(frame.f_code.co_filename):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)


def _is_library(filename: str) -> bool:
    return filename.startswith(_library_dirs()) or filename.startswith("<frozen ")


@functools.cache
def _library_dirs() -> tuple[str, ...]:
    dirs = [os.path.dirname(os.path.abspath(__file__)), sysconfig.get_paths()["stdlib"]]
    for name in ("torch", "triton", "diffusers", "transformers"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            dirs.append(os.path.dirname(spec.origin))
    return tuple(os.path.join(d, "") for d in dirs)
