#!/usr/bin/env bash
# Run tests/test_backend.py against a C core built with sanitizers / under valgrind.
#
#   tests/sanitize.sh [asan|valgrind|all] [extra pytest args...]
#
# asan:     the core built with -fsanitize=address,undefined (libasan preloaded
#           into the interpreter, leak detection off: CPython itself "leaks"
#           by design); any ASan/UBSan report aborts the run.
# valgrind: a -O1 -g core under valgrind memcheck with PYTHONMALLOC=malloc
#           (so pymalloc does not hide or fake errors); errors in the core fail
#           the run. Timing-sensitive tests are deselected (valgrind is ~30x
#           slower).
#
# The core is built into a temporary directory next to a copy of the package;
# the source tree and any installed fastasyncore are not touched.
# Needs: gcc, the interpreter's headers, cffi/setuptools, pytest,
# pytest-timeout, hypothesis (and valgrind for that mode). PYTHON picks the
# interpreter (default: python3).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
MODE=${1:-all}
[ $# -gt 0 ] && shift
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fa-sanitize.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

build_core() {  # build_core DIR CFLAGS LDFLAGS
    local dir=$1
    mkdir -p "$dir"
    cp -r "$ROOT/src/fastasyncore" "$dir/fastasyncore"
    rm -f "$dir"/fastasyncore/_core*.so
    (cd "$ROOT" && FASTASYNCORE_CFLAGS="$2" FASTASYNCORE_LDFLAGS="$3" \
        FASTASYNCORE_REQUIRE_CORE=1 "$PY" setup.py -q build_ext --force \
        --build-lib "$dir/lib" --build-temp "$dir/tmp" >"$dir/build.log" 2>&1) || {
        cat "$dir/build.log"; echo "sanitize.sh: core build failed" >&2; exit 1; }
    cp "$dir"/lib/fastasyncore/_core*.so "$dir/fastasyncore/"
}

run_pytest() {  # run_pytest DIR [pytest args...]: the copied package comes first
    local dir=$1; shift
    (cd "$WORK" && PYTHONPATH="$dir${PYTHONPATH:+:$PYTHONPATH}" \
        FASTASYNCORE_REQUIRE_CORE=1 FASTASYNCORE_BACKEND=cffi \
        "$@")
}

check_copy() {  # check_copy DIR [LD_PRELOAD]: the copy with the instrumented core wins
    (cd "$WORK" && PYTHONPATH="$1" LD_PRELOAD="${2:-}" ASAN_OPTIONS=detect_leaks=0 "$PY" -c \
        "import fastasyncore._core as c; assert c.__file__.startswith('$1'), c.__file__")
}

rc=0

if [ "$MODE" = asan ] || [ "$MODE" = all ]; then
    echo "== ASan + UBSan"
    D="$WORK/asan"
    SAN="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined -g -O1"
    build_core "$D" "$SAN" "-fsanitize=address,undefined"
    LIBASAN=$(gcc -print-file-name=libasan.so)
    check_copy "$D" "$LIBASAN"
    run_pytest "$D" env LD_PRELOAD="$LIBASAN" \
        ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1" \
        UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
        "$PY" -m pytest -q -p no:cacheprovider "$ROOT/tests/test_backend.py" "$@" || rc=1
fi

if [ "$MODE" = valgrind ] || [ "$MODE" = all ]; then
    echo "== valgrind memcheck"
    command -v valgrind >/dev/null || { echo "valgrind not found" >&2; exit 1; }
    D="$WORK/vg"
    build_core "$D" "-g -O1" ""
    check_copy "$D"
    # Only errors whose stack touches the core fail the run; CPython's own
    # noise (if any) is reported but ignored.
    run_pytest "$D" env PYTHONMALLOC=malloc \
        valgrind --tool=memcheck --quiet --error-exitcode=0 \
        --log-file="$WORK/vg.%p.log" --track-origins=yes \
        "$PY" -m pytest -q -p no:cacheprovider -k \
        "not model and not many_fds and not timeout_zero and not eintr and not large_drain and not recv_clamped" \
        "$ROOT/tests/test_backend.py" "$@" || rc=1
    if grep -l "fa_\(poller\|send\|recv\|scan\|prefix\)\|_core\.abi3" "$WORK"/vg.*.log 2>/dev/null \
            | xargs -r grep -l "Invalid\|uninitialised\|Mismatched\|Syscall param" >/dev/null 2>&1; then
        echo "valgrind found errors in the core:" >&2
        grep -h -B2 -A30 "Invalid\|uninitialised\|Syscall param" "$WORK"/vg.*.log >&2 || true
        rc=1
    else
        echo "valgrind: no errors attributed to the core"
    fi
fi

exit $rc
