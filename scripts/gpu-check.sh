#!/usr/bin/env bash
# Every GPU check and timing of racebench in one run of under 8 minutes (333 s on an H200), on a machine where
# nothing can be installed (torch and triton present): the device's ceilings, the kernels' launch options timed
# and the fastest kept (benchmarks/tune_kernels.py), the paper-protocol sweep
# (B=1, H=4, D=128, bf16, non-causal, fwd+bwd) of race, race-torch, race-paper, flash, linear and performer from
# 2^12 to each method's threshold (race's OOM threshold, under the device's whole memory, refined to 5%), a
# causal sweep of race against flash for their crossover, a decode sweep (prefill, then 64 tokens one at a time), then plots, reports and the GPU targets of docs/gpu-results.md, and
# last the native GPU tests (the engine's CUDA paths, the methods, the kernels), all under $OUT.
#
#   OUT=/tmp/gpu scripts/gpu-check.sh        # or: make gpu-check (OUT defaults to results/gpu-check)
# Through the device tool, which hands back a limited number of files: write elsewhere and have the script pack
# it after every stage (PACK), so that whatever stops the run, what was measured comes back,
#   D=$OUT; OUT=/tmp/gc PACK=$D/gpu-check.tgz bash scripts/gpu-check.sh
#
# Each stage runs under its own time limit (seconds below, from the H200 runs' durations) so one slow stage
# cannot starve the rest; a sweep stopped by its limit still leaves a valid run (racebench finishes its table on
# SIGTERM). STAGES="sweep-race sweep-others tests" runs only the stages named (a rerun of what a cut-off run owes);
# without the tune stage the sweeps take the launch options RACEBENCH_KERNEL_CONFIG names, if any (e.g. the file
# results/h200-gpu-check-2/kernel-config.json).
# A dry run of the plumbing on a CPU (the kernels on Triton's interpreter):
#   DEVICE=cpu MAX_LEN=2^14 OTHERS_MAX_LEN=2^14 CAUSAL_MAX_LEN=2^12 DECODE_MAX_LEN=2^14 OUT=/tmp/dry scripts/gpu-check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu-check}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
MAX_LEN=${MAX_LEN:-2^26}  # past the floor-limited length of a 141 GB H200 (2^24.3), so race meets its OOM
CAUSAL_MAX_LEN=${CAUSAL_MAX_LEN:-2^20}
OTHERS_MAX_LEN=${OTHERS_MAX_LEN:-2^22}
DECODE_MAX_LEN=${DECODE_MAX_LEN:-2^20}
[ "$DEVICE" = cuda ] || export TRITON_INTERPRET=1
# Compiled kernels shared by every stage and every point's process, in a directory sure to be writable.
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/racebench-triton-cache}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# Packages the machine lacks, shipped as a folder (pip install --no-deps --target .gpu-deps fla-core einops).
[ -d .gpu-deps ] && export PYTHONPATH=$PWD/.gpu-deps:$PYTHONPATH
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
START=$SECONDS

DEADLINE=${DEADLINE:-470}  # seconds for the whole script: no stage runs past it (the issue asks for 8 minutes)
stage() {  # stage NAME LIMIT_S COMMAND...: the command's output goes to $OUT/NAME.log
    local name=$1 limit=$2 t0=$SECONDS rc left=$((DEADLINE - (SECONDS - START)))
    shift 2
    if [ -n "${STAGES:-}" ] && [[ " $STAGES " != *" $name "* ]]; then return; fi
    if [ "$left" -lt 5 ]; then echo "== $name skipped: the ${DEADLINE} s deadline is reached"; return; fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (limit ${limit} s, $((SECONDS - START)) s in)"
    timeout --kill-after=20 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    echo "   exit $rc after $((SECONDS - t0)) s"
    tail -n 4 "$OUT/$name.log" | sed 's/^/   /'
    pack
}
named() {  # named NAME: whether STAGES names it (the stages that run only when asked for)
    [[ " ${STAGES:-} " == *" $1 "* ]]
}
pack() {  # everything so far into $PACK, replaced whole (a run cut off by its caller keeps the last stage's)
    [ -n "${PACK:-}" ] || return 0
    tar czf "$PACK.part" -C "$(dirname "$OUT")" "$(basename "$OUT")" && mv "$PACK.part" "$PACK"
}

SWEEP=("$PY" -m racebench sweep --device "$DEVICE" --dtype bf16 -B 1 -H 4 -D 128 --warmup 1 --repeats 3)
NONCAUSAL=(--min-len 2^12 --growth 4)

nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || rm -f "$OUT/nvidia-smi.txt"
"$PY" -m racebench env >"$OUT/env.txt" 2>&1
stage ceilings 30 "$PY" benchmarks/ceilings.py --device "$DEVICE" --json "$OUT/ceilings.json"
# Native compiles dominate the tests: spread them over workers where pytest-xdist is there.
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 12)
# The kernels against the PyTorch core, every variant the sweeps launch compiled, and the 64-bit strides of the
# longest points checked on periodic inputs (a 2^24-token head: 30 GB; the interpreter takes a short one).
LARGE_T=2^24
[ "$DEVICE" = cuda ] || LARGE_T=8192
stage smoke 60 "$PY" benchmarks/gpu_smoke.py --device "$DEVICE" --T 4096 --large-T "$LARGE_T"
# Launch options timed per kernel; the sweeps below run with the fastest that match the defaults' results
# (run.json records them). TUNE=0 skips this and keeps the defaults.
if [ "${TUNE:-1}" = 1 ]; then
    TUNE_ARGS=(--T 2^20 --causal-T 2^18)
    [ "$DEVICE" = cuda ] || TUNE_ARGS=(--T 200 --causal-T 130 --repeats 1)
    stage tune 50 "$PY" benchmarks/tune_kernels.py --device "$DEVICE" "${TUNE_ARGS[@]}" --json "$OUT/tune.json" \
        --write-config "$OUT/kernel-config.json"
    [ -s "$OUT/kernel-config.json" ] && export RACEBENCH_KERNEL_CONFIG=$OUT/kernel-config.json
fi
# The OOM threshold against the device's memory (the issue's floor-limited length), not the default 90% budget.
stage sweep-race 90 "${SWEEP[@]}" --methods race "${NONCAUSAL[@]}" --max-len "$MAX_LEN" --time-budget 30s \
    --memory-budget 100% --refine 0.05 --out "$OUT/paper-gpu-race"
stage sweep-others 130 "${SWEEP[@]}" --methods race-torch,race-paper,flash,linear,performer "${NONCAUSAL[@]}" \
    --max-len "$OTHERS_MAX_LEN" --time-budget 10s --out "$OUT/paper-gpu-others"
stage sweep-causal 60 "${SWEEP[@]}" --causal --methods race,flash --min-len 2^10 --max-len "$CAUSAL_MAX_LEN" \
    --growth 4 --time-budget 15s --out "$OUT/causal-gpu"
# Inference: prefill T tokens, then 64 decoded one at a time (race's fixed state against softmax's growing cache).
stage sweep-decode 45 "${SWEEP[@]}" --mode decode --methods race,flash,linear --min-len 2^12 \
    --max-len "$DECODE_MAX_LEN" --growth 4 --time-budget 10s --out "$OUT/decode-gpu"
# race's step after the shortest and the longest prompt, side by side: whether it is flat in the context.
stage decode-flat 25 "$PY" benchmarks/decode_flat.py --device "$DEVICE" --dtype bf16 --lengths "2^12,$DECODE_MAX_LEN" \
    --tokens 500
stage plots 20 "$PY" -m racebench plot "$OUT/paper-gpu-race" "$OUT/paper-gpu-others" --out "$OUT/plots/paper-gpu"
stage plots-causal 10 "$PY" -m racebench plot "$OUT/causal-gpu" --out "$OUT/plots/causal-gpu"
stage plots-decode 10 "$PY" -m racebench plot "$OUT/decode-gpu" --out "$OUT/plots/decode-gpu"
for run in paper-gpu-race paper-gpu-others causal-gpu decode-gpu; do
    stage "report-$run" 10 "$PY" -m racebench report "$OUT/$run" --markdown "$OUT/report-$run.md"
done
stage targets 10 "$PY" benchmarks/gpu_targets.py "$OUT/paper-gpu-race" "$OUT/paper-gpu-others" \
    --ceilings "$OUT/ceilings.json" --at 2^22
# The CI regression gate's baseline for this GPU model (the ci-gpu preset: each point in 5 processes): minutes of its
# own, so only when named, STAGES=baseline; commit $OUT/baseline as results/baselines/<model> (`racebench baseline
# --where` on that machine names it).
if named baseline; then
    stage baseline 300 "$PY" -m racebench baseline --device "$DEVICE" --out "$OUT/baseline"
