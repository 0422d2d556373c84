#!/usr/bin/env bash
# Detector overhead on a GPU (issue 19): paper and default detectors, ResNet-20 and WideResNet-28-10, eager and
# CUDA graphs (each run prints both), then the scoring head alone (benchmarks/head_bench.py), into
# "$OUT/overhead_gpu.txt". About 2 minutes on one H200; the runs are capped (BUDGET, 160 s, plus 10 s for the
# head) so the whole script stays under 3 minutes. Needs torch (CUDA), numpy, scipy, scikit-learn,
# safetensors, pydantic and the repository on PYTHONPATH (or installed); fetches nothing.
#
#   OUT=/some/dir bash benchmarks/gpu_overhead.sh
#   DEVICE=cpu QUICK=1 BUDGET=600 OUT=/tmp/o bash benchmarks/gpu_overhead.sh     # smoke test without a GPU
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the output folder}
DEVICE=${DEVICE:-cuda}
BUDGET=${BUDGET:-160}  # seconds for all runs together
mkdir -p "$OUT"
report="$OUT/overhead_gpu.txt"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296
extra=(--cuda-graphs)
if [ -n "${QUICK:-}" ]; then extra+=(--quick); fi
start=$SECONDS
{
    echo "# benchmarks/gpu_overhead.sh on $(hostname), $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
    nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,utilization.gpu,memory.used --format=csv 2>/dev/null || true
} >"$report" 2>&1
status=0
for model in resnet20 wrn; do
    for detector in paper default; do
        left=$((BUDGET - (SECONDS - start)))
        if [ "$left" -lt 15 ]; then
            echo "## SKIPPED $model $detector: the ${BUDGET}-second budget is spent" >>"$report"
            status=1
            continue
        fi
        cmd=(python benchmarks/overhead_bench.py --device "$DEVICE" --model "$model" --detector "$detector" "${extra[@]}")
        echo -e "\n## ${cmd[*]}   (timeout ${left}s)" >>"$report"
        t0=$SECONDS
        timeout "$left" "${cmd[@]}" >>"$report" 2>&1
        rc=$?
        echo "## exit $rc after $((SECONDS - t0)) s" >>"$report"
        [ "$rc" -eq 0 ] || status=1
    done
done
# the scoring head alone, unfused vs stacked (no model; a few seconds): default head, then the paper's
for head in "--widths 16 32 64 --preprocess l2" "--widths 64 --preprocess none"; do
    left=$((BUDGET + 10 - (SECONDS - start)))
    if [ "$left" -lt 5 ]; then echo "## SKIPPED head_bench $head" >>"$report"; continue; fi
    quick_head=()
    if [ -n "${QUICK:-}" ]; then quick_head=(--components 10 --repeats 3); fi
    echo -e "\n## python benchmarks/head_bench.py --device $DEVICE $head ${quick_head[*]}   (timeout ${left}s)" >>"$report"
    # shellcheck disable=SC2086
    timeout "$left" python benchmarks/head_bench.py --device "$DEVICE" $head "${quick_head[@]}" >>"$report" 2>&1
    rc=$?
    echo "## exit $rc" >>"$report"
    [ "$rc" -eq 0 ] || status=1
done
echo -e "\n## total $((SECONDS - start)) s" >>"$report"
cat "$report"
exit $status
