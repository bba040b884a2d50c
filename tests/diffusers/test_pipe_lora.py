"""diffusers' pipeline-level LoRA methods on a pipeline compile_pipe compiled (tiny FLUX,
random weights, a PEFT LoRA with a non-zero update), against the same calls on an eager
pipeline: without difforge.diffusers.lora, set_adapters raises and unload_lora_weights
silently keeps the LoRA (diffusers skips components that are not a ModelMixin)."""

from __future__ import annotations

import copy
import os
from typing import Any

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

from tests.helpers import tiny_images, tiny_pipeline

from difforge.diffusers import compile_pipe, pipe_methods
from difforge.diffusers import lora as lora_module
from difforge.diffusers.presets import build_component, get_preset

OptimizedModule = torch._dynamo.eval_frame.OptimizedModule
PRESET = get_preset("tiny-flux")


def _pipe() -> Any:
    return tiny_pipeline("tiny-flux")


def _run(pipe: Any) -> np.ndarray:
    return tiny_images(pipe, "tiny-flux")


def _lora() -> dict[str, torch.Tensor]:
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    source = build_component(PRESET, PRESET.denoiser, dtype=torch.float32)
    source.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"]))
    torch.manual_seed(1)
    for name, p in source.named_parameters():
        if "lora_" in name:
            p.data.normal_(0, 0.1)
    return {f"transformer.{k}": v for k, v in get_peft_model_state_dict(source).items()}


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    return float(np.abs(a - b).max()) < 1e-4


