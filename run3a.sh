python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD/src
(nvidia-smi dmon -s pc -d 2 > $OUT/dmon.txt 2>&1 &)
timeout 230 python3 benchmarks/bench_step.py --models pixart-xl-2-1024 --variants "eager;compile;O2;O3" --profile --output-json $OUT/step_pixart.json > $OUT/step_pixart.txt 2>&1; tail -c 900 $OUT/step_pixart.txt
V='eager;compile;O2;O2-nopr={"mode":"O2","heuristics.persistent_reduction_max":null};O3'
timeout 340 python3 benchmarks/bench_step.py --models sd3-medium --variants "$V" --profile --output-json $OUT/step_sd3.json > $OUT/step_sd3.txt 2>&1; tail -c 1000 $OUT/step_sd3.txt
