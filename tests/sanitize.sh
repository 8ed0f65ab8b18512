#!/usr/bin/env bash
# Run the C code's tests against a C core (fastasyncore._core, cffi) and C loop
# (fastasyncore._cloop, CPython limited API) built with sanitizers / under valgrind.
#
#   tests/sanitize.sh [asan|valgrind|all] [extra pytest args...]
#
# Tests: tests/test_backend.py (the core's interface) and the loop tests that
# drive the C loop: test_loop_contract.py, test_reliability_faults.py,
# test_instance_overrides.py, test_cloop.py, test_bad_fd.py, test_services.py, test_chanio.py,
# test_chatio.py and test_bookkeeping.py
# (when present). Both modules
# are checked to be the instrumented copies, and the loop to be the C one.
#
# asan:     core and loop built with -fsanitize=address,undefined (libasan
#           preloaded into the interpreter, leak detection off: CPython itself
#           "leaks" by design); any ASan/UBSan report aborts the run. Every
#           test case runs (all backend cases, stdlib reference included).
# valgrind: -O1 -g builds under valgrind memcheck with PYTHONMALLOC=malloc
#           (so pymalloc does not hide or fake errors). Any error whose stack
#           touches _core or _cloop (their .so files or csrc/ sources) fails
#           the run; CPython's own noise is counted and ignored. Only the C
#           cases run (the "cffi" backend case with the loop the environment
#           picks: the C loop; no pure, stdlib or cffi-pyloop cases), and
#           timing-sensitive tests are deselected (valgrind is ~30x slower).
#           Test-spawned subprocesses run outside valgrind (forked children
#           stay in it). Two pytest processes, test_backend.py and the loop
#           tests, run in parallel (VG_JOBS=1: one after the other).
#
# Extra pytest args go to every pytest run (under valgrind to both); a -k of
# your own replaces the valgrind deselection (pytest keeps the last -k).
#
# The modules are built into a temporary directory next to a copy of the
# package; the source tree and any installed fastasyncore are not touched.
# Needs: gcc, the interpreter's headers, cffi/setuptools, pytest,
# pytest-timeout, hypothesis (and valgrind for that mode). PYTHON picks the
# interpreter (default: python3); SANITIZE_KEEP=1 keeps the scratch directory
# (builds, valgrind logs).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
MODE=${1:-all}
[ $# -gt 0 ] && shift
VG_JOBS=${VG_JOBS:-2}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fa-sanitize.XXXXXX")
if [ "${SANITIZE_KEEP:-0}" = 1 ]; then
    trap 'echo "sanitize.sh: logs kept in $WORK"' EXIT
else
    trap 'rm -rf "$WORK"' EXIT
fi
T0=$SECONDS

case "$MODE" in asan|valgrind|all) ;; *)
    echo "usage: tests/sanitize.sh [asan|valgrind|all] [extra pytest args...]" >&2; exit 2;;
esac

# The C loop's tests (test_cloop.py may not exist in older trees).
LOOP_TESTS=()
for f in test_loop_contract.py test_reliability_faults.py test_instance_overrides.py test_cloop.py test_bad_fd.py test_services.py test_chanio.py test_chatio.py test_bookkeeping.py; do
    [ -f "$ROOT/tests/$f" ] && LOOP_TESTS+=("$ROOT/tests/$f")
done
echo "tests: test_backend.py ${LOOP_TESTS[*]##*/}"

