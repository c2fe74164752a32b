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

# ci_limit SECONDS CMD...: CMD under a wall-clock limit, so that a hang fails its own step with a
# message instead of running CI into its overall limit (exit 124 from `timeout`).
ci_limit() {
    local limit=$1 rc=0
    shift
    timeout --kill-after=30 "$limit" "$@" || rc=$?
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "ci_limit: '$*' ran past its ${limit} s limit" >&2
    fi
    return "$rc"
}

# run_pytest ARGS...: pytest under $CI_PYTHON (default: python; set, not exported, by .ci/compat) within
# $PYTEST_LIMIT_S (default 1500 s), where exit code 5 (no test collected, e.g. an empty -m selection in
# some environment) is not a failure; every other non-zero code is.
run_pytest() {
    local rc=0
    ci_limit "${PYTEST_LIMIT_S:-1500}" "${CI_PYTHON:-python}" -m pytest "$@" || rc=$?
    if [ "$rc" -eq 5 ]; then
        echo "pytest $*: no tests collected (exit 5), not a failure"
        return 0
    fi
    return "$rc"
}