fi
# race against every softmax kernel that runs here and fla's linear attention, its OOM threshold when causal, the
# CUDA-graph protocol and a profile of race's pass at 2^12 (docs/gpu-results.md, "Peers and fixed cost"); minutes
# of their own, so only when named:
# (about 500 s of stage limits with the tuned launch options of an earlier run instead of the tune stage):
#   RACEBENCH_KERNEL_CONFIG=results/h200-gpu-check-2/kernel-config.json DEADLINE=510 STAGES="ceilings smoke peers \
#   peers-causal race-causal-oom graphs profile peers-check peer-targets tests-engine" scripts/gpu-check.sh
SOFTMAX_PEERS=flash,sdpa-cudnn,sdpa-efficient,flash3  # those not installed are recorded unsupported, with the reason
# A sweep runs method after method, so a stage cut off by its limit loses the last methods: race and flash first.
if named peers; then
    stage peers 70 "${SWEEP[@]}" --methods "race,$SOFTMAX_PEERS" --min-len 2^12 --max-len 2^22 --growth 4 \
        --time-budget 10s --out "$OUT/peers"
fi
if named peers-causal; then  # fine steps where the crossover is sought, then race to 2^20 (softmax is skipped there)
    STAGES="$STAGES plots-peers report-peers-causal peers-linear"
    stage peers-causal 100 "${SWEEP[@]}" --causal --methods "race,$SOFTMAX_PEERS" \
        --lengths 2^10,2^11,2^12,2^13,2^14,2^16,2^18,2^20 --time-budget 10s --out "$OUT/peers-causal"
    stage plots-peers 15 "$PY" -m racebench plot "$OUT/peers-causal" --out "$OUT/plots/peers-causal"
    stage report-peers-causal 10 "$PY" -m racebench report "$OUT/peers-causal" --markdown "$OUT/report-peers-causal.md"
    stage peers-linear 40 "${SWEEP[@]}" --causal --methods linear-fla,linear --min-len 2^12 --max-len 2^20 --growth 4 \
        --time-budget 10s --out "$OUT/peers-linear"
fi
if named race-causal-oom; then
    stage race-causal-oom 45 "${SWEEP[@]}" --causal --methods race --min-len 2^22 --growth 4 --max-len "$MAX_LEN" \
        --time-budget 30s --memory-budget 100% --refine 0.05 --out "$OUT/race-causal-oom"
fi
if named graphs; then
    stage graphs 35 "${SWEEP[@]}" --cuda-graphs --methods race,flash --lengths 2^12,2^14,2^16 --time-budget 10s \
        --out "$OUT/graphs"
fi
if named profile; then  # race's pass at 2^12: eager, causal, replayed from a CUDA graph; one process
    stage profile 30 "$PY" benchmarks/profile_pass.py --method race -T 2^12 --variants eager,causal,graphs \
        --json "$OUT/profile.json"
fi
if named peers-check; then  # the peers' outputs and gradients against float64, on this GPU (linear-fla's kernel too)
    stage peers-check 25 "$PY" -m pytest -q -p no:benchmark -k "fla or sdpa" \
        tests/test_methods.py::test_method_on_cuda_matches_float64_reference
fi
if named peer-targets; then
    stage peer-targets 10 "$PY" benchmarks/peer_targets.py "$OUT/peers" "$OUT/peers-causal" "$OUT/peers-linear" \
        "$OUT/race-causal-oom" --ceilings "$OUT/ceilings.json"
fi
# The engine's CUDA paths (clocks after the device, the budget, CUDA OOM, the SDPA backends): a few points.
stage tests-engine 30 "$PY" -m pytest -q -p no:benchmark tests/test_cuda_engine.py
# Last, so that slow native compiles cannot cost a measurement (87 s on the H200; the smoke stage has already
# compared the kernels with the PyTorch core at the sweeps' shapes). Every CUDA method first, then the kernels'
# tests in file order (the launch-option ones, each a new compile, last).
stage tests 300 "$PY" -m pytest -q -p no:benchmark --durations=15 "${XDIST[@]}" \
    tests/test_methods.py::test_method_on_cuda_matches_float64_reference tests/test_race_triton.py
[ -f "$OUT/targets.log" ] && cat "$OUT/targets.log"
[ -f "$OUT/peer-targets.log" ] && cat "$OUT/peer-targets.log"
echo "== done in $((SECONDS - START)) s; everything is under $OUT"