def test_pipeline_lora_methods_reach_the_compiled_denoiser(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lora = _lora()
    eager = _pipe()
    base = _run(eager)
    eager.load_lora_weights(copy.deepcopy(lora), adapter_name="style")
    full = _run(eager)
    eager.set_adapters(["style"], [0.5])
    half = _run(eager)
    assert not _close(full, base) and not _close(half, full)  # each call changes the image

    pipe = _pipe()
    compile_pipe(pipe, options="O2", ignores="vae")
    compiled = pipe.transformer
    assert isinstance(compiled, OptimizedModule)
    reset: list[Any] = []
    monkeypatch.setattr(pipe_methods, "reset_graphs", reset.append)
    assert _close(_run(pipe), base)

    with pytest.warns(UserWarning, match="runs unfused"):  # O2 had fused q/k/v
        pipe.load_lora_weights(copy.deepcopy(lora), adapter_name="style")
    assert _close(_run(pipe), full)
    assert pipe.get_list_adapters() == {"transformer": ["style"]}
    pipe.set_adapters(["style"], [0.5])
    assert _close(_run(pipe), half)
    pipe.disable_lora()
    assert _close(_run(pipe), base)
    pipe.enable_lora()
    assert _close(_run(pipe), half)
    pipe.unload_lora_weights()
    assert _close(_run(pipe), base)
    assert pipe.get_list_adapters() == {}

    assert pipe.transformer is compiled  # the compiled module is back in its slot
    assert any(r is compiled for r in reset)  # its graphs dropped after a change
    reset.clear()
    assert pipe.get_active_adapters() == []
    assert not reset  # a question changes nothing: the graphs stay


def _eager_images(lora: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """The eager pipeline's image without and with ``lora``."""
    eager = _pipe()
    base = _run(eager)
    eager.load_lora_weights(copy.deepcopy(lora), adapter_name="style")
    return base, _run(eager)


def test_a_lora_reaches_blocks_compiled_in_place() -> None:
    """compile.regional 'blocks' leaves the denoiser in its slot but its blocks compiled:
    PEFT must see the blocks' own names, not ``..._orig_mod...``."""
    lora = _lora()
    base, full = _eager_images(lora)

    pipe = _pipe()
    compile_pipe(pipe, options={"mode": "O2", "compile.regional": "blocks"}, ignores="vae")
    assert not isinstance(pipe.transformer, OptimizedModule)
    assert _close(_run(pipe), base)
    with pytest.warns(UserWarning, match="runs unfused"):
        pipe.load_lora_weights(copy.deepcopy(lora), adapter_name="style")
    assert _close(_run(pipe), full)
    pipe.unload_lora_weights()
    assert _close(_run(pipe), base)


def test_the_methods_are_wrapped_once_on_the_instance_only() -> None:
    pipe = _pipe()
    compile_pipe(pipe, options={"mode": "O1"}, ignores="vae")
    first = pipe.set_adapters
    compile_pipe(pipe, options={"mode": "O2"}, ignores="vae")
    assert pipe.set_adapters is first
    assert first.__wrapped__.__func__ is type(pipe).set_adapters  # one layer, the class's
    assert "set_adapters" not in vars(type(pipe))  # the class is untouched
    assert not hasattr(_pipe().set_adapters, "__wrapped__")


def test_copies_and_pickles_of_the_pipeline_carry_wrappers_for_themselves() -> None:
    import pickle

    pipe = _pipe()
    compile_pipe(pipe, backend="inductor", ignores="vae")  # difforge's configs do not copy
    for clone in (copy.deepcopy(pipe), pickle.loads(pickle.dumps(pipe))):
        assert clone.set_adapters.pipe is clone
        assert clone.set_adapters.__wrapped__.__func__ is type(pipe).set_adapters
        assert clone.get_list_adapters() == {}


def test_a_method_that_fails_still_puts_the_compiled_module_back() -> None:
    pipe = _pipe()
    compile_pipe(pipe, options={"mode": "O1"}, ignores="vae")
    compiled = pipe.transformer
    with pytest.raises(ValueError, match="not in the list of present adapters"):
        pipe.set_adapters(["missing"])
    assert pipe.transformer is compiled


def _o3_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """O3's fp8 swap made to happen here (fp8 availability mocked, tiny widths allowed)."""
    import difforge.quant.auto as auto

    monkeypatch.setattr(auto, "scaled_mm_available", lambda device: True)
    return {"mode": "O3", "quant.min_features": 0, "quant.min_weight_elements": 0}


def test_a_lora_loaded_before_o3_runs_on_fp8_base_linears(monkeypatch: pytest.MonkeyPatch) -> None:
    lora = _lora()
    base, full = _eager_images(lora)

    pipe = _pipe()
    pipe.load_lora_weights(copy.deepcopy(lora), adapter_name="style")
    compile_pipe(pipe, options=_o3_on_the_cpu(monkeypatch), ignores="vae")
    denoiser = pipe.transformer._orig_mod
    bases = [m.base_layer for m in denoiser.modules() if hasattr(m, "lora_A")]
    assert any(type(b).__name__ == "Fp8Linear" for b in bases)  # (edges stay high precision)
    out = _run(pipe)
    # fp8 rounding moves the image, but it stays nearer the LoRA's than the base model's
    assert np.abs(out - full).max() < 0.5 * np.abs(full - base).max()
    pipe.disable_lora()
    assert np.abs(_run(pipe) - base).max() < 0.5 * np.abs(full - base).max()
    pipe.enable_lora()
    with pytest.raises(lora_module.LoraOnFp8Error, match="fuse_lora.*before compile_pipe"):
        pipe.fuse_lora()
    pipe.unload_lora_weights()  # PEFT puts the fp8 base linears back in their slots
    assert not any(hasattr(m, "lora_A") for m in denoiser.modules())


def test_a_lora_loaded_after_o3_fails_clearly_and_changes_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pipe = _pipe()
    compile_pipe(pipe, options=_o3_on_the_cpu(monkeypatch), ignores="vae")
    before = _run(pipe)
    with pytest.raises(lora_module.LoraOnFp8Error, match="transformer of this pipeline has fp8"):
        pipe.load_lora_weights(_lora(), adapter_name="style")
    assert pipe.get_list_adapters() == {}
    np.testing.assert_array_equal(_run(pipe), before)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_a_new_lora_scale_reaches_the_replayed_graphs() -> None:
    """O2 on a GPU replays CUDA graphs without asking Dynamo, and a LoRA scale is a plain
    attribute: the pipeline's set_adapters must drop the graphs, or the old scale replays."""
    lora = {k: v * 3 for k, v in _lora().items()}  # an effect well above fp16 noise

    def pipe() -> Any:
        return tiny_pipeline("tiny-flux", dtype=torch.float16, device="cuda")

    eager = pipe()
    eager.load_lora_weights(copy.deepcopy(lora), adapter_name="style")
    full = _run(eager)
    eager.set_adapters(["style"], [0.3])
    scaled = _run(eager)
    step = float(np.abs(full - scaled).max())

    compiled = pipe()
    compiled.load_lora_weights(copy.deepcopy(lora), adapter_name="style")  # before: fused rest
    compile_pipe(compiled, options="O2", ignores="vae")
    for _ in range(3):  # captured, then replayed
        assert float(np.abs(_run(compiled) - full).max()) < 0.25 * step
    compiled.set_adapters(["style"], [0.3])
    for _ in range(3):
        assert float(np.abs(_run(compiled) - scaled).max()) < 0.25 * step


def test_under_o3_calls_that_leave_the_fp8_denoiser_alone_are_not_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pipe = _pipe()
    compile_pipe(pipe, options=_o3_on_the_cpu(monkeypatch), ignores="vae")
    before = _run(pipe)
    q_proj = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    text_only = {
        f"{q_proj}.lora_A.weight": torch.zeros(4, 32),
        f"{q_proj}.lora_B.weight": torch.zeros(32, 4),
    }
    # This tiny pipeline has no text encoders (and PEFT 0.21 cannot wrap transformers 5's):
    # what diffusers would load into one is recorded instead.
    loaded: list[str] = []
    monkeypatch.setattr(
        type(pipe),
        "load_lora_into_text_encoder",
        lambda _pipe, state_dict, *a, **k: loaded.extend(state_dict),
    )
    pipe.load_lora_weights(copy.deepcopy(text_only), adapter_name="text")
    assert sorted(loaded) == sorted(text_only)
    pipe.fuse_lora(components=["text_encoder"])
    pipe.unfuse_lora(components=["text_encoder"])
    np.testing.assert_array_equal(_run(pipe), before)
    with pytest.raises(lora_module.LoraOnFp8Error, match="load_lora_weights"):
        pipe.load_lora_weights({**text_only, **_lora()}, adapter_name="both")
    with pytest.raises(lora_module.LoraOnFp8Error, match="fuse_lora"):
        pipe.fuse_lora(components=["transformer"])
    with pytest.raises(lora_module.LoraOnFp8Error, match="unfuse_lora"):
        pipe.unfuse_lora()  # FLUX's default components include the transformer
    assert pipe.get_list_adapters() == {}
