"""Dynamic shapes across batch sizes, batch 1 included (``shapes.batch``, difforge.batch).

Dynamo makes batch 1 a constant, so without help a warm-up at batch 1 recompiles at batch 2
and a warm-up at batch 2 recompiles at batch 1. Models without CFG see both: FLUX's
denoiser (batch = images) and the VAE. By default (``"upward"``) a first call at batch 1
compiles the batch-1 and the batch>=2 graph, and one at batch >= 2 only its own (a CFG
denoiser never runs batch 1); ``"warmup"`` compiles both classes whatever the first batch;
``"unbacked"`` (opt-in, torch 2.13) gives the DiTs one graph for every batch.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from tests.diffusers.test_dynamic import (
    DIT_SIZES,
    SWEEP_OPTIONS,
    UNET_SIZES,
    denoiser,
    graphs,
    sweep,
)
from tests.helpers import rel_err, tiny_vae_two_levels

import difforge
from difforge.batch import batch_inputs, resolve_batch_mode, unbacked_support
from difforge.diffusers.presets import build_component, get_preset
from difforge.diffusers.step_inputs import VaeDecode, vae_decode_inputs
from difforge.errors import DifforgeError, OptionsError
from difforge.recompiles import recompile_events

needs_unbacked = pytest.mark.skipif(
    unbacked_support() is not None, reason=f"no unbacked batch: {unbacked_support()}"
)

# The VAE sweep leaves out 64x64 (an 8x8 latent): on the CPU, ATen picks its conv backend
# for a batch of 1 by size (oneDNN only above ~160 latent pixels at 128 channels), so the
# batch-1 graph guards on the size there whatever the batch handling (it recompiles at
# 64x64 with the batch fixed at 1 too). Batches >= 2 always take oneDNN.
VAE_SIZES = [size for size in UNET_SIZES if size != (64, 64)]


@pytest.fixture
def no_recompile_warnings() -> Any:
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="difforge: recompiling")
        yield


# --------------------------------------------------------------------------------------------
# A tiny model (fast): the mechanism itself
# --------------------------------------------------------------------------------------------


class TinyDiT(nn.Module):
    """A batch that meets a per-sample conditioning by broadcasting, as in every DiT."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 16)
        self.cond = nn.Linear(1, 16)
        self.norm = nn.LayerNorm(16)
        self.out = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        h = self.proj(x) + self.cond(t[:, None])[:, None, :]
        h = self.norm(h) * ids[None, :, :1]  # ids: (tokens, 3), no batch axis
        return self.out(torch.nn.functional.gelu(h))