build_core() {  # build_core DIR CFLAGS LDFLAGS: _core and _cloop, into DIR/fastasyncore
    local dir=$1 so
    mkdir -p "$dir"
    cp -r "$ROOT/src/fastasyncore" "$dir/fastasyncore"
    # An in-tree (editable) build leaves uninstrumented modules in src/.
    rm -f "$dir"/fastasyncore/_core*.so "$dir"/fastasyncore/_cloop*.so
    # Built from a private copy of the sources: CI runs this beside other
    # installs and test suites working in the same tree, and a build there
    # once left us a module without the flags asked for here.
    mkdir -p "$dir/srccopy"
    (cd "$ROOT" && tar --exclude=./build --exclude='*.so' --exclude='*.egg-info' \
        -cf - setup.py build.py pyproject.toml README.md MANIFEST.in csrc src) | tar -C "$dir/srccopy" -xf -
    (cd "$dir/srccopy" && FASTASYNCORE_CFLAGS="$2" FASTASYNCORE_LDFLAGS="$3" \
        FASTASYNCORE_REQUIRE_CORE=1 "$PY" setup.py -q build_ext --force \
        --build-lib "$dir/lib" --build-temp "$dir/tmp" >"$dir/build.log" 2>&1) || {
        cat "$dir/build.log"; echo "sanitize.sh: core build failed" >&2; exit 1; }
    for so in _core _cloop; do
        if ! compgen -G "$dir/lib/fastasyncore/$so*.so" >/dev/null; then
            cat "$dir/build.log"
            echo "sanitize.sh: the build made no fastasyncore/$so*.so" >&2; exit 1
        fi
        cp "$dir"/lib/fastasyncore/$so*.so "$dir/fastasyncore/"
    done
    ls "$dir"/fastasyncore/*.so
}

check_instrumented() {  # check_instrumented DIR asan|debug: the built modules are the flagged ones
    local so syms
    for so in "$1"/fastasyncore/_core*.so "$1"/fastasyncore/_cloop*.so; do
        # (the tool's output is read whole first: `tool | grep -q` under
        # pipefail fails at random when grep exits early and the tool gets
        # SIGPIPE -- CI saw "has no debug info" for a module that had it)
        case $2 in
        asan) syms="$(nm -D --undefined-only "$so")"
              grep -q '__asan_report' <<<"$syms" && grep -q '__ubsan_handle' <<<"$syms" \
                || { echo "sanitize.sh: $so is not built with ASan+UBSan" >&2; exit 1; };;
        debug) grep -q '\.debug_info' <<<"$(readelf -S "$so")" \
                || { echo "sanitize.sh: $so has no debug info" >&2; exit 1; };;
        esac
    done
}

run_pytest() {  # run_pytest DIR [command...]: the copied package comes first
    local dir=$1; shift
    (cd "$WORK" && PYTHONPATH="$dir${PYTHONPATH:+:$PYTHONPATH}" \
        FASTASYNCORE_REQUIRE_CORE=1 FASTASYNCORE_BACKEND=cffi FASTASYNCORE_LOOP=auto \
        "$@")
}

check_copy() {  # check_copy DIR [LD_PRELOAD]: the copy's instrumented _core and _cloop win
    (cd "$WORK" && PYTHONPATH="$1" LD_PRELOAD="${2:-}" ASAN_OPTIONS=detect_leaks=0 \
        FASTASYNCORE_BACKEND=cffi FASTASYNCORE_LOOP=auto "$PY" -c "
import fastasyncore, fastasyncore._core as c, fastasyncore._cloop as l
from fastasyncore import _loop
for m in (c, l):
    assert m.__file__.startswith('$1/'), m.__file__
assert fastasyncore.BACKEND == 'cffi', fastasyncore.BACKEND
assert _loop.loop_impl() == 'c', _loop.loop_impl()
print('check_copy: %s, %s; loop: C' % (c.__file__, l.__file__))")
}

rc=0

if [ "$MODE" = asan ] || [ "$MODE" = all ]; then
    echo "== ASan + UBSan   [t=$((SECONDS - T0))s]"
    D="$WORK/asan"
    SAN="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined -g -O1"
    build_core "$D" "$SAN" "-fsanitize=address,undefined"
    check_instrumented "$D" asan
    LIBASAN=$(gcc -print-file-name=libasan.so)
    check_copy "$D" "$LIBASAN"
    t=$SECONDS
    run_pytest "$D" env LD_PRELOAD="$LIBASAN" \
        ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1" \
        UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
        "$PY" -m pytest -q -p no:cacheprovider \
        "$ROOT/tests/test_backend.py" "${LOOP_TESTS[@]}" "$@" || rc=1
    echo "ASan + UBSan: pytest took $((SECONDS - t))s (rc so far: $rc)"
fi

# Deselected under valgrind: the non-C cases, then tests whose assertions are
# about elapsed time (or which race a thread/timer against the wait) and fail
# only because valgrind makes everything ~30x slower, and the Hypothesis
# state machines (hundreds of examples; ASan runs them).
VG_NOT_C="pure or stdlib or pyloop"
VG_SLOW_BACKEND="model or many_fds or timeout_zero or eintr or large_drain or recv_clamped"
VG_SLOW_LOOP="zero_timeout or poll2_truncates or returns_at_once or stops_when_map_empties \
or signal_handler_exception or signal_without_exception or two_threads or f4_single_close \
or f5_reset or machine or hypothesis or timing \
or woken_from_another or fixed_rate or skips_missed or idle_timeout or timeout_is_cut \
or many_timers or errors_are_logged or racing or survives_fork or waits_for_the_timer \
or never_spins or no_spin or loop_ends_when or c_methods_leak_nothing \
or chat_methods_leak_nothing"

if [ "$MODE" = valgrind ] || [ "$MODE" = all ]; then
    echo "== valgrind memcheck   [t=$((SECONDS - T0))s]"
    command -v valgrind >/dev/null || { echo "valgrind not found" >&2; exit 1; }
    D="$WORK/vg"
    build_core "$D" "-g -O1" ""
    check_instrumented "$D" debug
    check_copy "$D"
    t=$SECONDS
    # Two pytest processes (the core's tests, the loop's tests), in parallel
    # unless VG_JOBS=1 (valgrind runs a process on one core); their output is
    # printed in order once both are done.
    vg_pytest() {  # vg_pytest N FILE... [pytest args]
        local n=$1; shift
        run_pytest "$D" env PYTHONMALLOC=malloc \
            valgrind --tool=memcheck --quiet --error-exitcode=0 \
            --log-file="$WORK/vg.%p.log" --track-origins=yes --num-callers=24 \
            "$PY" -m pytest -q -p no:cacheprovider -o timeout=900 \
            -k "not ($VG_NOT_C) and not ($VG_SLOW_BACKEND) and not ($VG_SLOW_LOOP)" \
            "$@" >"$WORK/vg-pytest.$n.out" 2>&1
    }
    r0=0 r1=0
    vg_pytest 0 "$ROOT/tests/test_backend.py" "$@" & p0=$!
    if [ "$VG_JOBS" -lt 2 ]; then wait $p0 || r0=$?; fi
    vg_pytest 1 "${LOOP_TESTS[@]}" "$@" & p1=$!
    if [ "$VG_JOBS" -ge 2 ]; then wait $p0 || r0=$?; fi
    wait $p1 || r1=$?
    echo "-- valgrind: pytest test_backend.py (rc=$r0)"
    cat "$WORK/vg-pytest.0.out"
    echo "-- valgrind: pytest ${LOOP_TESTS[*]##*/} (rc=$r1)"
    cat "$WORK/vg-pytest.1.out"
    [ "$r0" = 0 ] && [ "$r1" = 0 ] || rc=1
    echo "valgrind: pytest took $((SECONDS - t))s"
    # Errors attributed to our code: a frame in _core/_cloop's .so (without
    # symbols) or in one of their C sources (csrc/*.c, cffi's generated _core.c).
    "$PY" - "$WORK" <<'EOF' || rc=1
