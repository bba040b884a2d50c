"""The Gluon Hopper attention: head-dim split, input checks, its sm_90 lowering (compiled on
any machine: Triton ships ptxas) and, on a GPU, its output against SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from difforge.kernels import attention_hopper as ah

needs_gluon = pytest.mark.skipif(not ah.HAVE_GLUON, reason="needs Triton's Gluon")


@pytest.mark.parametrize(
    ("d", "split"),
    [
        (72, (64, 16)),
        (64, (64, 0)),
        (128, (128, 0)),
        (80, (64, 16)),
        (96, (64, 32)),
        (40, (32, 16)),
    ],
)
def test_split_head_dim_covers_the_head_dim_in_powers_of_two(d: int, split: tuple[int, int]):
    assert ah.split_head_dim(d) == split
    assert sum(split) >= d


@needs_gluon
def test_rejects_a_sequence_that_is_not_a_multiple_of_the_blocks():
    q = torch.zeros(1, 2, 100, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="multiple of 64 and 64"):
        ah.attention_hopper(q, q, q, block_m=64, block_n=64)


@needs_gluon
def test_rejects_float32():
    q = torch.zeros(1, 2, 128, 64)
    with pytest.raises(ValueError, match="fp16 or bf16"):
        ah.attention_hopper(q, q, q, block_m=64, block_n=64)


_LOWER = """
import json, sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from triton.runtime.jit import mangle_type
from difforge.kernels import attention_hopper as ah

out = {}
for d in (64, 72, 128):
    q = torch.empty(2 * 256, d, dtype=torch.float16)
    descs = ah.descriptors(q, q, q, torch.empty_like(q), 64, 64)
    fn = ah._attention_hopper_kernel
    sig = {n: mangle_type(a) for n, a in zip(fn.arg_names[:8], descs, strict=True)}
    sig.update(seq_len="i32", qk_scale="fp32")
    main, tail = ah.split_head_dim(d)
    consts = dict(BLOCK_M=64, BLOCK_N=64, HEAD_MAIN=main, HEAD_TAIL=tail or 16,
                  HAS_TAIL=tail > 0, STAGES=3, Q_IN_REGS=False, OVERLAP_QK=False,
                  num_warps=4)
    sig.update(dict.fromkeys(consts, "constexpr"))
    kernel = triton.compile(GluonASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": 4})
    out[d] = kernel.asm["ptx"]
json.dump(out, sys.stdout)
"""


@pytest.fixture(scope="module")
def sm90_ptx(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The kernel's PTX for an H100 at head dims 64 / 72 / 128 (64x64 tiles, 3 stages, 4
    warps), lowered in a fresh process: this session decorates Triton functions for the
    interpreter, which cannot be lowered, and an empty cache makes it really compile."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))
    done = subprocess.run(
        [sys.executable, "-c", _LOWER], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


@needs_gluon
@pytest.mark.parametrize(("d", "in_flight"), [(64, 1), (72, 2), (128, 1)])
def test_lowers_with_the_scores_waited_for_while_the_previous_pv_runs(
    sm90_ptx: dict[str, str], d: int, in_flight: int
):
    """Q·Kᵀ of block j is waited for with the P·V of block j-1 (and its head-dim tail)
    still in flight: the overlap the kernel exists for is in its PTX."""
    ptx = sm90_ptx[str(d)]
    assert "wgmma.mma_async" in ptx
    assert f"wgmma.wait_group.sync.aligned {in_flight};" in ptx
    assert "cp.async.bulk.tensor.2d" in ptx  # K/V stream through TMA
    assert "ld.local" not in ptx and "st.local" not in ptx


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("shape", "tile"), [
    ((1, 3, 384, 72), (64, 64, 3, 4)),
    ((2, 5, 256, 64), (128, 64, 2, 8)),
    ((1, 2, 512, 128), (64, 128, 2, 4)),
    ((3, 1, 128, 80), (128, 128, 2, 8)),
])  # fmt: skip
def test_gpu_matches_sdpa(dtype: torch.dtype, shape: tuple[int, ...], tile: tuple[int, ...]):
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("wgmma and TMA need Hopper")
    torch.manual_seed(0)
    q, k, v = (torch.randn(shape, device="cuda", dtype=dtype) for _ in range(3))
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    bm, bn, stages, warps = tile
    out = ah.attention_hopper(q, k, v, block_m=bm, block_n=bn, stages=stages, num_warps=warps)
    sdpa = F.scaled_dot_product_attention(q, k, v)
    err = (out.float() - ref).norm() / ref.norm()
    sdpa_err = (sdpa.float() - ref).norm() / ref.norm()
    assert err <= 1.5 * sdpa_err + 1e-4, (err, sdpa_err)