class DiffusersTinyDiT(TinyDiT):
    """The same with a diffusers block inside: the default batch mode becomes "upward"."""

    def __init__(self) -> None:
        super().__init__()
        from diffusers.models.attention import FeedForward

        self.ff = FeedForward(16, mult=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        h = self.proj(x) + self.cond(t[:, None])[:, None, :]
        return self.out(self.ff(self.norm(h) * ids[None, :, :1]))


def tiny_call(batch: int, tokens: int = 6) -> tuple[torch.Tensor, ...]:
    return torch.randn(batch, tokens, 8), torch.rand(batch), torch.rand(tokens, 3)


def tiny_sweep(compiled: Any, reference: nn.Module, batches: tuple[int, ...]) -> float:
    worst = 0.0
    for batch in batches:
        for tokens in (6, 9):
            args = tiny_call(batch, tokens)
            with torch.no_grad():
                worst = max(worst, rel_err(compiled(*args), reference(*args)))
    return worst


@needs_unbacked
@pytest.mark.parametrize("first", [1, 2])
def test_unbacked_batch_one_graph_for_batch_1_2_4(first: int, no_recompile_warnings: Any) -> None:
    module = TinyDiT().eval()
    compiled = difforge.compile(module, options={"dynamic": True, "shapes.batch": "unbacked"})
    events = len(recompile_events)
    assert tiny_sweep(compiled, module, (first,)) < 1e-5
    assert graphs() == 1
    assert tiny_sweep(compiled, module, (1, 2, 4, 3)) < 1e-5
    assert graphs() == 1, torch._dynamo.utils.counters["stats"]
    assert len(recompile_events) == events


def test_default_for_a_diffusers_model_compiles_upward_from_batch_1(
    no_recompile_warnings: Any,
) -> None:
    module = DiffusersTinyDiT().eval()
    compiled = difforge.compile(module, options={"dynamic": True})
    events = len(recompile_events)
    assert tiny_sweep(compiled, module, (1,)) < 1e-5
    assert graphs() == 2  # batch 1, and batch >= 2 ahead of use
    assert tiny_sweep(compiled, module, (1, 2, 4, 3)) < 1e-5
    assert graphs() == 2
    assert len(recompile_events) == events


def test_default_for_a_diffusers_model_first_called_at_batch_2_compiles_one_graph() -> None:
    """A CFG denoiser's case: no batch-1 graph ahead of use; a later batch 1 compiles then,
    reported as a recompile (never silently)."""
    module = DiffusersTinyDiT().eval()
    compiled = difforge.compile(module, options={"dynamic": True})
    events = len(recompile_events)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="difforge: recompiling")
        assert tiny_sweep(compiled, module, (2, 4, 3)) < 1e-5
    assert graphs() == 1
    assert len(recompile_events) == events
    with pytest.warns(UserWarning, match=r"difforge: recompiling .*2 <= x.size\(\)\[0\]"):
        assert tiny_sweep(compiled, module, (1,)) < 1e-5
    assert graphs() == 2
    assert len(recompile_events) == events + 1


def test_default_for_other_modules_is_dynamos_own() -> None:
    module = TinyDiT().eval()  # no diffusers/transformers class: dim 0 need not be a batch
    compiled = difforge.compile(module, options={"dynamic": True})
    tiny_sweep(compiled, module, (2,))
    assert graphs() == 1


@pytest.mark.parametrize("first", [1, 2])
def test_dynamo_batch_mode_recompiles_between_batch_1_and_2(first: int) -> None:
    """The negative case: Dynamo's own handling specialises batch 1."""
    module = TinyDiT().eval()
    compiled = difforge.compile(module, options={"dynamic": True, "shapes.batch": "dynamo"})
    tiny_sweep(compiled, module, (first,))
    with pytest.warns(UserWarning, match="difforge: recompiling"):
        assert tiny_sweep(compiled, module, (3 - first,)) < 1e-5
    assert graphs() == 2


@needs_unbacked
def test_unbacked_marks_do_not_outlive_the_call() -> None:
    module = TinyDiT().eval()
    compiled = difforge.compile(module, options={"dynamic": True, "shapes.batch": "unbacked"})
    args = tiny_call(2)
    with torch.no_grad():
        compiled(*args)
    for tensor in args:
        assert not [k for k in vars(tensor) if "dynamo" in k or k == "_specialize_on"]


@needs_unbacked
def test_unbacked_batch_input_that_stops_being_batch_sized_is_a_clear_error() -> None:
    module = TinyDiT().eval()
    compiled = difforge.compile(module, options={"dynamic": True, "shapes.batch": "unbacked"})
    x, t, ids = tiny_call(2)
    with torch.no_grad():
        compiled(x, t, ids)
        with pytest.raises(DifforgeError, match=r"argument #1 had the batch size .* \(1,\) now"):
            compiled(torch.randn(4, 6, 8), t[:1], ids)  # t broadcast: not batch-sized


@pytest.mark.parametrize("first", [1, 2])
def test_warmup_compiles_the_other_batch_class_at_the_first_call(
    first: int, no_recompile_warnings: Any
) -> None:
    module = TinyDiT().eval()
    compiled = difforge.compile(module, options={"dynamic": True, "shapes.batch": "warmup"})
    events = len(recompile_events)
    assert tiny_sweep(compiled, module, (first,)) < 1e-5
    assert graphs() == 2  # batch 1 and batch >= 2, both now
    assert tiny_sweep(compiled, module, (2, 4, 1, 3)) < 1e-5
    assert graphs() == 2
    assert len(recompile_events) == events


