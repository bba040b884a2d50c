"""Recompilations are never silent: each is reported once with Dynamo's guard-failure reason
(under offloading or other hooks around a module's parts, where Dynamo recompiles by design,
all of them in one warning that names the hook).

Dynamo recompiles a function when a guard fails (a new resolution with static shapes, a
new dtype …) and, past ``torch._dynamo.config.recompile_limit``, runs new inputs eagerly
with only a log line. difforge reports every recompilation as a warning naming the
reason, warns before the eager fallback, and with ``recompile.strict`` raises instead.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from difforge.errors import DifforgeError, warn

log = logging.getLogger("difforge")


@dataclass(frozen=True)
class RecompileEvent:
    """One recompilation of a function by a difforge backend."""

    function: str
    compile_index: int
    """How many times this function had been compiled before (1 = first recompile)."""
    reason: str


#: Every recompilation seen in this process, oldest first.
recompile_events: list[RecompileEvent] = []


def _current_compile_id() -> tuple[int | None, int | None]:
    try:
        compile_id = torch._guards.CompileContext.current_compile_id()
    except Exception:  # pragma: no cover - private API moved
        return None, None
    if compile_id is None:
        return None, None
    return compile_id.frame_id, compile_id.frame_compile_id


def _metrics() -> dict:
    try:  # torch >= 2.6 records these in the compilation metrics of the frame
        return dict(torch._dynamo.utils.get_metrics_context()._metrics)
    except Exception:  # pragma: no cover - private API moved
        return {}


def _reason() -> str:
    """Dynamo's first guard-failure reason for the compilation in progress."""
    reason = _metrics().get("recompile_reason")
    if reason:
        return str(reason).strip()
    return "unknown (set TORCH_LOGS=recompiles for Dynamo's own log)"


def dynamo_recompile_limit() -> int:
    config = torch._dynamo.config
    return int(getattr(config, "recompile_limit", getattr(config, "cache_size_limit", 8)))


class RecompileTracker:
    """Counts compilations per function for one backend and reports the recompiles."""

    def __init__(
        self,
        limit: int | None,
        strict: bool,
        name: str = "a compiled function",
        hooked: Callable[[], str | None] | None = None,
    ) -> None:
        self.name = name
        self.limit = limit
        self.strict = strict
        self.hooked = hooked
        """Why the module has hooks around its parts (:func:`difforge.module_hooks
        .hooks_reason`): then recompiles are expected and reported once, together."""
        self._hooks_reported = False
        self._seen: dict[int, set[int]] = {}
        self._reported: set[tuple[int, str]] = set()
        self._expected = 0
        self._planned: dict[int, int] = {}

    @contextlib.contextmanager
    def expected(self) -> Iterator[None]:
        """Compilations inside this context are planned (a warm-up at another batch,
        :mod:`difforge.batch`): counted as attempts, not reported as recompiles."""
        self._expected += 1
        try:
            yield
        finally:
            self._expected -= 1

    def on_compile(self) -> RecompileEvent | None:
        """Call at the start of each graph compilation; returns the event if a recompile."""
        frame_id, attempt = _current_compile_id()
        if frame_id is None or attempt is None:
            return None
        attempts = self._seen.setdefault(frame_id, set())
        new_attempt = attempt not in attempts
        attempts.add(attempt)
        # A graph break gives several graphs per attempt: only a new attempt is a recompile.
        if not new_attempt or len(attempts) == 1:
            return None
        if self._expected:
            self._planned[frame_id] = self._planned.get(frame_id, 0) + 1
            return None
        function = self.name
        index = len(attempts) - 1 - self._planned.get(frame_id, 0)
        event = RecompileEvent(function, index, _reason())
        recompile_events.append(event)
        limit = self.limit if self.limit is not None else dynamo_recompile_limit()
        hooked = self.hooked() if self.hooked is not None else None
        if self.strict and event.compile_index > limit:
            advice = (
                f"{hooked}: Dynamo recompiles the frames it resumes in after each hook; "
                "compile it without the hooks, or turn recompile.strict off"
                if hooked is not None
                else "Use 'dynamic': true for resolution/batch changes, or raise recompile.limit"
            )
            raise DifforgeError(
                f"{function} was recompiled {event.compile_index} times, more than "
                f"recompile.limit={limit} allows (recompile.strict is on); last reason: "
                f"{event.reason}. {advice}"
            )
        log.info("difforge recompile #%d of %s: %s", event.compile_index, function, event.reason)
        if hooked is not None:
            # Offloading hooks run Python around every part: Dynamo breaks the graph there
            # and the frames it resumes in serve parts of other shapes, so it compiles them
            # again and again (a tiny FLUX under accelerate's offload: 11 recompiles).
            if not self._hooks_reported:
                self._hooks_reported = True
                warn(
                    f"difforge: {function}: {hooked}; Dynamo breaks the graph at each hook and "
                    "recompiles the frames it resumes in for parts of other shapes (expected "
                    "here; these and any other recompiles while hooks are there are not "
                    "reported one by one: difforge.recompiles.recompile_events lists them; past "
                    "torch._dynamo.config.recompile_limit a frame runs eagerly)",
                )
            return event
        if (frame_id, event.reason) not in self._reported:
            self._reported.add((frame_id, event.reason))
            warn(
                f"difforge: recompiling {function} (recompile #{event.compile_index}): "
                f"{event.reason}",
            )
        if len(attempts) - 1 >= dynamo_recompile_limit():  # Dynamo counts planned ones too
            warn(
                f"difforge: {function} reached torch._dynamo.config.recompile_limit="
                f"{dynamo_recompile_limit()}; inputs needing yet another compilation will run "
                "EAGERLY (slow). Use 'dynamic': true or raise the limit.",
            )
        return event
