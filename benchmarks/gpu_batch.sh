#!/usr/bin/env bash
# What is left to measure on a GPU, in parts that each fit one 10-minute device command.
# Usage (on the device machine, from the repo root, after ../shared/gpu/prep here and
# with .whl carried): bash benchmarks/gpu_batch.sh <part>   -> JSON/logs under $OUT
#   tests    every `gpu`-marked test outside tests/diffusers (kernels, quant, passes)  ~5 min
#   testsdiff  the `gpu`-marked tests in tests/diffusers (pipelines, dynamic rewrites)  ~5 min
#   pixart   PixArt-XL-2 dynamic sweep vs specialised compiles at PIXART_SPECIALIZED
#            (1024x1024,960x720), warmed up at 768x1024, 3 timed runs a size       ~5 min
#   flux     FLUX.1-dev step: eager/compile/O2/O3 with profile                  ~8 min
#   vae      SDXL VAE decode with today's O2 rule, O3                           ~3 min
#   vaewide  wide-head attention and NHWC GroupNorm GPU tests, then SDXL VAE decode: compile
#            vs O2 without both rewrites, without the GroupNorm one, with both; O3   ~5 min
#   unetgn   SDXL UNet step: compile vs O2 without / with group_norm_channels_last  ~6 min
#   compile  bench_compile PixArt O3 and FLUX O2, regional off/nested           ~9 min
#   compilepx  bench_compile PixArt O2 and O3, regional off/nested              ~7 min
#   sdxl     SDXL dynamic sweep vs specialised compiles at SDXL_SPECIALIZED (1024x1024,960x720),
#            warmed up at SDXL_WARMUP_H x SDXL_WARMUP_W (768x1024), 3 timed runs a size; caches under .gpu-cache/ so a timed-out first call
#            leaves the second one warm (cold: 390 s to the first output, then the sweep and
#            the specialised compiles, ~2 min each, outlast one command)            ~10 min
#   misc     new GPU tests (autotune buckets, graph pool), PixArt O2 warm start under
#            cProfile, FLUX.1-dev O2 nested compile times                        ~11 min
#   sdxlfix  the GPU tests of graphs on modules converted per call (the SDXL pipeline's
#            force_upcast VAE), then the sdxl part cut at 470 s to fill .gpu-cache/  ~10 min
#   wprof    PixArt O2 warm start under cProfile alone                            ~5 min
#   o2cg     SDXL UNet and PixArt-XL steps: compile vs O2 vs O2 + CUDA graphs (trees,
#            pooled) and the UNet in its own memory format                     ~9 min
#   fp8      O3 with/without the fp8 swap (and all sizes) on PixArt and SD3     ~9 min
#   fp8next  ffblock probe, then PixArt/SD3 O3 vs O3 + persistent fp8 quantization
#            vs O3 + quant.fuse_qkv                                            ~9 min
#   attn     every `gpu` test, then the 8-bit attention tile sweep vs SDPA             ~6 min
#   attn8    the 8-bit attention kernel's `gpu` tests, then its sweep (tiles, P·V precision)
#            vs SDPA at DiT and UNet shapes, CUDA-graph timed                        ~5 min
#   attn8step the 8-bit attention `gpu` tests, the sweep, then PixArt-XL's step: compile
#            vs O3 vs O3 + 8-bit attention (fp16 / fp8 P·V, measured choice), profiled  ~9 min
#   o3fast   PixArt-XL step: compile vs O3 vs O3 + 8-bit attention chosen without measuring
#            (attention.select=always, fp8 P·V: the in-graph quantization's real cost), then
#            SDXL UNet step: compile vs O2 vs O3 (channels_last)                    ~8 min
#   o3unet   SDXL UNet step: compile vs O3 (channels_last), profiled               ~8 min
#   attn8dit SD3-medium and FLUX.1-dev steps: compile vs O3 vs O3 + 8-bit attention (fp8
#            P·V), profiled                                                       ~10 min
#   joint    the joint-attention `gpu` tests, then SD3-medium's step: compile vs O2 without
#            joint_linear vs O2, profiled                                        ~6 min
#   jointflux FLUX.1-dev step: compile vs O2 without joint_linear vs O2 (v of the double
#            blocks in one buffer), profiled                                       ~9 min
#   geglu    benchmarks/probe_geglu.py: Triton GEMMs with GEGLU's gate in the epilogue
#            (pointer and TMA loads) vs cuBLAS + Inductor's GEGLU, SDXL's shapes   ~2 min
#   jointo3  joint_linear's gpu tests (fp8 op too); SD3-medium step: compile vs O3 without
#            joint_linear vs O3 (fp8 linears writing one q/k/v buffer each), profiled  ~8 min
#   ablatepx PixArt-XL step: compile vs O2 vs O2 without fuse_qkv vs without gelu_epilogue ~5 min
#   ablatesd3 SD3-medium step: compile vs O2 vs O2 without fuse_qkv                  ~6 min
#   fp8block FF2's GELU + fp8 quantization + GEMM: row-wise scales vs 1x128 / 128x128 blocks ~3 min
#   sdxl8    SDXL's GEGLU + fp8 quantization (exact looped / persistent / bounded) + FF2, and its
#            attention projections fp16 vs fp8 (unfused and q/k/v fused), per level  ~2 min
#   o3sdxl   SDXL UNet step: compile vs O3 (GEGLU's FF2, text k/v fp16) vs O3 with both fp8 ~9 min
#   cgcontrol PixArt-XL step: compile vs compile + cudagraph trees vs O2, profiled      ~4 min
#   cgcontrolsd3 / cgcontrolsdxl  the same for SD3-medium (~6 min) / SDXL UNet (~9 min)
#   attnquant the 8-bit attention's quantization pre-pass, piece by piece, against a plain
#            copy of the same bytes, at PixArt / SD3 / FLUX self-attention shapes   ~2 min
#   catquant the one-kernel fp8 quantizers' gpu tests, their probes (GELU + cat; LayerNorm +
#            modulation) against Inductor's kernels                            ~3 min
#   catquantdit PixArt-XL / SD3 steps: compile vs O3 without the GELU quantizer kernel vs
#            O3 vs O3 + the LayerNorm quantizer kernel                       ~9 min
#   catquantflux FLUX.1-dev step: compile vs O3, profiled                       ~9 min
#   lnquantflux FLUX.1-dev step: O3 without the GELU quantizer kernel vs O3 vs O3 + the
#            LayerNorm quantizer kernel                                         ~9 min
#   ropekern the fp8 quantizers' and the RMSNorm + RoPE kernel's gpu tests, then the
#            catquant (two sweeps vs registers) and rope probes                 ~3 min
#   lnres    the fp8 quantizers' gpu tests, then the lnquant probe (with and without the
#            residual update before the norm)                                    ~3 min
#   lnresdit PixArt-XL / SD3 steps: compile vs O3 vs O3 + the LayerNorm quantizer kernel
#            (now with the residual update)                                      ~8 min
#   ropeflux FLUX.1-dev step: compile vs O2 vs O2 + rms_norm_rope, profiled        ~9 min
#   ropeflux3 FLUX.1-dev step: O3 vs O3 + rms_norm_rope (+ the residual LayerNorm
#            quantizer), profiled                                                ~9 min
#   fluxgelu FLUX.1-dev step: O2 vs O2 without gelu_epilogue, profiled           ~5 min
#   s23tests the gpu tests of the twenty-third session's changes                  ~4 min
#   fluxnorm the O3-with-grad gpu test; FLUX.1-dev O2 vs persistent 3072-wide LayerNorms vs
#            fuse_qkv.cached_weights                                            ~8 min
#   o3flux   FLUX.1-dev step: compile vs O3, profiled, with each variant's SM clock   ~9 min
#   freezesdxl SDXL UNet step: compile vs O2 vs O2 + freezing (channels_last), profiled  ~9 min
#   freezepx PixArt-XL step: compile vs O2 / O3, each with and without freezing, profiled ~9 min
#   headpad  SDPA at PixArt's head dim 72 zero-padded to 80/96/128, per backend       ~2 min
#   fluxo2   every `gpu` test, then FLUX.1-dev compile vs O2 with profile               ~9 min
#   pool     graph-pool GPU tests, then PixArt-XL 20 steps at every sweep size with
#            O2:cudagraphs + dynamic, difforge's pooled CUDA graphs (POOL_IMPLS)    ~9 min
#   o2dit    graph-pool GPU tests, then PixArt-XL and SD3-medium steps: compile vs O2
#            without graphs (max-optimize) vs O2 (max-optimize + pooled CUDA graphs)  ~9 min
#   o2unet   SDXL UNet step and SDXL VAE decode, the same three (channels_last)     ~9 min
#   precompile  PixArt-XL O2 and FLUX.1-dev O2 (nested) compile times, cache.precompile
#            off vs on (warm new process without Dynamo's re-trace)            ~10 min
#   o3warm   PixArt-XL O3 compile times (regional off), with the AOT-cache bypass reasons
#            (none expected since db19844: 20 s at dd049e8, 9.2 s at 430d482)       ~3 min
#   fluxpre  FLUX.1-dev O2 nested compile times, cache.precompile off vs on      ~8 min
#   fluxwarm FLUX.1-dev O2: nested + precompile (after the decorated-forward fix), then the
#            blocks style, compile times and step                                  ~9 min
#   dynvae   SDXL VAE decode, O2 static vs O2 + dynamic (profiled), then the graph-pool
#            GPU tests                                                       ~4 min
#   dynunet  SDXL VAE decode and UNet step at 960x720: O2 static vs O2 + dynamic compiled
#            first at 1024x1024 (as the pipeline sweep warms up), profiled; caches under
#            .gpu-cache/, so a second call on the warm machine finishes the UNet      ~10 min
#   dynkern  the kernels a dynamic graph loses on, with their code: SDXL UNet mid_block,
#            down_blocks.2 and up_blocks.0 (1280 channels) and down_blocks.1 (640), and the
#            VAE decoder's up_blocks.1, static vs dynamic at 960x720 (first call at 1024x1024),
#            benchmarks/diag_dynamic_kernels.py                                    ~8 min
#   o2flux   FLUX.1-dev step, the same three                                       ~8 min
#   fluxkern FLUX.1-dev single and double block kernels and code (diag_dynamic_kernels.py),
#            then the `gpu` tests in tests/diffusers                               ~9 min
#   splitflux FLUX.1-dev step: compile vs O2 without / with split_cat_linear, profiled  ~8 min
#   quality  quality report, PixArt-XL: eager/compile/O2/O3/fp8, with and without
#            planted outliers, 20-step generations                             ~9 min
#   qualitysd3 the same for SD3-medium, with the float32 generation (fp32) as the yardstick
#   qualitysd3o SD3-medium's planted-outlier set alone (eager, compile, O3, fp8, fp32) ~9 min
#   qualityflux FLUX.1-dev's quality report, weights as built: eager, O3, fp8        ~9 min
#   qualityfluxc  the same for stock torch.compile                                ~7 min
#   qualityfluxo  FLUX.1-dev's planted-outlier set: eager, O3, fp8                 ~9 min
#   qualityflux32 FLUX.1-dev in float32 (the yardstick), weights as built          ~7 min
#   qualitypx32 PixArt-XL's float32 yardstick, both weight sets                   ~4 min
#   qualitysdxl SDXL base quality report, weights as built: eager, compile, O3, fp8, fp32 ~9 min
#   qualitysdxlo SDXL base, planted outliers: eager, O3, fp8, fp32                 ~8 min
#   s26px    the attention kernels' gpu tests (after the s25 refactors), then PixArt-XL step:
#            compile vs O3 vs O3 + quant.fuse_qkv (to_qkv 1152x3456 passes the fp8 size filter)
#            vs the same + the LayerNorm quantizer kernel, profiled                ~8 min
#   s26sdxl  SDXL UNet step: compile vs O3 vs O3 + quant.fuse_qkv (1280x3840), profiled ~9 min
#   s26sd3   the fp8 gpu tests (row views), then SD3-medium step: compile vs O3 without
#            quant.fuse_qkv vs O3 (fused q/k/v and added q/k/v), profiled            ~7 min
#   s26flux  FLUX.1-dev step: O3 without quant.fuse_qkv vs O3, profiled          ~8 min
#   s26mem   FLUX.1-dev then PixArt-XL O3 alone: peak memory once the swap frees each weight
#            as it converts it (FLUX O3 was 30.6 GiB, 34.6 with quant.fuse_qkv)       ~6 min
#   s27o2    SDXL UNet step: compile vs O2 vs O2 + fuse_qkv.modules (channels_last), profiled ~7 min
#   s27o2dit PixArt-XL and SD3-medium steps: compile vs O2 vs O2 + fuse_qkv.modules   ~8 min
#   s27flux  FLUX.1-dev step: compile vs O2 (fuse_qkv.modules on) vs O2 with it off, profiled ~9 min
#   s28tests the gpu tests of the fused projections (moves, fp8 after), quant and pipe   ~4 min
#   s29tests the gpu tests of the pipeline LoRA methods (a new LoRA scale under replayed graphs)
#            and of O2 over offloaded denoisers (group offloading, sequential, also set up
#            after compile_pipe)                                                      ~4 min
#   s29hooks the gpu tests of tests/test_module_hooks.py (hooks set up after O2 ran: a hook
#            that doubles an output, group offloading; offloading set up before) and of
#            tests/diffusers/test_pipe_offload.py (model CPU offload, sequential)   ~4 min
#   hopperattn  the Gluon attention's gpu tests, then per shape, layout and tile against
#               cuDNN and flash SDPA                                              ~4 min
#   hopperstep  PixArt-XL-2 step: O2, and O2 + the attention_hopper pass (Gluon
#               attention where measured faster)                                  ~4 min
#   hoppertests the gpu tests of both Gluon attention kernels and of the attention_hopper
#               pass (a compiled block against eager)                             ~2 min
#   hopperpx    PixArt-XL-2: compile, O2, O2 + attention_hopper, O3, O3 + it        ~6 min
#   hopperdit   SD3-medium and SDXL UNet: O2 and O2 + attention_hopper (the measured
#               choice should keep SDPA: is compile time or the step hurt?)     ~8 min
#   hopperflux  FLUX.1-dev: O2 and O2 + attention_hopper                          ~6 min
set -uo pipefail
part="${1:?part: tests|testsnew|testsdiff|pixart|sdxlfix|o3warm|fluxpre|fluxwarm|precompile|dynvae|dynunet|dynkern|o2dit|o2unet|o2flux|splitflux|fluxkern|flux|vae|compile|sdxl|o2cg|misc|wprof|fp8|fp8next|attn|attn8|attn8step|attn8dit|o3fast|o3unet|fluxo2|pool|compilepx|vaewide|unetgn|quality|qualitysd3|qualityflux|joint|geglu|qualitysd3o|jointflux|jointo3|headpad|ablatepx|ablatesd3|qualityfluxc|qualityfluxo|qualityflux32|fp8block|sdxl8|o3sdxl|qualitypx32|qualitysdxl|qualitysdxlo|freezesdxl|freezepx|catquant|catquantdit|catquantflux|lnquantflux|ropekern|ropeflux|ropeflux3|lnres|lnresdit|fluxgelu|fluxnorm|s23tests|tunepx|tuneflux|tunepx3|onepass|s25step|s26px|s26sdxl|s26sd3|s26flux|s26mem|s27o2|s27o2dit|s27flux|s28tests|s29tests|s29hooks|hopperattn|hopperstep|hoppertests|hopperpx|hopperdit|hopperflux}"
out="${OUT:-out}"
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH="/tmp/site:$PWD/src"
# the copied tree's .git can be stale: the caller passes the commit it ran
export DIFFORGE_GIT_COMMIT="${DIFFORGE_GIT_COMMIT:-}"
(nvidia-smi dmon -s pc -d 2 >"$out/dmon_$part.txt" 2>&1 &)
run() {  # run <seconds> <log name> <command...>: bounded, logged, tail shown
  local limit="$1" name="$2"
  shift 2
  timeout "$limit" "$@" >"$out/$name.txt" 2>&1
  local rc=$?
  echo "[$name] exit $rc"
  tail -c 1500 "$out/$name.txt"
  return "$rc"  # so `part1 && part2` stops at a failed or timed-out part
}
case "$part" in
  tests)  # all of them outlast one command (H100, f0acfd2)
    run 560 gpu_tests python3 -m pytest -m gpu tests -q -p no:cacheprovider --durations=15 \
      --ignore=tests/diffusers ;;
  testsreplay)  # gpu tests of frozen and cached weights under pooled
    # CUDA graphs (replays run the checks and refreshes the recorded call noted), and the
    # nvidia-smi telemetry of bench_step
    run 300 gpu_tests_replay python3 -m pytest -m gpu -q -p no:cacheprovider -rs \
      tests/test_fused_weights.py tests/test_graph_pool.py tests/test_telemetry.py ;;
  testsnew)  # the twentieth session's gpu tests: layout-check copies (GroupNorm, VAE), joint
    # attention, the graph pool and cached weights under replay, telemetry
    run 400 gpu_tests_new python3 -m pytest -m gpu -q -p no:cacheprovider -rs \
      tests/diffusers/test_model_passes.py tests/test_joint_linear.py tests/test_graph_pool.py \
      tests/test_fused_weights.py tests/test_telemetry.py tests/test_passes.py ;;
  testsdiff)
    run 560 gpu_tests_diffusers python3 -m pytest -m gpu tests/diffusers -q -p no:cacheprovider \
      --durations=15 ;;
  pixart)
    # Caches under .gpu-cache/ (kept on a warm machine), so a second call can compare more
    # sizes: PIXART_SPECIALIZED=768x1024,1024x768,512x512,544x408 (the other four).
    export TORCHINDUCTOR_CACHE_DIR="$PWD/.gpu-cache/inductor" DIFFORGE_CACHE_DIR="$PWD/.gpu-cache/difforge"
    run 560 t2i_pixart_dynamic python3 benchmarks/text_to_image.py --model pixart-xl-2-1024 \
      --compare difforge --height 768 --width 1024 \
      --compiler-config '{"mode": "O2", "dynamic": true}' \
      --run_multiple_resolutions --run_rare_resolutions \
      --compare-specialized "${PIXART_SPECIALIZED:-1024x1024,960x720}" \
      --warmups 1 --runs 3 --output-json "$out/t2i_pixart_dynamic.json" ;;
  flux)
    run 560 step_flux python3 benchmarks/bench_step.py --models flux-dev \
      --variants "eager;compile;O2;O3" --profile --output-json "$out/step_flux.json" ;;
  vae)
    V='compile;O2={"mode":"O2","memory_format":"channels_last"};O3={"mode":"O3","memory_format":"channels_last"}'
    run 300 step_vae python3 benchmarks/bench_step.py --models sdxl-base:vae --batch 1 \
      --variants "$V" --profile --output-json "$out/step_vae.json" ;;
  compile)
    run 280 compile_pixart_o3 python3 benchmarks/bench_compile.py --models pixart-xl-2-1024 \
      --modes O3 --regional off,nested --output-json "$out/compile_pixart_o3.json"
    run 280 compile_flux_o2 python3 benchmarks/bench_compile.py --models flux-dev \
      --modes O2 --regional nested --output-json "$out/compile_flux_o2_nested.json" ;;
  vaewide)
    CL='"mode":"O2","memory_format":"channels_last"'
    V="compile;O2-before={$CL,\"passes.attention_wide_heads\":false,\"passes.group_norm_channels_last\":false}"
    V+=";O2-nogn={$CL,\"passes.group_norm_channels_last\":false};O2={$CL}"
    V+=';O3={"mode":"O3","memory_format":"channels_last"}'
    run 150 gpu_tests_wide python3 -m pytest -m gpu tests/test_passes.py -q -p no:cacheprovider \
      -k "wide or group_norm"
    run 400 step_vae_wide python3 benchmarks/bench_step.py --models sdxl-base:vae --batch 1 \
      --variants "$V" --profile --output-json "$out/step_vae_wide.json" ;;
  unetgn)
    CL='"mode":"O2","memory_format":"channels_last"'
    V="compile;O2-nogn={$CL,\"passes.group_norm_channels_last\":false};O2={$CL}"
    run 560 step_unet_gn python3 benchmarks/bench_step.py --models sdxl-base \
      --variants "$V" --profile --output-json "$out/step_unet_gn.json" ;;
  compilepx)
    run 560 compile_pixart python3 benchmarks/bench_compile.py --models pixart-xl-2-1024 \
      --modes O2,O3 --regional off,nested --output-json "$out/compile_pixart.json" ;;
  sdxl)
    # Persistent across calls on one warm machine (ignored by git, kept by the device tool).
    export TORCHINDUCTOR_CACHE_DIR="$PWD/.gpu-cache/inductor" DIFFORGE_CACHE_DIR="$PWD/.gpu-cache/difforge"
    # The warm-up (the compiling first call) is at a non-square size, as #6 asks.
    run "${SDXL_LIMIT:-585}" t2i_sdxl_dynamic python3 benchmarks/text_to_image.py --model sdxl-base \
      --compare difforge --height "${SDXL_WARMUP_H:-768}" --width "${SDXL_WARMUP_W:-1024}" \
      --compiler-config '{"mode": "O2", "dynamic": true, "memory_format": "channels_last"}' \
      --run_multiple_resolutions --run_rare_resolutions \
      --compare-specialized "${SDXL_SPECIALIZED:-1024x1024,960x720}" \
      --steps 20 --warmups 1 --runs 3 --output-json "$out/t2i_sdxl_dynamic.json" ;;
  sdxlfix)
    run 110 gpu_tests_pool python3 -m pytest -m gpu tests/test_graph_pool.py \
      tests/diffusers/test_pipe.py -q -p no:cacheprovider -rs
    SDXL_LIMIT=470 bash "$0" sdxl ;;
  wprof)
    run 560 compile_pixart_profile python3 benchmarks/bench_compile.py \
      --models pixart-xl-2-1024 --modes O2 --step-runs 0 --profile-warm 40 \
      --output-json "$out/compile_pixart_profile.json" ;;
  misc)
    run 150 gpu_tests_misc python3 -m pytest -m gpu tests/test_autotune_buckets.py \
      tests/test_graph_pool.py -q -p no:cacheprovider -rs
    run 330 compile_pixart_profile python3 benchmarks/bench_compile.py \
      --models pixart-xl-2-1024 --modes O2 --step-runs 0 --profile-warm 40 \
      --output-json "$out/compile_pixart_profile.json"
    run 270 compile_flux_o2 python3 benchmarks/bench_compile.py --models flux-dev \
      --modes O2 --regional nested --output-json "$out/compile_flux_o2_nested.json" ;;
  o2cg)
    CL='"mode":"O2","memory_format":"channels_last"'
    CG='"mode":"O2:cudagraphs","memory_format":"channels_last"'
    V="compile;O2={$CL};O2-cg-trees={$CG,\"cudagraphs.impl\":\"trees\"}"
    V+=";O2-cg-pooled={$CG,\"cudagraphs.impl\":\"pooled\"}"
    V+=';O2-cg-nchw={"mode":"O2:cudagraphs","cudagraphs.impl":"pooled"}'
    run 330 step_unet_cg python3 benchmarks/bench_step.py --models sdxl-base \
      --variants "$V" --profile --output-json "$out/step_unet_cg.json"
    V='compile;O2;O2-cg-trees={"mode":"O2:cudagraphs","cudagraphs.impl":"trees"}'
    V+=';O2-cg-pooled={"mode":"O2:cudagraphs","cudagraphs.impl":"pooled"}'
    run 230 step_pixart_cg python3 benchmarks/bench_step.py --models pixart-xl-2-1024 \
      --variants "$V" --profile --output-json "$out/step_pixart_cg.json" ;;
  fp8)
    V='O2;O3-nofp8={"mode":"O3","quant.fp8_linear":false};O3;O3-all={"mode":"O3","quant.min_weight_elements":0}'
    run 120 fp8_tests python3 -m pytest -q -rA -m gpu tests/quant -p no:cacheprovider
    run 450 step_fp8 python3 benchmarks/bench_step.py --models pixart-xl-2-1024,sd3-medium \
      --profile --variants "$V" --output-json "$out/step_fp8_o3.json" ;;
  fp8next)
    V='compile;O3;O3-pq={"mode":"O3","heuristics.persistent_fp8_quant_max":8192};O3-fq={"mode":"O3","quant.fuse_qkv":true}'
    run 100 probe_ffblock python3 benchmarks/probe_ops.py --probes ffblock \
      --output-json "$out/probe_ffblock.json"
    run 60 gpu_fp8_heuristics python3 -m pytest -q -m gpu tests/test_gpu.py -k "fp8 or sigmoid" \
      -p no:cacheprovider
    run 330 step_fp8_pq python3 benchmarks/bench_step.py --models pixart-xl-2-1024,sd3-medium \
      --profile --variants "$V" --output-json "$out/step_fp8_pq.json" ;;
  attn)
    run 300 gpu_tests python3 -m pytest -m gpu tests -q -p no:cacheprovider
    run 240 probe_int8attn python3 benchmarks/probe_ops.py --probes int8attn \
      --output-json "$out/probe_int8attn.json" ;;
  attn8)
    run 120 gpu_tests_attention python3 -m pytest -m gpu tests/kernels -q -p no:cacheprovider
    run 200 probe_int8attn python3 benchmarks/probe_ops.py --probes int8attn \
      --output-json "$out/probe_int8attn.json" ;;
  attn8step)
    V='compile;O3;O3-attn8={"mode":"O3","passes.attention_int8":true};O3-attn8-pv8={"mode":"O3","passes.attention_int8":true,"attention.pv_fp8":true}'
    run 120 gpu_tests_attention python3 -m pytest -m gpu tests/kernels -q -p no:cacheprovider
    run 150 probe_int8attn python3 benchmarks/probe_ops.py --probes int8attn \
      --output-json "$out/probe_int8attn.json"
    run 300 step_attn_pixart python3 benchmarks/bench_step.py --models pixart-xl-2-1024 \
      --variants "$V" --profile --output-json "$out/step_attn_pixart.json" ;;
  o3fast)
    V='compile;O3;O3-attn8-always={"mode":"O3","passes.attention_int8":true,"attention.pv_fp8":true,"attention.select":"always"}'
    run 230 step_attn_always_pixart python3 benchmarks/bench_step.py --models pixart-xl-2-1024 \
      --variants "$V" --profile --output-json "$out/step_attn_always_pixart.json"
    V='compile;O2={"mode":"O2","memory_format":"channels_last"}'
    V+=';O3={"mode":"O3","memory_format":"channels_last"}'
    run 330 step_o3_unet python3 benchmarks/bench_step.py --models sdxl-base \
      --variants "$V" --profile --output-json "$out/step_o3_unet.json" ;;
  o3unet)
    V='compile;O3={"mode":"O3","memory_format":"channels_last"}'
    run 430 step_o3_unet python3 benchmarks/bench_step.py --models sdxl-base \
      --variants "$V" --profile --output-json "$out/step_o3_unet.json" ;;
  attn8dit)
    V='compile;O3;O3-attn8-pv8={"mode":"O3","passes.attention_int8":true,"attention.pv_fp8":true}'
    run 270 step_attn_sd3 python3 benchmarks/bench_step.py --models sd3-medium \
      --variants "$V" --profile --output-json "$out/step_attn_sd3.json"
    run 320 step_attn_flux python3 benchmarks/bench_step.py --models flux-dev \
      --variants "$V" --profile --output-json "$out/step_attn_flux.json" ;;
  joint)
    run 120 gpu_tests_joint python3 -m pytest -q -rA -m gpu tests/test_joint_linear.py \
      -p no:cacheprovider
    V='compile;O2-nojoint={"mode":"O2","passes.joint_linear":false};O2'
    run 430 step_joint_sd3 python3 benchmarks/bench_step.py --models sd3-medium \
      --variants "$V" --profile --output-json "$out/step_joint_sd3.json" ;;
  jointflux)
    V='compile;O2-nojoint={"mode":"O2","passes.joint_linear":false};O2'
    run 570 step_joint_flux python3 benchmarks/bench_step.py --models flux-dev \
      --variants "$V" --profile --output-json "$out/step_joint_flux.json" ;;
  jointo3)
    run 100 gpu_tests_joint python3 -m pytest -q -rA -m gpu tests/test_joint_linear.py -p no:cacheprovider
    V='compile;O3-nojoint={"mode":"O3","passes.joint_linear":false};O3'
    run 480 step_joint_sd3_o3 python3 benchmarks/bench_step.py --models sd3-medium \
      --variants "$V" --profile --output-json "$out/step_joint_sd3_o3.json" ;;
  ablatepx)  # do fuse_qkv and gelu_epilogue still pay? (fused q/k/v views slowed cuDNN ~9%
    # on an H200, 2026-11-26_h200_probe_ops.json; the GELU epilogue slowed FLUX's GEMMs ~18%)
    V='compile;O2;O2-noqkv={"mode":"O2","passes.fuse_qkv":false}'
    V+=';O2-nogelu={"mode":"O2","passes.gelu_epilogue":false}'
    run 570 step_ablate_pixart python3 benchmarks/bench_step.py --models pixart-xl-2-1024 \
      --variants "$V" --profile --output-json "$out/step_ablate_pixart.json" ;;
  ablatesd3)
    V='compile;O2;O2-noqkv={"mode":"O2","passes.fuse_qkv":false}'
    run 570 step_ablate_sd3 python3 benchmarks/bench_step.py --models sd3-medium \
      --variants "$V" --profile --output-json "$out/step_ablate_sd3.json" ;;
  fp8block)
    run 300 probe_fp8_block python3 benchmarks/probe_ops.py --probes fp8block \
      --output-json "$out/probe_fp8_block.json" ;;
  o3sdxl)  # SDXL UNet: do keeping GEGLU's FF2 and the text k/v in fp16 (quant.skip_gated_outputs,
    # quant.skip_cross_attention_kv: defaults since 2026-11-27's sixteenth session) pay in the
    # step, as sdxl8's probe and the s13 profile say? O3-old = both off (the s13 rule).
    V='compile;O3={"mode":"O3","memory_format":"channels_last"}'
    V+=';O3-old={"mode":"O3","memory_format":"channels_last","quant.skip_gated_outputs":false'
    V+=',"quant.skip_cross_attention_kv":false}'
    run 580 step_o3_sdxl python3 benchmarks/bench_step.py --models sdxl-base \
      --variants "$V" --profile --output-json "$out/step_o3_sdxl.json" ;;
  freezesdxl)  # O2 + freezing (weights folded for real since 2026-11-27's sixteenth session:
    # fuse_qkv then fuses the 1280-wide q/k/v and the text k/v its cost rule leaves apart)
    V='compile;O2={"mode":"O2","memory_format":"channels_last"}'
    V+=';O2-freezing={"mode":"O2:freezing","memory_format":"channels_last"}'
    run 580 step_freeze_sdxl python3 benchmarks/bench_step.py --models sdxl-base \
      --variants "$V" --profile --output-json "$out/step_freeze_sdxl.json" ;;
  cachedsdxl)  # fuse_qkv.cached_weights (2026-11-28, seventeenth session): does concatenating
    # the fused weights once buy what freezing bought (O2 32.64 -> 31.58 ms), weights still live?
    V='compile;O2={"mode":"O2","memory_format":"channels_last"}'
    V+=';O2-cached={"mode":"O2","memory_format":"channels_last","fuse_qkv.cached_weights":true}'
    V+=';O2-freezing={"mode":"O2:freezing","memory_format":"channels_last"}'
    run 590 step_cached_sdxl python3 benchmarks/bench_step.py --models sdxl-base \
      --variants "$V" --profile --output-json "$out/step_cached_sdxl.json" ;;
  cachedsdxl3)  # the same under O3: SDXL's 1280-wide q/k/v and text k/v stay fp16 there
    # (size rule, skip_cross_attention_kv), so fuse_qkv and the cache apply to them too
    V='compile;O3={"mode":"O3","memory_format":"channels_last"}'
    V+=';O3-cached={"mode":"O3","memory_format":"channels_last","fuse_qkv.cached_weights":true}'
    run 590 step_cached_sdxl_o3 python3 benchmarks/bench_step.py --models sdxl-base \
      --variants "$V" --profile --output-json "$out/step_cached_sdxl_o3.json" ;;
  cacheddit)  # the same on the DiTs, whose self-attention q/k/v fuse today with a per-call
    # concatenation (PixArt ~0.2 ms a step by bytes moved)
    V='compile;O2;O2-cached={"mode":"O2","fuse_qkv.cached_weights":true}'
    run 290 step_cached_pixart python3 benchmarks/bench_step.py --models pixart-xl-2-1024 \
      --variants "$V" --profile --output-json "$out/step_cached_pixart.json"
    run 290 step_cached_sd3 python3 benchmarks/bench_step.py --models sd3-medium \
      --variants "$V" --profile --output-json "$out/step_cached_sd3.json" ;;
  cgcontrol)  # the control for "O2's kernels run longer": stock compile with cudagraph
    # trees (reduce-overhead) runs compile's kernels gap-free, without difforge's rewrites
    V='compile;compile-cudagraphs;O2'
    run 230 step_cgcontrol_pixart python3 benchmarks/bench_step.py --models pixart-xl-2-1024 \
      --variants "$V" --profile --output-json "$out/step_cgcontrol_pixart.json" ;;
  cgcontrolsd3)  # the same control for SD3-medium
    run 400 step_cgcontrol_sd3 python3 benchmarks/bench_step.py --models sd3-medium \
      --variants 'compile;compile-cudagraphs;O2' --profile \
      --output-json "$out/step_cgcontrol_sd3.json" ;;
  cgcontrolsdxl)  # and for the SDXL UNet (channels_last, as O2 runs it)
    V='compile;compile-cudagraphs;O2={"mode":"O2","memory_format":"channels_last"}'
    run 580 step_cgcontrol_sdxl python3 benchmarks/bench_step.py --models sdxl-base \
      --variants "$V" --profile --output-json "$out/step_cgcontrol_sdxl.json" ;;
  attnquant)  # where the 8-bit attention's quantization pre-pass spends its time, per piece
    run 300 probe_attention_quant python3 benchmarks/probe_ops.py --probes attnquant \
      --output-json "$out/probe_attention_quant.json" ;;
  catquant)  # the one-kernel fp8 quantizers: their gpu tests, then catquant (GELU (+ cat) +
    # quantization vs Inductor's two kernels at FLUX / PixArt / SD3 shapes) and lnquant
    # (LayerNorm + modulation + quantization: O3's compiled composite vs the Triton kernel)
    run 150 gpu_tests_catquant python3 -m pytest -m gpu -q -p no:cacheprovider -rs \
      tests/kernels/test_fp8_row_quant.py tests/quant/test_fp8_gelu_scale.py
    run 240 probe_catquant python3 benchmarks/probe_ops.py --probes catquant,lnquant \
      --output-json "$out/probe_catquant.json" ;;
  catquantdit)  # PixArt-XL and SD3-medium steps: compile vs O3 without the GELU quantizer
    # kernel vs O3 (with it, since 2026-11-28) vs O3 + the LayerNorm quantizer kernel
    V='compile;O3-nocatq={"mode":"O3","passes.fp8_cat_quant_kernel":false};O3'
    V+=';O3-lnq={"mode":"O3","passes.fp8_layer_norm_quant_kernel":true}'
    run 590 step_catquant_dit python3 benchmarks/bench_step.py --models pixart-xl-2-1024,sd3-medium \
      --variants "$V" --output-json "$out/step_catquant_dit.json" ;;
  catquantflux)  # FLUX.1-dev step: compile vs O3 (with the GELU + cat quantizer kernel), profiled
    run 590 step_catquant_flux python3 benchmarks/bench_step.py --models flux-dev \
      --variants 'compile;O3' --profile --output-json "$out/step_catquant_flux.json" ;;
  lnquantflux)  # FLUX.1-dev step: O3 without the GELU + cat quantizer kernel vs O3 vs O3 + the
    # LayerNorm quantizer kernel
    V='O3-nocatq={"mode":"O3","passes.fp8_cat_quant_kernel":false};O3'
    V+=';O3-lnq={"mode":"O3","passes.fp8_layer_norm_quant_kernel":true}'
    run 590 step_lnquant_flux python3 benchmarks/bench_step.py --models flux-dev \
      --variants "$V" --output-json "$out/step_lnquant_flux.json" ;;
  ropekern)  # the Triton kernels of this session: gpu tests, then their probes
    run 200 gpu_tests_ropekern python3 -m pytest -m gpu -q -p no:cacheprovider -rs \
      tests/kernels/test_fp8_row_quant.py tests/kernels/test_rms_norm_rope.py
    run 300 probe_ropekern python3 benchmarks/probe_ops.py --probes catquant,rope \
      --output-json "$out/probe_ropekern.json" ;;
  lnres)  # the LayerNorm quantizer with the residual update: gpu tests, then its probe
    run 200 gpu_tests_lnres python3 -m pytest -m gpu -q -p no:cacheprovider -rs \
      tests/kernels/test_fp8_row_quant.py
    run 300 probe_lnres python3 benchmarks/probe_ops.py --probes lnquant \
      --output-json "$out/probe_lnres.json" ;;
  lnresdit)  # PixArt-XL / SD3 O3 steps with the LayerNorm quantizer (residual included)
    V='compile;O3;O3-lnq={"mode":"O3","passes.fp8_layer_norm_quant_kernel":true}'
    run 590 step_lnres_dit python3 benchmarks/bench_step.py --models pixart-xl-2-1024,sd3-medium \
      --variants "$V" --output-json "$out/step_lnres_dit.json" ;;
  tunepx)  # GEMM autotuning under O2, never measured on the real models: Inductor's Triton
    # templates (persistent TMA ones too) against cuBLAS per shape, epilogues fused into the
    # winner where that benchmarks faster (PixArt-XL-2, fp16, batch 2)
    V='compile;O2;O2-tune={"mode":"O2","inductor.max_autotune_gemm":true'
    V+=',"inductor.triton.enable_persistent_tma_matmul":true}'
    run 590 step_tune_pixart python3 benchmarks/bench_step.py --models pixart-xl-2-1024 \
      --variants "$V" --profile --output-json "$out/step_tune_pixart.json" ;;
  tunepx3)  # the same under O3: Inductor's Triton scaled_mm templates (row-wise fp8) against
    # the _scaled_mm kernel per shape (PixArt-XL-2)
    V='O3;O3-tune={"mode":"O3","inductor.max_autotune_gemm":true'
    V+=',"inductor.triton.enable_persistent_tma_matmul":true}'
    run 560 step_tune3_pixart python3 benchmarks/bench_step.py --models pixart-xl-2-1024 \
      --variants "$V" --profile --output-json "$out/step_tune3_pixart.json" ;;
  tuneflux)  # the same on FLUX.1-dev (bf16, batch 1)
    V='O2;O2-tune={"mode":"O2","inductor.max_autotune_gemm":true'
    V+=',"inductor.triton.enable_persistent_tma_matmul":true}'
    run 590 step_tune_flux python3 benchmarks/bench_step.py --models flux-dev \
      --variants "$V" --profile --output-json "$out/step_tune_flux.json" ;;
  s26px)  # the attention kernels' gpu tests (refactors 9ae3e3b/0f43b88 never ran on a GPU),
    # then does fp8 on PixArt's fused q/k/v pay now that the LayerNorm + modulation producer
    # fuses its quantization? (quant.fuse_qkv was within noise on an H100 in session 4)
    run 150 gpu_tests_attention python3 -m pytest -m gpu -q -p no:cacheprovider -rs \
      tests/kernels/test_attention_int8.py tests/kernels/test_attention_int8_onepass.py
    V='compile;O3;O3-fq={"mode":"O3","quant.fuse_qkv":true}'
    V+=';O3-fq-lnq={"mode":"O3","quant.fuse_qkv":true,"passes.fp8_layer_norm_quant_kernel":true}'
    run 420 step_fq_pixart python3 benchmarks/bench_step.py --models pixart-xl-2-1024 \
      --variants "$V" --profile --output-json "$out/step_fq_pixart.json" ;;
  s26sdxl)  # SDXL's 1280-wide q/k/v fused before the fp8 swap pass the size filter (3840x1280)
    V='compile;O3={"mode":"O3","memory_format":"channels_last"}'
    V+=';O3-fq={"mode":"O3","memory_format":"channels_last","quant.fuse_qkv":true}'
    run 580 step_fq_sdxl python3 benchmarks/bench_step.py --models sdxl-base \
      --variants "$V" --profile --output-json "$out/step_fq_sdxl.json" ;;
  s26sd3)  # quant.fuse_qkv became O3's default on PixArt's and SDXL's numbers: does it keep
    # SD3 (its 1536-wide q/k/v were fp8 already; joint_linear wrote them into one buffer)?
    run 150 gpu_tests_fp8 python3 -m pytest -m gpu -q -p no:cacheprovider -rs \
      tests/quant/test_fp8_gpu.py -k "row_views or pipeline_psnr"
    V='compile;O3-nofq={"mode":"O3","quant.fuse_qkv":false};O3'
    run 420 step_fq_sd3 python3 benchmarks/bench_step.py --models sd3-medium \
      --variants "$V" --profile --output-json "$out/step_fq_sd3.json" ;;
  s26flux)  # the same question for FLUX.1-dev (3072-wide q/k/v, fp8 already; rms_norm_rope)
    V='O3-nofq={"mode":"O3","quant.fuse_qkv":false};O3'
    run 580 step_fq_flux python3 benchmarks/bench_step.py --models flux-dev \
      --variants "$V" --profile --output-json "$out/step_fq_flux.json" ;;
  s26mem)  # peak memory of O3 after 78c0131 (the swap frees each weight as it converts it)
    run 290 step_mem_flux python3 benchmarks/bench_step.py --models flux-dev --variants O3 \
      --output-json "$out/step_mem_flux.json"
    run 80 step_mem_pixart python3 benchmarks/bench_step.py --models pixart-xl-2-1024 \
      --variants O3 --output-json "$out/step_mem_pixart.json" ;;
  s27o2)  # module-level q/k/v fusion under O2 (fuse_qkv.modules, opt-in since 2026-11-29):
    # freezing got the SDXL UNet 1.152x -> 1.191x by fusing these groups in the graph
    V='compile;O2={"mode":"O2","memory_format":"channels_last"}'
    V+=';O2-fm={"mode":"O2","memory_format":"channels_last","fuse_qkv.modules":true}'
    run 580 step_fm_sdxl python3 benchmarks/bench_step.py --models sdxl-base \
      --variants "$V" --profile --output-json "$out/step_fm_sdxl.json" ;;
  s27o2dit)  # the same on the DiTs (PixArt's q/k/v concatenated per call by fuse_qkv today)
    V='compile;O2;O2-fm={"mode":"O2","fuse_qkv.modules":true}'
    run 580 step_fm_dit python3 benchmarks/bench_step.py --models pixart-xl-2-1024,sd3-medium \
      --variants "$V" --profile --output-json "$out/step_fm_dit.json" ;;
  s27flux)  # fuse_qkv.modules on by default in O2 since 2026-11-29 (PixArt, SD3, SDXL
    # measured); FLUX's cost rule left its groups apart, cached weights changed nothing.
    # Its first run (8a5543e) compared nothing: O2-nofm reused the module O2 had fused
    # (bench_step rebuilds it since 2d0893f)
    V='compile;O2;O2-nofm={"mode":"O2","fuse_qkv.modules":false}'
    run 590 step_fm_flux python3 benchmarks/bench_step.py --models flux-dev \
      --variants "$V" --profile --output-json "$out/step_fm_flux.json" ;;
  s28tests)  # what the twenty-seventh session changed after its gpu run (fused models
    # moved with .to(), the replacement watch, O3 over fuse_qkv.modules)
    run 400 gpu_tests_s28 python3 -m pytest -m gpu -q -p no:cacheprovider -rs \
      tests/test_fused_projections.py tests/quant tests/diffusers/test_pipe.py ;;
  s29tests)  # the twenty-eighth session's compile_pipe LoRA pass-through under O2's graphs
    run 300 gpu_tests_s29 python3 -m pytest -m gpu -q -p no:cacheprovider -rs \
      tests/diffusers/test_pipe_lora.py tests/diffusers/test_pipe_offload.py tests/test_module_hooks.py ;;
  s29hooks)  # hooks set up on a compiled module that already ran (every gpu test of
    # tests/diffusers, tried after it at 420 s, passed only its first six in that time)
    # (no -p no:logging: the sequential-offload test reads caplog)
    run 300 gpu_tests_hooks_s29 python3 -m pytest -m gpu -q -p no:cacheprovider -rs \
      --tb=short -W ignore::UserWarning tests/test_module_hooks.py \
      tests/diffusers/test_pipe_offload.py ;;
  hopperattn)  # the Gluon Hopper attention: its gpu tests, then against SDPA
    run 200 gpu_tests_attention_hopper python3 -m pytest -m gpu -q -p no:cacheprovider -rs \
      --tb=short tests/test_attention_hopper.py
    run 500 probe_hopperattn python3 benchmarks/probe_ops.py --probes hopperattn \
      --output-json "$out/probe_hopperattn.json" ;;
  hopperstep)  # the Gluon attention in a whole PixArt-XL step (opt-in pass, measured choice)
    V='O2={"mode":"O2"};O2-gluon={"mode":"O2","passes.attention_hopper":true}'
    run 230 step_hopper_pixart python3 benchmarks/bench_step.py --models pixart-xl-2-1024 \
      --variants "$V" --output-json "$out/step_hopper_pixart.json" ;;
  hoppertests)  # both Gluon kernels and the pass, on the GPU
    run 300 gpu_tests_hopper python3 -m pytest -m gpu -q -p no:cacheprovider -rs --tb=short \
      tests/kernels/test_attention_hopper.py tests/kernels/test_attention_hopper_pass.py ;;
  hopperpx)  # whether attention_hopper should be on in max-optimize (O2, O3): PixArt
    V='compile;O2={"mode":"O2"};O2-gluon={"mode":"O2","passes.attention_hopper":true}'
    V+=';O3={"mode":"O3"};O3-gluon={"mode":"O3","passes.attention_hopper":true}'
    run 580 step_hopper_px python3 benchmarks/bench_step.py --models pixart-xl-2-1024 \
      --variants "$V" --output-json "$out/step_hopper_px.json" ;;
  hopperdit)  # ... the models where the measured choice should keep SDPA
    V='O2={"mode":"O2"};O2-gluon={"mode":"O2","passes.attention_hopper":true}'
    run 290 step_hopper_sd3 python3 benchmarks/bench_step.py --models sd3-medium \
      --variants "$V" --output-json "$out/step_hopper_sd3.json"
    V='O2={"mode":"O2","memory_format":"channels_last"}'
    V+=';O2-gluon={"mode":"O2","memory_format":"channels_last","passes.attention_hopper":true}'
    run 290 step_hopper_sdxl python3 benchmarks/bench_step.py --models sdxl-base \
      --variants "$V" --output-json "$out/step_hopper_sdxl.json" ;;
  hopperflux)  # ... and FLUX (head dim 128: the kernel measured 0.98x cuDNN)
    V='O2={"mode":"O2"};O2-gluon={"mode":"O2","passes.attention_hopper":true}'
    run 580 step_hopper_flux python3 benchmarks/bench_step.py --models flux-dev \
      --variants "$V" --output-json "$out/step_hopper_flux.json" ;;
  s25step)  # PixArt-XL-2 compile vs O3 after Fp8Linear.weight_scale became a parameter
    # (the twenty-fifth session's inference-only fix): no step-time change expected
    run 400 step_o3_pixart python3 benchmarks/bench_step.py --models pixart-xl-2-1024 \
      --variants 'compile;O3' --output-json "$out/step_o3_pixart.json" ;;
  onepass)  # 8-bit attention: q quantized in the kernel + one k/v pre-pass, vs the two
    # preparations of today and SDPA (kernel level), then the gpu tests of the attention kernels
    run 240 probe_onepass python3 benchmarks/probe_ops.py --probes onepass \
      --output-json "$out/probe_onepass.json"
    run 200 gpu_tests_attention python3 -m pytest -m gpu -q -p no:cacheprovider -rs \
      tests/kernels/test_attention_int8.py tests/kernels/test_attention_int8_onepass.py ;;
  s23tests)  # the gpu tests of what the twenty-third session changed: O3 with gradients on,
    # rms_norm_rope (kernel, pass, tiny FLUX under plain O2), the attention selection
    run 300 gpu_tests_s23 python3 -m pytest -m gpu -q -p no:cacheprovider -rs \
      tests/quant/test_fp8_gpu.py::test_o3_with_grad_enabled_runs_forward_and_raises_on_backward \
      tests/kernels/test_rope_pass.py \
      tests/kernels/test_rms_norm_rope.py tests/kernels/test_attention_pass.py ;;
  fluxnorm)  # the O3-with-grad gpu test, then FLUX.1-dev O2 vs O2 with its 3072-wide LayerNorm
    # rows persistent (one read; Inductor loops over them at 2048) vs O2 with the q/k/v
    # (+ MLP) concatenations cached (the cost rule refuses them per call)
    run 150 gpu_tests_grad python3 -m pytest -m gpu -q -p no:cacheprovider -rs \
      tests/quant/test_fp8_gpu.py -k grad_enabled
    V='O2;O2-pr4096={"mode":"O2","heuristics.persistent_reduction_max":4096}'
    V+=';O2-cached={"mode":"O2","fuse_qkv.cached_weights":true}'
    run 560 step_norm_flux python3 benchmarks/bench_step.py --models flux-dev \
      --variants "$V" --output-json "$out/step_norm_flux.json" ;;
  fluxgelu)  # FLUX.1-dev O2 (rms_norm_rope on): does cuBLASLt's GELU epilogue pay there? (its
    # GEMMs ran ~18% longer than the plain ones; compile's GELU kernels cost ~5.5 ms a step)
    V='O2;O2-nogelu={"mode":"O2","passes.gelu_epilogue":false}'
    run 590 step_gelu_flux python3 benchmarks/bench_step.py --models flux-dev \
      --variants "$V" --profile --output-json "$out/step_gelu_flux.json" ;;
  ropeflux)  # FLUX.1-dev: the RMSNorm + RoPE kernel in an O2 step (three cold compiles)
    V='compile;O2;O2-rope={"mode":"O2","passes.rms_norm_rope":true}'
    run 590 step_rope_flux python3 benchmarks/bench_step.py --models flux-dev \
      --variants "$V" --profile --output-json "$out/step_rope_flux.json" ;;
  ropeflux3)  # FLUX.1-dev: the same in O3, then with the residual LayerNorm quantizer too
    V='O3;O3-rope={"mode":"O3","passes.rms_norm_rope":true}'
    V+=';O3-rope-lnq={"mode":"O3","passes.rms_norm_rope":true,"passes.fp8_layer_norm_quant_kernel":true}'
    run 590 step_rope_flux3 python3 benchmarks/bench_step.py --models flux-dev \
      --variants "$V" --profile --output-json "$out/step_rope_flux3.json" ;;
  o3flux)  # FLUX.1-dev O3 profiled with today's rules and the SM clock per variant (the last
    # profiled O3 step is from 2026-11-26: 21.2 ms of Triton kernels, ~11 ms of them fp8
    # activation quantization, against O2's 10.2)
    run 590 step_o3_flux python3 benchmarks/bench_step.py --models flux-dev \
      --variants 'compile;O3' --profile --output-json "$out/step_o3_flux.json" ;;
  cachedflux)  # FLUX: the cost rule refuses its groups (2.87 ms of concatenation a step);
    # cached, every group fuses, for ~7 GB more memory, and joint_linear no longer takes v
    # (its fused GEMM also feeds q and k's RMSNorms; tiny FLUX: 1 -> 0 rewrites)
    V='compile;O2;O2-cached={"mode":"O2","fuse_qkv.cached_weights":true}'
    run 590 step_cached_flux python3 benchmarks/bench_step.py --models flux-dev \
      --variants "$V" --profile --output-json "$out/step_cached_flux.json" ;;
  freezepx)
    V='compile;O2;O2-freezing={"mode":"O2:freezing"};O3;O3-freezing={"mode":"O3:freezing"}'
    run 580 step_freeze_pixart python3 benchmarks/bench_step.py --models pixart-xl-2-1024 \
      --variants "$V" --profile --output-json "$out/step_freeze_pixart.json" ;;
  sdxl8)
    run 240 probe_sdxl_fp8 python3 benchmarks/probe_ops.py --probes sdxl8 \
      --output-json "$out/probe_sdxl_fp8.json" ;;
  headpad)
    run 200 probe_head_pad python3 benchmarks/probe_ops.py --probes headpad \
      --output-json "$out/probe_head_pad.json" ;;
  geglu)
    run 300 probe_geglu python3 benchmarks/probe_geglu.py --output-json "$out/probe_geglu.json" ;;
  fluxo2)
    run 280 gpu_tests python3 -m pytest -m gpu tests -q -p no:cacheprovider
    run 290 step_flux_o2 python3 benchmarks/bench_step.py --models flux-dev \
      --variants "compile;O2" --profile --output-json "$out/step_flux_o2.json" ;;
  pool)
    run 120 gpu_tests_pool python3 -m pytest -m gpu tests/test_graph_pool.py -q -p no:cacheprovider
    # One implementation per 10-minute command: POOL_IMPLS="trees" for the comparison.
    for impl in ${POOL_IMPLS:-pooled}; do
      run 500 "t2i_pixart_cg_$impl" python3 benchmarks/text_to_image.py --model pixart-xl-2-1024 \
        --compare difforge --no-text-encoders \
        --compiler-config "{\"mode\": \"O2:cudagraphs\", \"dynamic\": true, \"cudagraphs.impl\": \"$impl\"}" \
        --run_multiple_resolutions --run_rare_resolutions --steps 20 --warmups 1 --runs 2 \
        --output-json "$out/t2i_pixart_cg_$impl.json"
    done ;;
  o2dit)
    run 100 gpu_tests_graphs python3 -m pytest -m gpu tests/test_graph_pool.py tests/test_gpu.py \
      -q -p no:cacheprovider -k "graph or cudagraph or pool"
    run 480 step_o2_dit python3 benchmarks/bench_step.py --models pixart-xl-2-1024,sd3-medium \
      --variants 'compile;O2-nocg={"mode":"max-optimize"};O2' --profile \
      --output-json "$out/step_o2_dit.json" ;;
  o2unet)
    V='compile;O2-nocg={"mode":"max-optimize","memory_format":"channels_last"}'
    V+=';O2={"mode":"O2","memory_format":"channels_last"}'
    run 380 step_o2_unet python3 benchmarks/bench_step.py --models sdxl-base \
      --variants "$V" --profile --output-json "$out/step_o2_unet.json"
    run 200 step_o2_vae python3 benchmarks/bench_step.py --models sdxl-base:vae --batch 1 \
      --variants "$V" --profile --output-json "$out/step_o2_vae.json" ;;
  precompile)
    # cache.precompile: warm start in a new process without Dynamo's re-trace (#5 targets:
    # PixArt <= 10 s, FLUX <= 20 s), against the same cases without it, one run each.
    run 290 compile_pixart_precompile python3 benchmarks/bench_compile.py \
      --models pixart-xl-2-1024 --modes O2 --precompile off,on \
      --output-json "$out/compile_pixart_precompile.json"
    run 290 compile_flux_precompile python3 benchmarks/bench_compile.py --models flux-dev \
      --modes O2 --regional nested --precompile off,on \
      --output-json "$out/compile_flux_precompile.json" ;;
  o3warm)
    run 290 compile_pixart_o3 python3 benchmarks/bench_compile.py --models pixart-xl-2-1024 \
      --modes O3 --output-json "$out/compile_pixart_o3.json" ;;
  fluxwarm)
    # #5's FLUX warm start: precompile with the decorated-forward fix (8b2d425: a loaded entry
    # or a warned miss, never the NameError), and the blocks style (two block frames to
    # re-trace instead of the whole model; pooled CUDA graphs still cover the whole call).
    run 290 compile_flux_precompile_fix python3 benchmarks/bench_compile.py --models flux-dev \
      --modes O2 --regional nested --precompile on --step-runs 5 \
      --output-json "$out/compile_flux_precompile_fix.json"
    run 290 compile_flux_blocks python3 benchmarks/bench_compile.py --models flux-dev \
      --modes O2 --regional blocks --step-runs 5 --output-json "$out/compile_flux_blocks.json" ;;
  fluxpre)
    run 560 compile_flux_precompile python3 benchmarks/bench_compile.py --models flux-dev \
      --modes O2 --regional nested --precompile off,on \
      --output-json "$out/compile_flux_precompile.json" ;;
  dynvae)
    # Where a dynamic graph loses to a specialised one: the SDXL VAE decode at 1024x1024, O2
    # static vs O2 + dynamic, with the kernel breakdown (the UNet's dynamic compile outlasts
    # one command next to its static one), then the graph-pool GPU tests.
    S='"mode":"O2","memory_format":"channels_last"'
    V="O2={$S};O2-dynamic={$S,\"dynamic\":true}"
    run 320 step_dyn_vae python3 benchmarks/bench_step.py --models sdxl-base:vae --batch 1 \
      --variants "$V" --profile --output-json "$out/step_dyn_vae.json"
    run 150 gpu_tests_pool python3 -m pytest -m gpu tests/test_graph_pool.py tests/test_gpu.py \
      -q -p no:cacheprovider -k "pool or graph or trees" ;;
  dynunet)
    # Why the dynamic SDXL pipeline is 1.12x a specialised one at 960x720 (1.07x at 1024²).
    export TORCHINDUCTOR_CACHE_DIR="$PWD/.gpu-cache/inductor" DIFFORGE_CACHE_DIR="$PWD/.gpu-cache/difforge"
    S='"mode":"O2","memory_format":"channels_last"'
    V="O2={$S};O2-dynamic={$S,\"dynamic\":true}"
    A=(--height 960 --width 720 --first-size 1024x1024 --variants "$V" --profile)
    run 200 step_dyn960_vae python3 benchmarks/bench_step.py --models sdxl-base:vae --batch 1 \
      "${A[@]}" --output-json "$out/step_dyn960_vae.json"
    run 380 step_dyn960_unet python3 benchmarks/bench_step.py --models sdxl-base "${A[@]}" \
      --output-json "$out/step_dyn960_unet.json" ;;
  dynkern)
    for b in mid_block down_blocks.1 down_blocks.2 up_blocks.0; do
      run 150 "diag_kernels_unet_$b" python3 benchmarks/diag_dynamic_kernels.py --block "$b"
    done
    run 120 diag_kernels_vae python3 benchmarks/diag_dynamic_kernels.py --component vae \
      --block vae.decoder.up_blocks.1 ;;
  fluxkern)
    # FLUX.1-dev's blocks at 1024x1024 (batch 1), static and dynamic, their kernels profiled and
    # their code written out: why the single blocks' RMSNorm + RoPE kernel takes 3x its bytes.
    for b in single_transformer_blocks.0 transformer_blocks.0; do
      run 150 "diag_kernels_flux_$b" python3 benchmarks/diag_dynamic_kernels.py --model flux-dev \
        --block "$b" --batch 1 --height 1024 --width 1024 --first-size 1024x1024 \
        --options '{"mode":"O2"}'
    done
    run 330 gpu_tests_diffusers python3 -m pytest -m gpu tests/diffusers -q -p no:cacheprovider \
      --durations=15 ;;
  splitflux)
    # split_cat_linear on FLUX.1-dev's single blocks: O2 with and without it, profiled.
    run 570 step_split_flux python3 benchmarks/bench_step.py --models flux-dev \
      --variants 'compile;O2-nosplit={"mode":"O2","passes.split_cat_linear":false};O2' \
      --profile --output-json "$out/step_split_flux.json" ;;
  o2flux)
    run 570 step_o2_flux python3 benchmarks/bench_step.py --models flux-dev \
      --variants 'compile;O2-nocg={"mode":"max-optimize"};O2' --profile \
      --output-json "$out/step_o2_flux.json" ;;
  quality)
    run 570 quality_pixart python3 benchmarks/quality_report.py --models pixart-xl-2-1024 \
      --no-progress --output-json "$out/quality_pixart.json" ;;
  qualitysd3)  # the weights as built: all modes took 9 min on an H100 (the outlier set did not fit)
    run 580 quality_sd3 python3 benchmarks/quality_report.py --models sd3-medium --runs 1 \
      --weights built --no-progress --output-json "$out/quality_sd3.json" ;;
  qualitysd3o)  # the planted-outlier set alone
    run 580 quality_sd3_outliers python3 benchmarks/quality_report.py --models sd3-medium \
      --modes eager,compile,O3,fp8,fp32 --runs 1 --weights outliers --no-progress \
      --output-json "$out/quality_sd3_outliers.json" ;;
  qualityflux)  # one weight set and one compiled mode per command: FLUX's eager, compile,
    # O3 and fp8 on one set outlasted 10 minutes (H100, 2026-11-27: stopped at 580 s); the VAE
    # stays eager from 2026-11-27's fifteenth session on (its compile is no part of the modes'
    # quality; the first O3 run, 581e872, compiled it too: 498 s in all)
    run 580 quality_flux python3 benchmarks/quality_report.py --models flux-dev \
      --modes eager,O3,fp8 --runs 1 --weights built --eager-components vae --no-progress \
      --output-json "$out/quality_flux.json" ;;
  qualityfluxc)  # stock torch.compile on the weights as built
    run 580 quality_flux_compile python3 benchmarks/quality_report.py --models flux-dev \
      --modes eager,compile --runs 1 --weights built --eager-components vae --no-progress \
      --output-json "$out/quality_flux_compile.json" ;;
  qualityfluxo)  # the planted-outlier set
    run 580 quality_flux_outliers python3 benchmarks/quality_report.py --models flux-dev \
      --modes eager,O3,fp8 --runs 1 --weights outliers --eager-components vae --no-progress \
      --output-json "$out/quality_flux_outliers.json" ;;
  qualitypx32)  # PixArt-XL's float32 yardstick alone (the other modes: `quality`)
    run 400 quality_pixart_fp32 python3 benchmarks/quality_report.py --models pixart-xl-2-1024 \
      --modes eager,fp32 --runs 1 --weights both --no-progress \
      --output-json "$out/quality_pixart_fp32.json" ;;
  qualitysdxl)  # SDXL base, weights as built; the VAE stays eager (its compile is no part of
    # the modes' quality, and three cold UNet compiles already take ~6 min on an H100)
    run 580 quality_sdxl python3 benchmarks/quality_report.py --models sdxl-base \
      --modes eager,compile,O3,fp8,fp32 --runs 1 --weights built --eager-components vae \
      --no-progress --output-json "$out/quality_sdxl.json" ;;
  qualitysdxlo)  # SDXL base, planted outliers
    run 580 quality_sdxl_outliers python3 benchmarks/quality_report.py --models sdxl-base \
      --modes eager,O3,fp8,fp32 --runs 1 --weights outliers --eager-components vae \
      --no-progress --output-json "$out/quality_sdxl_outliers.json" ;;
  qualityflux32)  # the float32 yardstick (eager is the same deterministic reference)
    run 580 quality_flux_fp32 python3 benchmarks/quality_report.py --models flux-dev \
      --modes eager,fp32 --runs 1 --weights built --no-progress \
      --output-json "$out/quality_flux_fp32.json" ;;
  *)
    echo "unknown part $part" >&2
    exit 2 ;;
esac
