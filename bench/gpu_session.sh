#!/usr/bin/env bash
# One prepared GPU session, in order of value, within 9 minutes on a fresh H100/H200 (the image's
# torch 2.11 / triton 3.6, no internet):
#
#   bash bench/gpu_session.sh            # on the GPU machine
#   bash bench/gpu_session.sh --dry-run  # every step at toy sizes on this CPU (tests/test_bench_cli.py runs it)
#
#   1. device facts: name, SMs, L2, memory, measured copy bandwidth, and the time of linear
#      cross-entropy's three GEMMs at 8192 x 4096 x 128256 (the goal's denominator)
#                                                                           -> session.log, ce-sweep.jsonl
#   2. the `-m gpu` test tier                                               -> gpu-tests.log
#   3. cross-entropy sweep: variants x launch configurations at N=8192 x V in {128256, 32000, 262144}
#      bf16, forward with the gradient write first, then without, GB/s and % of copy bandwidth
#                                                                           -> ce-sweep.jsonl, tables in session.log
#   4. cross-entropy and linear cross-entropy: ours vs torch eager and Liger-Kernel, V = 128256 first
#                                                                           -> bench.json, bench.md
#   5. ours vs torch.compile at V = 128256, if time is left                  -> bench-extra.json, bench-extra.md
#   6. `triton-losses check`                                                -> check.log
#   7. the goals (bench/gpu_goals.py: % of copy bandwidth, vs Liger, vs torch.compile, linear CE vs
#      its GEMMs) as PASS / FAIL / not measured, and the launch-configuration table the sweep implies
#                                                                           -> session.log
#
# Each step runs under its own `timeout`, sized from what is left of the session; its output goes
# straight to its file in $OUT (the device tool's folder; default out/gpu) as it is written (the
# bench tables are rewritten after every row, so a step cut short keeps what it measured), and the
# console shows its tail. At most 8 files.
#
# Liger-Kernel is not in the GPU image and the machine has no internet: its wheel travels in .whl/
# (git-ignored). Before the device call, on this machine:
#     pip download --no-deps -d .whl liger-kernel==0.8.5
# and call the device tool with carry [".whl"]. Without it the Liger goal is reported "not measured".
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
SESSION_S=${GPU_SESSION_S:-530}  # the whole script; the device tool allows 600 s per command
START=$SECONDS
LOG="$OUT/session.log"
: >"$LOG"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1

say() { echo "$*" | tee -a "$LOG"; }
left() { echo $((SESSION_S - (SECONDS - START))); }

# step NAME LIMIT_S RESERVE_S FILE CMD...: run CMD for at most LIMIT_S seconds and never into the
# last RESERVE_S seconds of the session; stdout+stderr to $OUT/FILE (appended for session.log).
step() {
    local name=$1 limit=$2 reserve=$3 file=$4 t0=$SECONDS rc
    shift 4
    local avail=$(($(left) - reserve))
    [ "$avail" -lt "$limit" ] && limit=$avail
    if [ "$limit" -lt 15 ]; then
        say "== $name: skipped, $(left) s left in the session"
        return 0
    fi
    say "== $name (at most ${limit} s) -> $OUT/$file"
    if [ "$file" = session.log ]; then
        timeout -k 10 "$limit" "$@" >>"$OUT/$file" 2>&1
        rc=$?
    else
        timeout -k 10 "$limit" "$@" >"$OUT/$file" 2>&1
        rc=$?
        tail -n 15 "$OUT/$file"
    fi
    say "== $name: exit $rc after $((SECONDS - t0)) s$([ "$rc" = 124 ] && echo ' (timed out)')"
}

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || say "wheels: install failed"
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" # the package is pure Python: no install needed

if [ "$DRY" = 1 ]; then
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
    DRYARG=(--dry-run)
    CE_SIZES=(8x300 4x1000)
    BENCH_ARGS=(--quick --device cpu --hidden 16 --copy-mib 16 --rep-ms 0 --min-reps 1)
    CHECK_ARGS=(--ops cross_entropy)
    EXTRA=(torch ours) # torch.compile on a CPU compiles C++ per shape: too slow for a dry run
    TESTS=(tests/test_gpu.py)
    GOALS_ARGS=(--ce 8x300 --linear 8x300x16)
    WORKERS=()
else
    unset TRITON_INTERPRET # the real kernels, whatever the caller's environment holds
    DRYARG=()
    CE_SIZES=(8192x128256 8192x32000 8192x262144) # the goals' size first: a cut drops the others
    BENCH_ARGS=(--hidden 4096)
    CHECK_ARGS=()
    EXTRA=(torch ours torch.compile)
    TESTS=(tests)
    GOALS_ARGS=()
    WORKERS=(-n 4) # one GPU: 4 workers, not one per core (each imports torch and compiles its own kernels)
fi
TL=(python3 -m triton_losses)

say "gpu_session: $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo '?') dry-run=$DRY"
if ! python3 -c "import liger_kernel" 2>/dev/null; then
    say "WARNING: liger-kernel is not importable: the Liger comparison will be 'not measured'" \
        "(pip download --no-deps -d .whl liger-kernel==0.8.5 here, then carry .whl to the device)"
fi
step "device facts" 60 0 session.log python3 bench/gpu_sweep.py facts "${DRYARG[@]}" --out "$OUT/ce-sweep.jsonl"
step "gpu test tier" 150 300 gpu-tests.log env TORCHINDUCTOR_COMPILE_THREADS=1 python3 -m pytest -q "${WORKERS[@]}" \
    -p no:cacheprovider -m gpu --durations=10 "${TESTS[@]}"
budget=$(($(left) - 200))
[ "$budget" -gt 110 ] && budget=110 # leaves the torch.compile step its 100 s when the earlier steps run long
step "CE sweep" 110 200 session.log python3 bench/gpu_sweep.py sweep "${DRYARG[@]}" --out "$OUT/ce-sweep.jsonl" \
    --budget-s $((budget - 25))
step "CE / linear CE vs torch eager, Liger" 110 70 session.log "${TL[@]}" bench --no-progress --no-plots \
    --providers torch ours liger --ops cross_entropy linear_cross_entropy --sizes "${CE_SIZES[@]}" "${BENCH_ARGS[@]}" \
    --out "$OUT" --prefix bench
step "vs torch.compile" 100 65 session.log "${TL[@]}" bench --no-progress --no-plots --providers "${EXTRA[@]}" \
    --ops cross_entropy linear_cross_entropy --sizes "${CE_SIZES[0]}" "${BENCH_ARGS[@]}" --out "$OUT" --prefix bench-extra
step "triton-losses check" 50 15 check.log "${TL[@]}" check "${CHECK_ARGS[@]}"
say "== goals"
timeout -k 5 15 python3 bench/gpu_goals.py "$OUT" "${GOALS_ARGS[@]}" 2>&1 | tee -a "$LOG"

implied=$(awk '/^## launch configurations implied/ {buf = ""; on = 1; next}
    on && /^\|/ {buf = buf $0 "\n"; next} on && NF {on = 0} END {printf "%s", buf}' "$LOG")
say "== launch configurations the sweep implies (BLOCK_R = 1)"
say "${implied:-none measured}"
say "gpu_session: done in $((SECONDS - START)) s; files: $(ls "$OUT" | tr '\n' ' ')"
