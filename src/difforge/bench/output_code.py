"""Inductor's generated code of the graphs compiled inside a block, kept in memory.

For diagnosis (``benchmarks/diag_dynamic_kernels.py``) and for tests that compare what a
static and a dynamic compile generate.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch


class CodeLog(logging.Handler):
    """Keeps Inductor's ``output_code`` log records: one per compiled graph."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Output code: "):  # not the "written to" lines
            self.records.append(message.removeprefix("Output code: ").lstrip("\n"))


@contextlib.contextmanager
def logged_code() -> Iterator[CodeLog]:
    """The output code of every graph compiled inside, caches off (a cache hit would not
    log it); the loggers and the setting are put back afterwards."""
    from torch._inductor.codecache import output_code_log as logger

    code_log = CodeLog()
    torch._logging.set_logs(output_code=True)
    logger.addHandler(code_log)
    propagate, logger.propagate = logger.propagate, False  # kept here, not sent to stderr
    try:
        with torch._inductor.config.patch(force_disable_caches=True):
            yield code_log
    finally:
        logger.removeHandler(code_log)
        logger.propagate = propagate
        torch._logging.set_logs()


__all__ = ["CodeLog", "logged_code"]
