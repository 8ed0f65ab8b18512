"""How close the C loop is to the least any hook-API loop can cost here.

    python benchmarks/hook_floor.py                      # W1_c100, W1_c1000, W4; 5 rounds
    python benchmarks/hook_floor.py --rows W4 --rounds 3

Why: issue 10's ratios for W1 and W4 are the C loop's CPU (or requests/s)
against 3.11's, and on these VMs three quarters of a W1 server's CPU is the
kernel's.  The C epoll row of the timed harness is the floor of a server
that runs no Python at all; it says nothing about a loop that must call the
user's writable() and handlers.  This script measures that floor instead:
hook_floor.c, a loop in C that does only what the docs-pattern rows force
on any loop keeping the asyncore hook API -- writable() of every channel
every iteration, one poll(2), handle_read_event()/handle_write_event() of
map.get(fd) -- on fastasyncore's own dispatcher classes (so with our C
send/recv), with no owner table, no error routing, no services, nothing
that scales.  It is not a usable loop, only a measuring stick.

How: the timed harness's own runs (``python -m fastasyncore bench``'s
server_run/client_run: the same C load generator and C HTTP server, the same
pinning, warm-up and CPU accounting) of three implementations, interleaved
round by round: asyncore-select (3.11's stdlib, the cheaper mode on these
rows), fastasyncore-cffi (the C loop), and hook-floor.  Each row reports
per implementation the median and min-max of CPU per unit (W4: requests/s)
and the ratios to stdlib of the same round.

Needs a C compiler and the running interpreter's headers (to build the
extension), and 3.11's asyncore for the stdlib column.  Loopback only;
every run is bounded.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile

try:
    import fastasyncore  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "src"))

from fastasyncore._bench import runner  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
FLOOR = "hook-floor"
IMPLS = ["asyncore-select", "fastasyncore-cffi", FLOOR]
# row -> (kind, spec): the harness's own workloads (W4 is its W4_client)
_SPECS = {w: (kind, spec) for w, kind, spec in runner.WORKLOADS}
ROWS = {"W1_c100": _SPECS["W1_c100"], "W1_c1000": _SPECS["W1_c1000"], "W4": _SPECS["W4_client"]}


def build(workdir):
    """Compile hook_floor.c as an extension in workdir; -> None or a reason."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return "no C compiler"
    out = os.path.join(workdir, "hook_floor" + sysconfig.get_config_var("EXT_SUFFIX"))
    argv = cc.split() + ["-O2", "-shared", "-fPIC", "-I", sysconfig.get_paths()["include"],
                         os.path.join(HERE, "hook_floor.c"), "-o", out]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if p.returncode:
        return "compiling hook_floor.c failed: %s" % (p.stderr.strip().splitlines() or ["?"])[-1]
    return None


def worker(ext_dir, argv):
    """The harness's worker, with impl hook-floor: fastasyncore's classes and
    hook_floor.iterate as the loop."""
    import types
    sys.path.insert(0, ext_dir)
    import hook_floor
    from fastasyncore._bench import worker as w
    plain = w.asyncore_impl

    def asyncore_impl(impl):
        if impl != FLOOR:
            return plain(impl)
        a, c, _ = plain("fastasyncore-cffi")
        mod = types.ModuleType("asyncore_hook_floor")
        mod.__dict__.update({k: getattr(a, k) for k in dir(a) if not k.startswith("__")})
        iterate = hook_floor.iterate

        def loop(timeout=30.0, use_poll=False, map=None, count=None):
            ms = int(timeout * 1000)
            while map and (count is None or count > 0):
                iterate(map, ms)
                if count is not None:
                    count -= 1
        mod.loop = loop
        return mod, c, False

    w.asyncore_impl = asyncore_impl
    return w.main(argv)


def measure(rows, rounds, duration, warmup, progress):
    ctx = runner.Ctx()
    ctx.seq = 0
    ctx.duration, ctx.warmup, ctx.setup_timeout = duration, warmup, 90
    ctx.max_requests = ctx.w4_conns = None
    ctx.cpus = runner.pick_cpus()
    ctx.workdir = tempfile.mkdtemp(prefix="fastasyncore-floor-")
    try:
        ctx.fabench, msg = runner.build_c(ctx.workdir, progress)
        if ctx.fabench is None:
            raise SystemExit(msg)
        why = build(ctx.workdir)
        if why:
            raise SystemExit(why)
        runner.WORKER_ARGV[FLOOR] = [sys.executable, os.path.abspath(__file__),
                                     "--worker", ctx.workdir]
        res = {}
        for r in range(rounds):
            for row in rows:
                kind, spec = ROWS[row]
                for impl in IMPLS:
                    progress("round %d/%d %s %s" % (r + 1, rounds, row, impl))
                    if kind == "server":
                        run = runner.server_run(ctx, row, spec, impl, "")
                    else:
                        run = runner.client_run(ctx, row, spec, impl)
                    if run.get("error"):
                        raise SystemExit("%s %s: %s" % (row, impl, run["error"]))
                    res.setdefault((row, impl), []).append(run)
        return res
    finally:
        shutil.rmtree(ctx.workdir, ignore_errors=True)


def report(rows, res, out):
    def fmt(x):
        return "%.1fk" % (x / 1e3) if x >= 1e4 else "%.3g" % x

    def mmm(xs):
        return "%s (%s-%s)" % (fmt(statistics.median(xs)), fmt(min(xs)), fmt(max(xs)))

    out.write("| row | unit | stdlib (select) | C loop | hook floor | C loop / stdlib | "
              "floor / stdlib | C loop / floor |\n|---|---|---|---|---|---|---|---|\n")
    for row in rows:
        w4 = ROWS[row][0] == "client"
        key = "throughput" if w4 else "cpu_per_unit"
        std, c, f = ([run[key] for run in res[(row, i)]] for i in IMPLS)
        rc = [a / b for a, b in zip(c, std)]
        rf = [a / b for a, b in zip(f, std)]
        cf = [a / b for a, b in zip(c, f)]
        out.write("| %s | %s | %s | %s | %s | %s | %s | %s |\n" % (
            row, "req/s" if w4 else "CPU s/100k req", mmm(std), mmm(c), mmm(f),
            mmm(rc), mmm(rf), mmm(cf)))
    out.write("\nRatios per round (same round's stdlib), median (min-max); for W4 "
              "higher is better, for W1 lower.\n")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker(argv[1], argv[2:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated: %s" % ", ".join(ROWS))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--duration", type=float, default=1.0)
    p.add_argument("--warmup", type=float, default=0.3)
    a = p.parse_args(argv)
    rows = [r for r in a.rows.split(",") if r]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        p.error("unknown rows: %s" % ", ".join(bad))
    if not (sys.platform.startswith("linux")):
        raise SystemExit("needs Linux (the harness's C load generator)")
    res = measure(rows, a.rounds, a.duration, a.warmup,
                  lambda m: print(m, file=sys.stderr, flush=True))
    report(rows, res, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