import glob, re, sys
ours = re.compile(r"\((?:fa_[a-z_]+|_core|_cloop)\.c:\d+\)"
                  r"|\(in [^)]*/fastasyncore/_(?:core|cloop)[^/)]*\.so\)")
kinds = re.compile(r"^(Invalid (read|write|free)|Conditional jump|Use of uninitialised"
                   r"|Syscall param|Mismatched free|Source and destination overlap"
                   r"|Argument '[^']*' of function|Jump to the invalid address)")
bad, other = [], 0
for path in sorted(glob.glob(sys.argv[1] + "/vg.*.log")):
    block = []
    for line in open(path, errors="replace").read().splitlines() + ["==0== "]:
        body = re.sub(r"^==\d+== ?", "", line)
        if body.strip():
            block.append(body)
            continue
        if block and kinds.match(block[0]):
            if any(ours.search(b) for b in block):
                bad.append("%s:\n  %s" % (path.rsplit("/", 1)[1], "\n  ".join(block[:40])))
            else:
                other += 1
        block = []
if bad:
    print("valgrind found %d error(s) in _core/_cloop:" % len(bad), file=sys.stderr)
    print("\n\n".join(bad), file=sys.stderr)
    sys.exit(1)
print("valgrind: no errors attributed to _core/_cloop (%d other report(s) ignored, "
      "%d log file(s))" % (other, len(glob.glob(sys.argv[1] + "/vg.*.log"))))
EOF
fi

echo "sanitize.sh $MODE: rc=$rc in $((SECONDS - T0))s"
exit $rc
