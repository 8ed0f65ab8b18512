"""User-space instructions per unit, counted by callgrind: the issue-10 rows
without the machine's noise.

    python benchmarks/instructions.py                    # every row, every impl
    python benchmarks/instructions.py --rows spin,pp_dws_1 --impls fastasyncore-cffi
    python benchmarks/instructions.py --jobs 2 --scale 0.5
    python benchmarks/instructions.py --rows W1_c100,W4 --impls fastasyncore-cffi,hook-floor

Why: the timed harness (``python -m fastasyncore bench``) measures CPU time,
which is what users pay, but on a shared VM its cells move by 10-30% between
runs and its ratios depend on the guest (a guest whose user-space code runs
twice as fast makes the kernel's share of a send or recv bigger, and every
ratio moves towards 1.0).  callgrind counts the instructions the process
runs in user space: for the busy rows the same on every run within about
1% and on every machine of the same interpreter build (the W4 rows within
a few %, W4_1 by 10% or more: how the C server's responses spread over
iterations moves them), so it shows what the loop itself costs.  What it
does not see: the kernel (syscalls are the same for every implementation,
or fewer for fastasyncore), cache misses and branch mispredictions.

How: each (row, implementation) runs twice under ``valgrind --tool=callgrind``
with two unit counts, and the difference of the two totals divided by the
difference of the counts is the cost of one unit, with start-up, imports and
warm-up cancelled out.  The rows:

- spin, pp_docs_1, pp_docs_100, pp_dws_1, pp_dws_100: the in-process busy
  maps of the timed harness (``worker busy``), per iteration (spin) or per
  message;
- W4: the asyncore docs' HTTP client, ``--w4-rounds`` requests per
  connection (default 20), against the harness's C HTTP server; per request,
  from the difference between two connection counts;
- W4_1: the same client with one request per connection (per connection);
- W1_c100, W1_c1000, chat_lines: the timed harness's TCP servers (the docs
  pattern with 100 and 1,000 connections of 64-byte ping-pongs, the
  async_chat line echo with 100 connections of 1 KiB lines), each run under
  callgrind while the C load generator drives it for a fixed number of
  requests; per request, from the difference between two request counts.
  The requests in flight when the generator stops (at most one per
  connection) are the counts' only slack: within 1% here.  Under callgrind
  the server runs ~50x slower against an unslowed generator, so more of its
  connections are ready at each wait than in a timed run: per-iteration
  costs (3.11's walk over every channel, our consult) are spread over more
  requests than in a timed run, which flatters the stdlib a little.

The implementation ``hook-floor`` (W1_c100, W1_c1000, W4 and W4_1 only) is
benchmarks/hook_floor.py's measuring stick: a loop in C that does only what
these rows force on any loop keeping the hook API, on fastasyncore's own
classes.  Its count is the least user-space work per unit such a loop can
do here; the table gives the C loop's count against it.

Needs valgrind and, for the W4 and TCP rows, a C compiler (as the harness does).
Loopback only; every run is bounded by a timeout.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))

try:
    import fastasyncore  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "src"))

from fastasyncore._bench import runner  # noqa: E402

BUSY = {  # row -> (worker busy --which, pairs, count 1, count 2)
    "spin": ("spin", 1, 20000, 60000),
    "pp_docs_1": ("pp_docs", 1, 10000, 30000),
    "pp_docs_100": ("pp_docs", 100, 10000, 30000),
    "pp_dws_1": ("pp_dws", 1, 10000, 30000),
    "pp_dws_100": ("pp_dws", 100, 10000, 30000),
}
W4 = {"W4": (100, 300), "W4_1": (100, 300)}     # row -> (connections 1, 2)
TCP = {  # row -> (worker serve --pattern, connections, message size, requests 1, requests 2)
    "W1_c100": ("docs", 100, 64, 10000, 40000),
    "W1_c1000": ("docs", 1000, 64, 20000, 80000),
    "chat_lines": ("chat-lines", 100, 1024, 10000, 40000),
}
ROWS = list(BUSY) + list(W4) + list(TCP)
IMPLS = ["asyncore-select", "asyncore-poll", "fastasyncore-cffi", "fastasyncore-cffi-poll",
         "fastasyncore-pure", "fastasyncore-pure-poll"]
FLOOR = "hook-floor"                # not in the default IMPLS: asked for by name
FLOOR_ROWS = ("W1_c100", "W1_c1000", "W4", "W4_1")
_floor_dir = None                   # where main() built hook_floor's extension
TIMEOUT = 900


def callgrind_total(argv, env, workdir, tag, requests=None):
    """Instructions (Ir) of one run of argv under callgrind.  ``requests``:
    the requests the run must report having completed (the W4 client's JSON
    line): the count is divided by it, so a run that lost some (a refused or
    reset connection closes quietly) must fail rather than skew it."""
    out = os.path.join(workdir, "callgrind.%s" % tag)
    p = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=" + out] + argv,
                       env=env, capture_output=True, text=True, timeout=TIMEOUT)
    if p.returncode != 0:
        raise RuntimeError("%s failed (%d): %s" % (" ".join(argv[:6]), p.returncode,
                                                   (p.stderr.strip().splitlines() or ["?"])[-1]))
    if requests is not None:
        done = None
        for line in p.stdout.splitlines():
            if line.startswith("{"):
                try:
                    done = json.loads(line).get("requests")
                except ValueError:
                    pass
        if done != requests:
            raise RuntimeError("%s: %s requests completed, %d expected"
                               % (tag, done, requests))
    return callgrind_file_total(out)


def callgrind_file_total(out):
    with open(out) as f:
        for line in f:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise RuntimeError("no totals in %s" % out)


def worker_argv(impl, *args):
    # the harness's impl names: "-poll" selects loop(use_poll=True)
    if impl == FLOOR:
        head = [sys.executable, os.path.join(HERE, "hook_floor.py"), "--worker", _floor_dir]
    else:
        head = [sys.executable, "-m", "fastasyncore._bench.worker"]
    return head + list(args) + ["--impl", impl]


def measure(row, impl, ctx):
    """-> Ir per unit (the difference of two runs)."""
    # (the floor runs fastasyncore's classes on the cffi backend)
    env = runner.child_env("fastasyncore-cffi" if impl == FLOOR else impl)
    scale = ctx["scale"]
    if row in BUSY:
        which, pairs, n1, n2 = BUSY[row]
        n1, n2 = max(1, int(n1 * scale)), max(2, int(n2 * scale))
        totals = [callgrind_total(worker_argv(impl, "busy", "--which", which, "--pairs", str(pairs),
                                              "--count", str(n), "--timeout", str(TIMEOUT)),
                                  env, ctx["workdir"], "%s.%s.%d" % (row, impl, n))
                  for n in (n1, n2)]
        return (totals[1] - totals[0]) / (n2 - n1)
    if row in TCP:
        return measure_tcp(row, impl, ctx, env)
    c1, c2 = W4[row]
    c1, c2 = max(1, int(c1 * scale)), max(2, int(c2 * scale))
    rounds = 1 if row == "W4_1" else ctx["w4_rounds"]
    totals = [callgrind_total(worker_argv(impl, "w4client", "--port", str(ctx["port"]),
                                          "--conns", str(c), "--rounds", str(rounds),
                                          "--warmup-conns", "0", "--timeout", str(TIMEOUT)),
                              env, ctx["workdir"], "%s.%s.%d" % (row, impl, c), requests=c * rounds)
              for c in (c1, c2)]
    return (totals[1] - totals[0]) / ((c2 - c1) * rounds)


def measure_tcp(row, impl, ctx, env):
    """-> Ir per request of a TCP server row (the difference of two runs)."""
    pattern, conns, size, n1, n2 = TCP[row]
    n1, n2 = max(1, int(n1 * ctx["scale"])), max(2, int(n2 * ctx["scale"]))
    totals = []
    for n in (n1, n2):
        tag = "%s.%s.%d" % (row, impl, n)
        out = os.path.join(ctx["workdir"], "callgrind.%s" % tag)
        srv = runner.Server(["valgrind", "--tool=callgrind", "--callgrind-out-file=" + out] +
                            worker_argv(impl, "serve", "--pattern", pattern,
                                        "--max-seconds", str(TIMEOUT)),
                            env, None, ctx["workdir"], tag)
        try:
            port = srv.port(timeout=120)
            if port is None:
                raise RuntimeError("%s %s: the server did not start" % (row, impl))
            res, err = runner.run_json(
                [ctx["exe"], "client", "--port", str(port), "--mode", "pingpong",
                 "--conns", str(conns), "--size", str(size), "--idle", "0", "--warmup", "0",
                 "--duration", str(TIMEOUT), "--max-requests", str(n),
                 "--setup-timeout", "300"], None, None, TIMEOUT, ctx["workdir"])
        finally:
            rc, _, serr = srv.stop(timeout=300)
        if res is None:
            raise RuntimeError("%s %s: load generator: %s" % (row, impl, err))
        if rc != 0:
            raise RuntimeError("%s %s: server exit %s: %s" % (
                row, impl, rc, (serr.splitlines() or ["?"])[-1]))
        totals.append((callgrind_file_total(out), res["requests"]))
    (t1, r1), (t2, r2) = totals
    return (t2 - t1) / (r2 - r1)


def table(rows, impls, res):
    unit = {"spin": "iteration", "W4": "request", "W4_1": "connection", "W1_c100": "request",
            "W1_c1000": "request", "chat_lines": "request"}
    floor = FLOOR in impls
    lines = ["| row | implementation | Ir per unit | × stdlib (cheaper mode) | pure ÷ cffi (same mode) |"
             + (" cffi ÷ hook floor |" if floor else ""),
             "|---|---|---:|---:|---:|" + ("---:|" if floor else "")]
    for row in rows:
        std = [res[(row, i)] for i in impls if i.startswith("asyncore-") and (row, i) in res]
        best = min(std) if std else None
        for impl in impls:
            v = res.get((row, impl))
            if v is None:
                continue
            ratio = "%.2f×" % (v / best) if best else "–"
            vs = fl = "–"
            if impl.startswith("fastasyncore-cffi"):
                pure = res.get((row, impl.replace("-cffi", "-pure")))
                if pure:
                    vs = "%.2f×" % (pure / v)
                if res.get((row, FLOOR)):
                    fl = "%.2f×" % (v / res[(row, FLOOR)])
            lines.append("| %s (per %s) | %s | %s | %s | %s |" % (
                row, unit.get(row, "message"), impl, "{:,.0f}".format(v), ratio, vs)
                + (" %s |" % fl if floor else ""))
    return "\n".join(lines)


def main(argv=None):
    global _floor_dir
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated: " + ", ".join(ROWS))
    p.add_argument("--impls", default=",".join(IMPLS),
                   help="comma-separated: " + ", ".join(IMPLS + [FLOOR]))
    p.add_argument("--scale", type=float, default=1.0, help="multiply the unit counts")
    p.add_argument("--w4-rounds", type=int, default=20, help="requests per connection (W4)")
    p.add_argument("--jobs", type=int, default=2, help="callgrind runs at once")
    args = p.parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    impls = [i for i in args.impls.split(",") if i]
    bad = [r for r in rows if r not in ROWS] + [i for i in impls if i not in IMPLS + [FLOOR]]
    if bad:
        p.error("unknown: %s" % ", ".join(bad))
    if FLOOR in impls and not any(r in FLOOR_ROWS for r in rows):
        p.error("%s counts only the rows %s" % (FLOOR, ", ".join(FLOOR_ROWS)))
    if shutil.which("valgrind") is None:
        raise SystemExit("instructions: valgrind is not installed")
    have_std, why = runner.have_stdlib_asyncore()
    if not have_std:
        print("note: no stdlib asyncore (%s): no stdlib rows" % why, file=sys.stderr)
        impls = [i for i in impls if not i.startswith("asyncore-")]
    res = {}
    with tempfile.TemporaryDirectory(prefix="fastasyncore-ir-") as workdir:
        ctx = {"workdir": workdir, "scale": args.scale, "w4_rounds": args.w4_rounds}
        srv = None
        try:
            if any(r in W4 or r in TCP for r in rows):
                exe, msg = runner.build_c(workdir, lambda m: None)
                if exe is None:
                    raise SystemExit("instructions: %s" % msg)
                ctx["exe"] = exe
            if FLOOR in impls:
                if HERE not in sys.path:
                    sys.path.insert(0, HERE)
                import hook_floor
                why = hook_floor.build(workdir)
                if why:
                    raise SystemExit("instructions: %s: %s" % (FLOOR, why))
                _floor_dir = workdir
            if any(r in W4 for r in rows):
                srv = runner.Server([exe, "server", "--mode", "http", "--max-seconds", "3600"],
                                    dict(os.environ), None, workdir, "http")
                ctx["port"] = srv.port()
                if ctx["port"] is None:
                    raise SystemExit("instructions: the C HTTP server did not start")
            todo = [(r, i) for r in rows for i in impls if i != FLOOR or r in FLOOR_ROWS]
            with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
                futs = {key: pool.submit(measure, key[0], key[1], ctx) for key in todo}
                for key in todo:
                    res[key] = futs[key].result()
                    print("%-12s %-24s %10.0f Ir/unit" % (key[0], key[1], res[key]),
                          file=sys.stderr, flush=True)
        finally:
            if srv is not None:
                srv.stop()
    print(table(rows, impls, res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