def test_warmup_failure_is_a_warning_not_an_error() -> None:
    class Picky(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] != 2:
                raise ValueError("batch 2 only")
            return x * 2

    compiled = difforge.compile(Picky(), options={"dynamic": True, "shapes.batch": "warmup"})
    with pytest.warns(UserWarning, match="could not compile batch 1 ahead of use"):
        out = compiled(torch.ones(2, 3))
    assert torch.equal(out, torch.full((2, 3), 2.0))


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------


def test_batch_mode_resolution() -> None:
    dit, _ = denoiser("tiny-pixart")
    vae = build_component("tiny-sdxl", "vae")
    dynamic = difforge.parse_options({"dynamic": True})
    assert resolve_batch_mode(dynamic, dit) == "upward"
    assert resolve_batch_mode(dynamic, vae) == "upward"
    assert resolve_batch_mode(dynamic, VaeDecode(vae)) == "upward"
    assert resolve_batch_mode(dynamic, TinyDiT()) == "dynamo"
    assert resolve_batch_mode(dynamic, lambda x: x) == "dynamo"
    assert resolve_batch_mode(difforge.parse_options({}), dit) is None
    unbacked = difforge.parse_options({"dynamic": True, "shapes.batch": "unbacked"})
    with pytest.raises(OptionsError, match="'unbacked' is not available"):
        resolve_batch_mode(unbacked, vae)  # GroupNorm (or this torch)
    if unbacked_support() is None:
        assert resolve_batch_mode(unbacked, dit) == "unbacked"
    with pytest.raises(OptionsError, match="must be one of upward, warmup, unbacked, dynamo"):
        difforge.compile(dit, options={"dynamic": True, "shapes.batch": "static"})
    with pytest.raises(OptionsError, match="needs 'dynamic': true"):
        difforge.compile(dit, options={"shapes.batch": "warmup"})
    with pytest.raises(OptionsError, match="expects str or null"):
        difforge.parse_options({"shapes.batch": 1})


def test_batch_inputs_follow_the_first_tensor() -> None:
    x, t, ids = tiny_call(3, tokens=5)
    found = batch_inputs((x,), {"t": t, "ids": ids, "cond": {"a": t, "b": [ids, x]}}, 3)
    assert set(found) == {(0, 0), (1, "t"), (1, "cond", "a"), (1, "cond", "b", 1)}


@needs_unbacked
def test_compile_pipe_gives_conv_nets_warmup_when_asked_for_unbacked() -> None:
    from difforge.diffusers import compile_pipe
    from difforge.diffusers.pipe import pipe_state
    from difforge.diffusers.presets import build_pipeline

    pipe = build_pipeline("tiny-flux", text_encoders=False)
    with pytest.warns(UserWarning, match="conv net .* compiles with 'warmup'"):
        compile_pipe(pipe, options={"dynamic": True, "shapes.batch": "unbacked"})
    configs = pipe_state(pipe).configs
    assert configs["vae.decoder"].settings["shapes.batch"] == "warmup"
    assert configs["transformer"].settings["shapes.batch"] == "unbacked"


# --------------------------------------------------------------------------------------------
# The tiny diffusers models (slow: a full compile each)
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("first", [1, 2])
def test_flux_batches_1_2_4_at_every_size_after_one_warm_up(
    first: int, no_recompile_warnings: Any
) -> None:
    """FLUX has no CFG: its denoiser batch is the number of images, 1 included. A first
    call at batch 1 (the default, ``"upward"``) or at any batch (``"warmup"``) compiles the
    batch-1 and the batch>=2 graph at the first call, nothing after."""
    flux = one_single_block_flux()
    module, reference = denoiser(flux)
    options: dict[str, Any] = {"mode": "O2", **SWEEP_OPTIONS}
    if first != 1:
        options["shapes.batch"] = "warmup"
    compiled = difforge.compile(module, options=options)
    events = len(recompile_events)
    errors = sweep(flux, compiled, reference, DIT_SIZES[:1], (first,))
    assert graphs() == 2
    errors += sweep(flux, compiled, reference, DIT_SIZES, (1, 2, 4))
    assert graphs() == 2, torch._dynamo.utils.counters["stats"]
    assert len(recompile_events) == events
    assert max(errors) < 1e-5, errors


