# Helpers sourced by .ci/run and .ci/compat.

# step NAME CMD...: run CMD in a log group, print its wall time, and return its exit code (so that
# `set -e` in the caller stops CI at the first failing step).
step() {
    local name=$1 start=$SECONDS rc=0
    shift
    echo "::group::$name"
    "$@" || rc=$?
    echo "::endgroup::"
    echo "step '$name': $((SECONDS - start)) s, exit $rc"
    return "$rc"
}

# run_pytest ARGS...: pytest under $PYTHON (default: python), where exit code 5 (no test collected,
# e.g. an empty -m selection in some environment) is not a failure; every other non-zero code is.
run_pytest() {
    local rc=0
    "${PYTHON:-python}" -m pytest "$@" || rc=$?
    if [ "$rc" -eq 5 ]; then
        echo "pytest $*: no tests collected (exit 5), not a failure"
        return 0
    fi
    return "$rc"
}
