#!/usr/bin/env bash
# The GPU work of the open issues, in two steps that each fit one 10-minute device command:
#
#   bash bench/gpu_session.sh tests   # -m gpu tier, the whole suite on CUDA tensors, `triton-losses check`
#   bash bench/gpu_session.sh bench   # issue 2/3/4 benchmark shapes: ours vs eager, torch.compile, Liger
#
# Results go to $OUT (the device tool's folder; default out/gpu), at most 8 files, to be copied to
# bench/results/ and committed. Optional wheels (e.g. liger-kernel) are installed from .whl/ if present.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the package is pure Python: no install needed
tl() { python3 -m triton_losses "$@"; }
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"

case "${1:-}" in
tests)
    python3 -m pytest -q -m gpu tests 2>&1 | tee "$OUT/gpu-tests.log" | tail -25
    # Every other test on CUDA tensors too (the device fixture picks CUDA); the AOT tier is CPU work.
    python3 -m pytest -q -x tests --ignore tests/test_aot_compile.py -m "not gpu" 2>&1 | tail -15 | tee "$OUT/suite-on-cuda.log"
    tl check 2>&1 | tee "$OUT/check.log"
    ;;
bench)
    tl bench --no-progress --ops cross_entropy --sizes 8192x32000 8192x128256 8192x262144 --out "$OUT" --prefix ce
    # Row losses at V=128256 (issue 3), and 8192x8192 = 2**26 elements for BCE-with-logits.
    tl bench --no-progress --no-plots --ops kl_div jsd kl_div_with_logits binary_cross_entropy_with_logits \
        --sizes 8192x8192 8192x128256 --out "$OUT" --prefix rows
    tl bench --no-progress --no-plots --ops linear_cross_entropy --sizes 8192x128256x4096 --out "$OUT" --prefix linear_ce
    ;;
*)
    echo "usage: bash bench/gpu_session.sh tests|bench" >&2
    exit 2
    ;;
esac
