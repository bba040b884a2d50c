"""Exceptions difforge raises: each says what was wrong and how to fix it."""

from __future__ import annotations


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
