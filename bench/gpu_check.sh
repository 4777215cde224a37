#!/usr/bin/env bash
# The GPU check: one script, at most 8 minutes on one H100 / H200. Prints a table of what ran and the numbers that
# matter, and writes it (gpu_check.md) with each piece's full log to $OUT when OUT is set (else a temporary folder).
#
#     bash bench/gpu_check.sh               # on a CUDA machine (PYTHON=... picks the interpreter; default python3)
#     bash bench/gpu_check.sh --cpu-smoke   # every piece on CPU, tiny: checks this script's plumbing, no GPU numbers
#
# Pieces, each under its own time limit (they add up to 8 minutes); one that fails does not stop the others:
#   1. pytest tests/test_logprobs.py       the fused log-prob op's tests: the compiled Triton kernel on CUDA tensors
#   2. python bench/gpu_check.py            a random 0.58B LLaVA under bf16 autocast: the sampler's vs the
#                                           trainer's log-probs, then a few GRPO steps with a tokens/s line
#   3. python bench/logprobs.py --skip-cpu  its GPU tables at N = 16384, d = 2048, V = 32000 and 151936, bf16.
#                                           Targets: <= 1.0x eager time, <= 2 % of eager's memory, >= 450 TFLOP/s
#                                           effective at V = 151,936
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SMOKE=0
if [ "${1:-}" = "--cpu-smoke" ]; then SMOKE=1; elif [ -n "${1:-}" ]; then echo "usage: $0 [--cpu-smoke]" >&2; exit 2; fi
LOGS=${OUT:-$(mktemp -d)}
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ $SMOKE = 1 ]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""  # the Triton interpreter, and no GPU even if there is one
  TESTS=(-k "hand_computed or torch_chunked or empty_batch")  # a few of the interpreter tests: minutes otherwise
  MODEL=(--tiny)
else
  unset TRITON_INTERPRET  # compiled kernels
  TESTS=()
  MODEL=()
fi

ROWS=""
FAILED=""
piece() {  # piece NAME SECONDS ARGS...: "$PY" ARGS under a time limit, logged to $LOGS/NAME.log; adds a table row
  local name=$1 limit=$2 start rc status
  shift 2
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$PY" "$@" > "$LOGS/$name.log" 2>&1
  rc=$?
  if [ $rc = 0 ]; then status="ok"; elif [ $rc = 124 ] || [ $rc = 137 ]; then status="TIMED OUT (${limit} s)";
  else status="FAILED (exit $rc)"; fi
  [ $rc = 0 ] || FAILED+=" $name"
  local shown="python" arg
  for arg in "$@"; do [[ $arg == *" "* ]] && shown+=" \"$arg\"" || shown+=" $arg"; done
  ROWS+="| \`$shown\` | $status | $(( $(date +%s) - start )) |"$'\n'
  echo "[$(date +%T)] $name: $status" >&2
}

echo "[$(date +%T)] GPU check, logs in $LOGS" >&2
# the longest piece last: if it runs out of time, what it printed so far (its tables come before its tile sweep) stays
piece pytest_logprobs 120 -m pytest -q -p no:cacheprovider tests/test_logprobs.py ${TESTS[@]+"${TESTS[@]}"}
piece gpu_check 120 bench/gpu_check.py ${MODEL[@]+"${MODEL[@]}"}
piece bench_logprobs 240 bench/logprobs.py --skip-cpu

{
  echo "## GPU check ($(date -u +%F), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown))"
  echo
  if command -v nvidia-smi > /dev/null && [ $SMOKE = 0 ]; then
    echo "Device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)"
  else
    echo "Device: CPU (--cpu-smoke: the plumbing only, no GPU numbers)"
  fi
  echo "$("$PY" -c 'import torch, triton; print(f"torch {torch.__version__}, triton {triton.__version__}")' 2>&1)"
  echo
  echo "| piece | status | seconds |"
  echo "|---|---|---|"
  printf "%s" "$ROWS"
  echo
  echo "pytest: $(tail -n 1 "$LOGS/pytest_logprobs.log")"
  echo
  echo "bench/gpu_check.py:"
  { grep -E '^(# |RESULT|\|)' "$LOGS/gpu_check.log" || echo "(no results)"; } | sed 's/^RESULT /- /'
  echo
  echo "bench/logprobs.py (targets: ours <= 1.0x eager time, <= 2 % of its memory, >= 450 TFLOP/s at V = 151936):"
  grep -E '^(GPU:|N=|bf16 accuracy|tile sweep|\||no CUDA|liger)' "$LOGS/bench_logprobs.log" || echo "(no table)"
  for name in $FAILED; do  # what went wrong, where a piece did not end well
    echo
    echo "$name.log, last lines:"
    tail -n 25 "$LOGS/$name.log"
  done
} | tee "$LOGS/gpu_check.md"
[ -z "$FAILED" ]
