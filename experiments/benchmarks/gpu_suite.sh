#!/usr/bin/env bash
# The prepared accelerator run (issue: scale out and benchmarks): correctness
# first, then timings, every number into JSON files under $RESULTS.
#
#   bash experiments/benchmarks/gpu_suite.sh RESULTS_DIR
#
# Expects python3 with jax (CUDA), flax, optax, torch and dp-accounting; runs
# from the repository root without installing the package (PYTHONPATH=.).
# Each step is independent: one that fails is reported and the next still runs,
# so one broken benchmark cannot cost the whole (short) lease.
# QUICK=1 shrinks every size, to rehearse the script on a CPU; ONLY=PATTERN
# runs only the steps whose name matches the bash pattern (e.g.
# ONLY='runner_vs_floor*').
# BUDGET (seconds, default 540: one device call is at most 600) bounds the
# whole run: a step whose limit would end past it is skipped and recorded as
# skipped, so the call ends before its timeout with every finished step's
# numbers kept; rerun the skipped ones with ONLY in a second call. The limits
# add up to 840 s, the steps' usual times to less.
set -u
RESULTS=${1:?usage: gpu_suite.sh RESULTS_DIR}
mkdir -p "$RESULTS"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false
PY=${PYTHON:-python3}
BUDGET=${BUDGET:-540}

if [[ "${QUICK:-0}" == 1 ]]; then
  COHORTS=4,8; F32_COHORTS=4; CHUNKS=4; LOOP_MAX=4; VMAP_MAX=8; TORCH_COHORTS=4; REPEATS=2
  # A 2-core CPU compiles far slower than the device's host: three times the limits.
  SWEEP_ROUNDS=2; SCALE=3
  # The runner against its hand-written floor, shrunk to run on a CPU in about a minute.
  FLOOR_ARGS=(--cohorts 2,4 --chunk 2 --emnist-rounds 2 --emnist-steps 2 --emnist-batch 4
              --emnist-image 12 --repeats 1)
  TESTS=(tests/privacy/test_aggregation.py)
else
  COHORTS=16,64,256,1024,4096; F32_COHORTS=64,1024,4096; CHUNKS=64; LOOP_MAX=64; VMAP_MAX=256
  TORCH_COHORTS=64; REPEATS=5; SWEEP_ROUNDS=20; SCALE=1
  FLOOR_ARGS=(--cohorts 16,64,256,1024,4096 --chunk 64 --emnist-rounds 3 --repeats 3)
  TESTS=(tests/simulation/test_round.py)
fi

step() {  # step NAME SECONDS COMMAND...: runs, times and logs one step; never stops the suite.
  local name=$1 limit=$2; shift 2
  # shellcheck disable=SC2053  # ONLY is a pattern on purpose.
  if [[ -n "${ONLY:-}" && "$name" != $ONLY ]]; then return; fi
  if (( SECONDS + limit * SCALE > BUDGET * SCALE )); then
    echo "=== $name: skipped, its limit of $((limit * SCALE)) s would pass BUDGET ($((BUDGET * SCALE)) s; $SECONDS s used)"
    echo "{\"step\": \"$name\", \"skipped\": true, \"seconds_used\": $SECONDS}" >> "$RESULTS/steps.jsonl"
    return
  fi
  local tic=$SECONDS
  echo "=== $name (limit ${limit}s): $*"
  timeout --signal=INT --kill-after=10 "$((limit * SCALE))" "$@" > "$RESULTS/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$RESULTS/$name.log"
  echo "=== $name: exit $rc after $((SECONDS - tic)) s"
  echo "{\"step\": \"$name\", \"exit\": $rc, \"seconds\": $((SECONDS - tic))}" >> "$RESULTS/steps.jsonl"
}

# Correctness first (backends agree, noise statistics), then timings in the
# order of what matters most, each under a limit so the whole fits one call.
step environment 30 $PY -c "import jax, torch; print(jax.__version__, jax.devices()); \
print(torch.__version__, torch.cuda.is_available())"
step tests 60 $PY -m pytest -q -x -p no:cacheprovider "${TESTS[@]}"
step cnn_bfloat16 170 $PY experiments/benchmarks/round_throughput.py --workload cnn \
  --cohorts "$COHORTS" --chunk-sizes "$CHUNKS" --loop-max-clients "$LOOP_MAX" \
  --vmap-max-clients "$VMAP_MAX" --repeats "$REPEATS" --time-budget 5 --scan-rounds 5 \
  --dtype bfloat16 --json "$RESULTS/cnn_bfloat16.json"
# The runner's program against a hand-written JAX floor of the same EMNIST-CNN
# DP-FedAvg round (runner_vs_floor.py): rounds/s of each, their ratio, and
# compile times, at every cohort size, in bfloat16 and float32.
for dtype in bfloat16 float32; do
  step "runner_vs_floor_$dtype" 150 $PY experiments/benchmarks/runner_vs_floor.py \
    --workloads emnist --dtype "$dtype" "${FLOOR_ARGS[@]}" --json "$RESULTS/runner_vs_floor_$dtype.json"
done
for dtype in bfloat16 float32; do
  step "torch_loop_$dtype" 35 $PY experiments/benchmarks/torch_client_loop.py \
    --cohorts "$TORCH_COHORTS" --repeats 3 --dtype "$dtype" --json "$RESULTS/torch_loop_$dtype.json"
done
if [[ -f experiments/benchmarks/he_aggregation.py ]]; then
  step he_aggregation 50 $PY experiments/benchmarks/he_aggregation.py --no-peers \
    --json "$RESULTS/he_aggregation.json"
fi
step sweep 70 $PY experiments/benchmarks/sweep.py --rounds "$SWEEP_ROUNDS" \
  --json "$RESULTS/sweep.json"
step cnn_float32 90 $PY experiments/benchmarks/round_throughput.py --workload cnn \
  --cohorts "$F32_COHORTS" --chunk-sizes "$CHUNKS" --loop-max-clients "$LOOP_MAX" \
  --vmap-max-clients "$VMAP_MAX" --repeats 3 --time-budget 3 --scan-rounds 3 \
  --dtype float32 --json "$RESULTS/cnn_float32.json"
