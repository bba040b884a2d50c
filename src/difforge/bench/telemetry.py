"""GPU clock, power and temperature while a benchmark runs, sampled with ``nvidia-smi``.

Why: a gap-free step (CUDA graphs) keeps an H100 at its power limit, where its SM clock
drops, while a host-bound baseline idles between kernels and boosts. The same kernel then
takes longer in the faster variant (cuDNN's SDPA 4.50 ms vs 4.91 ms a SDXL step, stock
compile vs O2, `benchmarks/results/2026-11-28_h100_step_cached_sdxl_s18.json`), and a
kernel-time breakdown cannot tell that from a slower kernel without the clock next to it.

``nvidia-smi --query-gpu ... --loop-ms`` runs beside the measured block and prints one line per
interval; :class:`GpuTelemetry` reads them in a thread and summarises. No ``nvidia-smi``,
no CUDA device or a query the driver refuses: no summary, never an error (the numbers it
explains still stand without it).
"""

from __future__ import annotations

import math
import shutil
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

import torch

#: What is sampled, in this order (``nvidia-smi --help-query-gpu`` names).
QUERY_FIELDS = ("clocks.sm", "power.draw", "temperature.gpu")


@dataclass(frozen=True)
class TelemetrySummary:
    """What the samples say about one measured block."""

    samples: int
    sm_clock_mhz: float
    """Mean SM clock over the samples."""
    sm_clock_min_mhz: float
    power_w: float | None
    """Mean board power (None where the driver reports none)."""
    power_max_w: float | None
    temperature_max_c: float | None


def parse_sample(line: str) -> tuple[float, float | None, float | None] | None:
    """One ``nvidia-smi`` CSV line (``clock, power, temperature``, no units) -> values;
    None for a line that is not one (a header, an error message). ``[N/A]`` fields are
    None, except the clock, without which the sample is dropped."""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) != len(QUERY_FIELDS):
        return None
    values: list[float | None] = []
    for part in parts:
        try:
            value = float(part)
        except ValueError:
            value = None
        values.append(value if value is not None and math.isfinite(value) else None)
    clock, power, temperature = values
    if clock is None:
        return None
    return clock, power, temperature


def summarise(
    samples: Sequence[tuple[float, float | None, float | None]],
) -> TelemetrySummary | None:
    """Mean and extremes of parsed samples; None without any."""
    if not samples:
        return None
    clocks = [s[0] for s in samples]
    powers = [s[1] for s in samples if s[1] is not None]
    temperatures = [s[2] for s in samples if s[2] is not None]
    return TelemetrySummary(
        samples=len(samples),
        sm_clock_mhz=sum(clocks) / len(clocks),
        sm_clock_min_mhz=min(clocks),
        power_w=sum(powers) / len(powers) if powers else None,
        power_max_w=max(powers) if powers else None,
        temperature_max_c=max(temperatures) if temperatures else None,
    )


def nvidia_smi_command(device: torch.device, interval_ms: int) -> list[str] | None:
    """The sampling command for ``device``, or None where it cannot run (no CUDA device, no
    ``nvidia-smi``). The GPU is named by UUID, which ``CUDA_VISIBLE_DEVICES`` renumbering
    does not change."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        uuid = str(torch.cuda.get_device_properties(device).uuid)
    except (AttributeError, RuntimeError):  # a torch build without the property
        return None
    return [
        exe,
        f"--id=GPU-{uuid}",
        f"--query-gpu={','.join(QUERY_FIELDS)}",
        "--format=csv,noheader,nounits",
        f"--loop-ms={interval_ms}",
    ]


class GpuTelemetry:
    """Context manager: samples while its block runs; :meth:`summary` afterwards.

    ``command`` replaces the ``nvidia-smi`` call (tests); None with a CUDA ``device`` builds
    it. The first sample arrives after the tool's start-up (~0.1-0.3 s), so a block shorter
    than that may yield none.
    """

    def __init__(
        self,
        device: torch.device,
        interval_ms: int = 50,
        command: Sequence[str] | None = None,
    ) -> None:
        if interval_ms <= 0:
            raise ValueError(f"GpuTelemetry: interval_ms must be positive, got {interval_ms}")
        self._command = (
            list(command) if command is not None else nvidia_smi_command(device, interval_ms)
        )
        self._samples: list[tuple[float, float | None, float | None]] = []
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def __enter__(self) -> GpuTelemetry:
        if self._command is None:
            return self
        try:
            self._process = subprocess.Popen(
                self._command,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
        except OSError:
            self._process = None
            return self
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            sample = parse_sample(line)
            if sample is not None:
                self._samples.append(sample)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.terminate()
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)

    def summary(self) -> TelemetrySummary | None:
        """The samples taken so far, summarised; None without any."""
        return summarise(list(self._samples))
