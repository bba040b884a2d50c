python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD/src
(nvidia-smi dmon -s pc -d 2 > $OUT/dmon.txt 2>&1 &)
V='eager;compile;O2={"mode":"O2","memory_format":"channels_last"};O3={"mode":"O3","memory_format":"channels_last"}'
timeout 560 python3 benchmarks/bench_step.py --models sdxl-base --variants "$V" --profile --output-json $OUT/step_sdxl.json > $OUT/step_sdxl.txt 2>&1; tail -c 1200 $OUT/step_sdxl.txt
