"""difforge.bench.telemetry: nvidia-smi's samples parsed and summarised; a missing tool or
device gives no summary, never an error. A small Python script stands in for nvidia-smi."""

from __future__ import annotations

import sys
import time

import pytest
import torch

from difforge.bench.telemetry import (
    GpuTelemetry,
    nvidia_smi_command,
    parse_sample,
    summarise,
)

# Prints nvidia-smi's CSV lines (one bad, one header-like, one without power) and then
# keeps running until terminated, as `--loop-ms` does.
_FAKE_SMI = """
import sys, time
for line in ("1980, 123.45, 38", "garbage", "clocks.sm, power.draw, temperature.gpu",
             "1635, 650.00, 52", "1425, [N/A], 55", "[N/A], 700.0, 56"):
    print(line, flush=True)
time.sleep(60)
"""


def test_parse_sample_reads_values_and_refuses_what_is_not_a_sample() -> None:
    assert parse_sample("1980, 123.45, 38\n") == (1980.0, 123.45, 38.0)
    assert parse_sample("1425, [N/A], 55") == (1425.0, None, 55.0)
    assert parse_sample("[N/A], 700.0, 56") is None  # no clock, no sample
    assert parse_sample("No devices were found") is None
    assert parse_sample("1980, 100") is None
    assert parse_sample("nan, 100, 40") is None


def test_summarise_means_and_extremes() -> None:
    summary = summarise([(1980.0, 100.0, 40.0), (1620.0, 700.0, 55.0), (1800.0, None, None)])
    assert summary is not None
    assert summary.samples == 3
    assert summary.sm_clock_mhz == pytest.approx(1800.0)
    assert summary.sm_clock_min_mhz == 1620.0
    assert summary.power_w == pytest.approx(400.0)
    assert summary.power_max_w == 700.0
    assert summary.temperature_max_c == 55.0
    assert summarise([]) is None


def test_telemetry_samples_while_the_block_runs_and_stops_the_sampler() -> None:
    telemetry = GpuTelemetry(torch.device("cpu"), command=[sys.executable, "-c", _FAKE_SMI])
    with telemetry:
        deadline = time.monotonic() + 20
        while (telemetry.summary() is None or telemetry.summary().samples < 3) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.05)
    process = telemetry._process
    assert process is not None and process.poll() is not None, "the sampler outlived the block"
    summary = telemetry.summary()
    assert summary is not None and summary.samples == 3
    assert summary.sm_clock_mhz == pytest.approx((1980 + 1635 + 1425) / 3)
    assert summary.sm_clock_min_mhz == 1425.0
    assert summary.power_w == pytest.approx((123.45 + 650.0) / 2)
    assert summary.temperature_max_c == 55.0


def test_no_tool_or_no_gpu_gives_no_summary() -> None:
    assert nvidia_smi_command(torch.device("cpu"), 50) is None
    with GpuTelemetry(torch.device("cpu")) as telemetry:
        pass
    assert telemetry.summary() is None
    with GpuTelemetry(torch.device("cpu"), command=["/nonexistent/nvidia-smi"]) as missing:
        pass
    assert missing.summary() is None
    with pytest.raises(ValueError, match="interval_ms must be positive"):
        GpuTelemetry(torch.device("cpu"), interval_ms=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_telemetry_reads_this_gpus_clock() -> None:
    """On a GPU machine the real nvidia-smi names this device and reports a clock."""
    device = torch.device("cuda")
    command = nvidia_smi_command(device, 50)
    if command is None:
        pytest.skip("no nvidia-smi on this machine")
    x = torch.randn(4096, 4096, device=device, dtype=torch.float16)
    with GpuTelemetry(device) as telemetry:
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            x = x @ x
            x = x / x.norm()
        torch.cuda.synchronize()
    summary = telemetry.summary()
    assert summary is not None and summary.samples >= 3
    assert 100 < summary.sm_clock_mhz < 4000


def test_bench_step_records_the_telemetry_of_each_variant(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """bench_model samples around each variant's steps and puts the summary in its result
    and the printed table; off CUDA (the real sampler) there is none."""
    from difforge.bench import step
    from difforge.bench.telemetry import TelemetrySummary

    argv = ["--models", "tiny-pixart", "--variants", "eager", "--height", "32", "--width", "32"]
    argv += ["--warmup", "0", "--iters", "1", "--dtype", "float32"]
    (plain,) = step.bench_model("tiny-pixart", step.parse_args(argv), torch.device("cpu"), {})
    assert plain.error is None and plain.gpu_telemetry is None

    entered: list[bool] = []

    class Stub:
        def __init__(self, device: torch.device) -> None:
            pass

        def __enter__(self) -> Stub:
            entered.append(True)
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def summary(self) -> TelemetrySummary:
            return TelemetrySummary(7, 1700.0, 1500.0, 600.0, 690.0, 50.0)

    monkeypatch.setattr(step, "GpuTelemetry", Stub)
    (sampled,) = step.bench_model("tiny-pixart", step.parse_args(argv), torch.device("cpu"), {})
    assert entered == [True]
    assert sampled.gpu_telemetry is not None
    assert sampled.gpu_telemetry["sm_clock_mhz"] == 1700.0
    assert sampled.gpu_telemetry["samples"] == 7
    assert "1700" in step.table([sampled]).splitlines()[-1]
