"""The fused GEGLU GEMM: Triton's interpreter on the CPU, the compiled kernel on a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tests.helpers import rel_err

import difforge.kernels.geglu_linear as mod
from difforge.kernels.geglu_linear import GegluConfig, geglu_linear, geglu_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: fp16 / bf16 kernel against the float32 oracle: the inputs' rounding dominates.
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
SMALL = GegluConfig(block_m=32, block_n=32, block_k=32, group_m=2, num_warps=4, num_stages=2)


def _inputs(m: int, k: int, n: int, dtype: torch.dtype, bias: bool = True, device: str = DEVICE):
    gen = torch.Generator().manual_seed(m * 1000 + k + n)
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    w = (torch.randn(2 * n, k, generator=gen) / k**0.5).to(device, dtype)
    b = torch.randn(2 * n, generator=gen).to(device, dtype) if bias else None
    return x, w, b


def _oracle(x, w, b, approximate):  # type: ignore[no-untyped-def]
    return geglu_reference(x.float(), w.float(), None if b is None else b.float(), approximate)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize(
    ("m", "k", "n"), [(64, 64, 32), (37, 48, 40), (5, 96, 72)], ids=["even", "ragged", "few-rows"]
)
def test_kernel_matches_the_float32_oracle(
    dtype: torch.dtype, approximate: str, m: int, k: int, n: int
) -> None:
    x, w, b = _inputs(m, k, n, dtype)
    out = geglu_linear(x, w, b, approximate, config=SMALL)
    assert out.shape == (m, n) and out.dtype == dtype
    assert rel_err(out.float(), _oracle(x, w, b, approximate)) < TOL[dtype]


def test_kernel_without_bias_and_with_leading_dims() -> None:
    x, w, _ = _inputs(2 * 19, 64, 48, torch.float16)
    x3 = x.view(2, 19, 64)
    out = geglu_linear(x3, w, None, config=SMALL)
    assert out.shape == (2, 19, 48)
    assert rel_err(out.float(), _oracle(x3, w, None, "none")) < TOL[torch.float16]


def test_default_config_runs() -> None:
    x, w, b = _inputs(130, 128, 136, torch.bfloat16)
    assert rel_err(geglu_linear(x, w, b).float(), _oracle(x, w, b, "none")) < TOL[torch.bfloat16]


def test_library_op_and_bad_inputs() -> None:
    x, w, b = _inputs(16, 32, 16, torch.float16)
    out = torch.ops.difforge.geglu_linear(x, w, b, "none")
    assert rel_err(out.float(), _oracle(x, w, b, "none")) < TOL[torch.float16]
    with pytest.raises(ValueError, match="approximate"):
        geglu_linear(x, w, b, "erf")
    with pytest.raises(ValueError, match=r"weight \[2N, K\]"):
        geglu_linear(x, w[:-1], None)
    with pytest.raises(ValueError, match="bias"):
        geglu_linear(x, w, b[:-2])
    with pytest.raises(ValueError, match="fp16 or bf16"):
        geglu_linear(x.float(), w.float(), b.float())
    with pytest.raises(ValueError, match="fp16 or bf16"):
        geglu_linear(x, w.bfloat16(), b)


_COMPILE_FOR_SM90 = textwrap.dedent(
    r"""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import difforge.kernels.geglu_linear as m

    kernel = m._geglu_kernel
    cfg = m.pick_config(2048, 5120, 1280)
    for dt in ("fp16", "bf16"):
        types = {n: "i32" for n in kernel.arg_names}
        types.update({"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "b_ptr": f"*{dt}", "out_ptr": f"*{dt}"})
        consts = {"HAS_BIAS": True, "APPROX_TANH": False, "EVEN_K": True, "BLOCK_M": cfg.block_m,
                  "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "GROUP_M": cfg.group_m,
                  "stride_xk": 1, "stride_wk": 1, "stride_on": 1, "INTERPRET": False}
        sig = {n: "constexpr" if n in consts else types[n] for n in kernel.arg_names}
        # The runtime specialises pointers and strides divisible by 16; so does this build.
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names)
                 if n not in consts and n not in ("M",)}
        src = ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
        asm = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                             options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}).asm
        assert "cubin" in asm, "ptxas did not run"
        ptx = asm["ptx"]
        ptx_dt = {"fp16": "f16", "bf16": "bf16"}[dt]
        assert f"wgmma.mma_async.sync.aligned.m64n{cfg.block_n}k16.f32.{ptx_dt}.{ptx_dt}" in ptx, "no wgmma"
        assert "cp.async" in ptx, "the K loop's loads are not asynchronous"
    print("sm90 ok")
    """
)


def test_kernel_compiles_for_sm90_without_a_gpu() -> None:
    """Lowering and ptxas for H100 (sm_90a): wgmma and asynchronous loads, on the CPU."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    src_dir = Path(mod.__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join([str(src_dir), env.get("PYTHONPATH", "")])
    res = subprocess.run(
        [sys.executable, "-c", _COMPILE_FOR_SM90],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0 and "sm90 ok" in res.stdout, res.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("m", "k", "n"),
    [(2048, 1280, 5120), (8192, 640, 2560), (1155, 320, 1280), (77, 1000, 904)],
    ids=["sdxl-1280", "sdxl-640", "sd15-ragged-rows", "odd-k"],
)
def test_gpu_kernel_matches_the_oracle_at_unet_shapes(
    dtype: torch.dtype, m: int, k: int, n: int
) -> None:
    x, w, b = _inputs(m, k, n, dtype, device="cuda")
    out = geglu_linear(x, w, b)
    ref = _oracle(x, w, b, "none")
    # Not farther from float32 than eager's own GEGLU (which rounds a and g first).
    eager = geglu_reference(x, w, b).float()
    assert rel_err(out.float(), ref) <= max(rel_err(eager, ref), TOL[dtype] / 4)