@needs_unbacked
@pytest.mark.slow
def test_flux_unbacked_batches_1_2_4_at_every_size_on_one_graph(
    no_recompile_warnings: Any,
) -> None:
    flux = one_single_block_flux()
    module, reference = denoiser(flux)
    options = {"mode": "O2", "shapes.batch": "unbacked", **SWEEP_OPTIONS}
    compiled = difforge.compile(module, options=options)
    events = len(recompile_events)
    errors = sweep(flux, compiled, reference, DIT_SIZES[:1], (1,))
    assert graphs() == 1
    errors += sweep(flux, compiled, reference, DIT_SIZES, (1, 2, 4))
    assert graphs() == 1, torch._dynamo.utils.counters["stats"]
    assert len(recompile_events) == events
    assert max(errors) < 1e-5, errors
    # The cleanup pass runs on the unbacked graph too (it no longer asks is_contiguous()
    # a question an unbacked batch cannot answer).
    assert any("remove_noop_conversions" in r.rewrites for r in difforge.compile_records)


@pytest.mark.slow
def test_flux_recompiles_at_batch_2_without_the_unbacked_batch() -> None:
    flux = one_single_block_flux()
    module, reference = denoiser(flux)
    # rms_norm_rope off as in the sweeps (its kernel runs in Triton's interpreter here).
    options = {"mode": "O2", "dynamic": True, "shapes.batch": "dynamo"}
    compiled = difforge.compile(module, options={**options, "passes.rms_norm_rope": False})
    sweep(flux, compiled, reference, DIT_SIZES[:1], (1,))
    with pytest.warns(UserWarning, match="recompiling .*hidden_states.* size mismatch at index 0"):
        sweep(flux, compiled, reference, DIT_SIZES[:1], (2,))
    assert graphs() == 2


def one_single_block_flux() -> Any:
    """tiny-flux with one single-stream block (and its one double-stream block): the batch
    is the point of these tests, not the depth."""
    preset = get_preset("tiny-flux")
    config = {**preset.denoiser_config, "num_single_layers": 1}
    return dataclasses.replace(preset, denoiser_config=config)


def vae_sweep(
    preset: str, compiled: Any, reference: nn.Module, sizes: list[tuple[int, int]], batches: Any
) -> list[float]:
    return sweep(preset, compiled, reference, sizes, batches, inputs=vae_decode_inputs)


@pytest.mark.slow
@pytest.mark.parametrize(("preset", "first"), [("tiny-sdxl", 1), ("tiny-flux", 2)])
def test_vae_decode_batches_1_2_4_after_one_warm_up(
    preset: str, first: int, no_recompile_warnings: Any
) -> None:
    """The VAE (a conv net: no unbacked batch), first called at batch 1 (the default,
    ``"upward"``) or at batch 2 (``"warmup"``): the first call compiles the batch-1 and the
    batch>=2 graph, and nothing after it. (Two of the tiny VAE's four levels: the batch
    handling is the point, and the decoder compiles in about half the time.)"""
    torch.manual_seed(0)
    vae = tiny_vae_two_levels(preset)
    module = VaeDecode(build_component(vae, "vae")).eval()
    reference = VaeDecode(build_component(vae, "vae")).eval()
    reference.load_state_dict(module.state_dict())
    options: dict[str, Any] = {"mode": "O2", "dynamic": True}
    if first != 1:
        options["shapes.batch"] = "warmup"
    compiled = difforge.compile(module, options=options)
    events = len(recompile_events)
    errors = vae_sweep(preset, compiled, reference, VAE_SIZES[:1], (first,))
    assert graphs() == 2
    errors += vae_sweep(preset, compiled, reference, VAE_SIZES, (1, 2, 4))
    assert graphs() == 2, torch._dynamo.utils.counters["stats"]
    assert len(recompile_events) == events
    assert max(errors) < 1e-5, errors
