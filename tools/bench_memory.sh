#!/usr/bin/env bash
# The GPU memory-budget measurements of docs/benchmarks.md section 5, on one GPU (H200/H100).
#
#   tools/bench_memory.sh OUT_DIR PART
#
# PART 1: GPU tests of block streaming, then the 480p lightx2v chunk (4 steps, 2 passes, fp8)
#         unconstrained and at 24, 16, 12 and 8 GiB;
# PART 2: the same chunk at 48 and 32 GiB, bf16 unconstrained and at 40 GiB, 720p fp8 at 24 GiB.
# PART 4: 720p fp8 at 24 GiB (2 chunks), bf16 unconstrained and at 40 GiB (2 chunks each);
# PART 5: the 480p fp8 chunk at 48 and 32 GiB, then the daemon end to end (tests/gpu/test_daemon_memory.py).
# Each bench writes OUT_DIR/h200-memory-*.json after every section and its log beside it.
set -uo pipefail
out=${1:?usage: tools/bench_memory.sh OUT_DIR PART}
part=${2:?usage: tools/bench_memory.sh OUT_DIR PART}
cd "$(dirname "$0")/.."
# expandable segments: far less fragmentation under a tight budget (the daemon's worker sets it too)
export PYTHONPATH=".:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
common=(--size none --load-probe-blocks 0 --no-profile --no-baseline --passes 2)
bench() {  # NAME SECONDS ARGS...
  local name=$1 secs=$2
  shift 2
  timeout "$secs" python3 -m daemon bench "${common[@]}" "$@" --json "$out/h200-memory-$name.json" \
    2>&1 | tee "$out/h200-memory-$name.log" | grep -E '^\[bench\] (plan|[0-9.]+ GiB|chunk 2|.*FAILED)|^chunk|^    plan|ERROR'
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch; print(torch.__version__, torch.cuda.get_device_capability())'
case $part in
  1)  # GPU tests, then the 480p fp8 chunk unconstrained and under budgets
    timeout 120 python3 -m pytest --gpu tests/gpu/test_block_swap_gpu.py -x -q -s -p no:cacheprovider \
      2>&1 | tee "$out/h200-memory-pytest-gpu.log" | tail -5
    bench 480-fp8-a 440 --chunk-size 480 --dtype fp8 --gpu-memory-gib 24,16,12,8
    ;;
  2)  # budgets only (the unconstrained figures come from part 1), 720p at 24 GiB, bf16 at 40 GiB
    bench 480-fp8-b 300 --chunk-size 480 --dtype fp8 --gpu-memory-gib 24,16,12,8,32 --no-unconstrained
    bench 720-fp8 140 --chunk-size 720 --dtype fp8 --gpu-memory-gib 24 --no-unconstrained --chunks 1
    bench 480-bf16 130 --chunk-size 480 --dtype bf16 --gpu-memory-gib 40 --chunks 1
    ;;
  4)  # the runs part 2 could not finish in its time
    bench 720-fp8-d 290 --chunk-size 720 --dtype fp8 --gpu-memory-gib 24 --no-unconstrained
    bench 480-bf16-d 270 --chunk-size 480 --dtype bf16 --gpu-memory-gib 40
    ;;
  5)  # the large budgets on a fresh process each, then the daemon with 3 jobs
    bench 480-fp8-e 170 --chunk-size 480 --dtype fp8 --gpu-memory-gib 48,32 --no-unconstrained
    timeout 400 python3 -m pytest --gpu tests/gpu/test_daemon_memory.py -x -q -s -p no:cacheprovider \
      2>&1 | tee "$out/h200-memory-daemon.log" | tail -25
    ;;
  3)  # the small budgets again, with expandable segments
    bench 480-fp8-c 270 --chunk-size 480 --dtype fp8 --gpu-memory-gib 12,8 --no-unconstrained
    ;;
esac
