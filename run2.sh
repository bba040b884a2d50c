python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD/src
(nvidia-smi dmon -s pc -d 2 > $OUT/dmon.txt 2>&1 &)
timeout 120 python3 -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider -k "gelu or persistent" > $OUT/gpu_tests.txt 2>&1; tail -3 $OUT/gpu_tests.txt
timeout 100 python3 benchmarks/probe_ops.py --probes attncode --output-json $OUT/attncode.json > $OUT/attncode.txt 2>&1; tail -c 3000 $OUT/attncode.txt
V='eager;compile;O2;O2-pr={"mode":"O2","heuristics.persistent_reduction_max":4096};O2-pr-cg={"mode":"O2:cudagraphs","heuristics.persistent_reduction_max":4096}'
timeout 330 python3 benchmarks/bench_step.py --models pixart-xl-2-1024 --variants "$V" --profile --output-json $OUT/step_pixart.json > $OUT/step_pixart.txt 2>&1; tail -c 1800 $OUT/step_pixart.txt
