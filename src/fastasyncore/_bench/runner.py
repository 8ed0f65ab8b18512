"""The benchmark harness behind ``python -m fastasyncore bench``.

Method (../shared/spec/performance.md): the process under test and the C
load generator (or C server, for the client benchmark) run pinned to
different CPUs; each run warms up, then measures a fixed window; the CPU time
of the process under test comes from the OS (utime+stime in /proc/PID/stat);
every cell runs >= 3 times (median, min-max); stdlib asyncore, asyncio and
uvloop run in the same invocation, so ratios compare like with like.  A run is
flagged as disturbed when other processes used more than 10% of either pinned
CPU during its window; disturbed runs are retried and, when enough clean runs
exist, left out of the median.

The "busy small map" workloads (spin, pp_*) need no load generator: one
worker process per run produces and consumes every event inside one socket
map (socketpairs), pinned to one CPU, and measures its own CPU time
(time.process_time()) over a fixed number of units after a warm-up.

Every run is bounded: loopback only, ports chosen by the kernel, subprocess
timeouts, servers stop on stdin EOF or their own deadline, and only processes
started here are ever killed.
"""

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


DISTURBED_SHARE = 0.10     # other load above 10% of a pinned CPU flags a run

SERVER_IMPLS = ["fastasyncore-cffi", "fastasyncore-pure", "asyncore-select", "asyncore-poll",
                "asyncio", "uvloop", "c-epoll"]
STDLIB = ("asyncore-select", "asyncore-poll")
MICRO_IMPLS = ["asyncore-poll", "asyncore-select", "fastasyncore-pure", "fastasyncore-pure-poll",
               "fastasyncore-cffi", "fastasyncore-cffi-poll"]
# busy small maps: each implementation in select mode and in poll mode (-poll);
# -pyloop: the C backend with the Python loop (FASTASYNCORE_LOOP=py)
BUSY_IMPLS = ["asyncore-select", "asyncore-poll",
              "fastasyncore-cffi", "fastasyncore-cffi-poll",
              "fastasyncore-cffi-pyloop", "fastasyncore-cffi-pyloop-poll",
              "fastasyncore-pure", "fastasyncore-pure-poll"]
BUSY_UNITS = {"spin": "CPU µs/iteration", "pp": "CPU µs/message"}

# metric kinds: "req" -> req/s and CPU s per 100k requests; "bulk" -> MB/s and
# CPU s per GB; "mib" -> MiB/s of input and CPU ms per MiB.
WORKLOADS = [
    # id, kind, spec
    ("W1_c1", "server", dict(metric="req", mode="pingpong", conns=1, size=64)),
    ("W1_c100", "server", dict(metric="req", mode="pingpong", conns=100, size=64)),
    ("W1_c1000", "server", dict(metric="req", mode="pingpong", conns=1000, size=64)),
    ("W2_echo_c1", "server", dict(metric="bulk", mode="echo", conns=1,
                                  variants=("docs", "managed"))),
    ("W2_echo_c8", "server", dict(metric="bulk", mode="echo", conns=8,
                                  variants=("docs", "managed"))),
    ("W2_oneway_c1", "server", dict(metric="bulk", mode="oneway", conns=1, pattern="oneway")),
    ("W2_oneway_c8", "server", dict(metric="bulk", mode="oneway", conns=8, pattern="oneway")),
    ("W3_idle0", "server", dict(metric="req", mode="pingpong", conns=10, size=64, idle=0,
                                variants=("docs", "managed"))),
    ("W3_idle10000", "server", dict(metric="req", mode="pingpong", conns=10, size=64,
                                    idle=10000, variants=("docs", "managed"))),
    ("W4_client", "client", dict(metric="req", conns=1000, rounds=20)),
    ("chat_lines", "server", dict(metric="req", mode="pingpong", conns=100, size=1024,
                                  pattern="chat-lines", impls=("fastasyncore-cffi",
                                  "fastasyncore-pure", "asyncore-select", "asyncore-poll"),
                                  plain=True)),
    ("chat_flood", "server", dict(metric="mib", mode="oneway", conns=1, fill=10,
                                  pattern="chat-flood", consumed=True,
                                  impls=("fastasyncore-cffi", "fastasyncore-pure",
                                         "asyncore-select", "asyncore-poll"))),
    ("micro_idle", "micro", dict(which="idle")),
    ("micro_sendbuf", "micro", dict(which="sendbuf")),
    ("micro_chat", "micro", dict(which="chat")),
    # in-process busy small maps; count: measured units (loop iterations for
    # spin, 64-byte messages delivered for pp_*), after count/10 of warm-up
    ("spin", "busy", dict(which="spin", pairs=0, count=100000)),
    # spin with fastasyncore's loop services in use (a timer pending): their
    # per-iteration cost (stdlib: plain spin, it has no timers)
    ("spin_timer", "busy", dict(which="spin_timer", pairs=0, count=100000)),
    ("pp_docs_1", "busy", dict(which="pp_docs", pairs=1, count=40000)),
    ("pp_docs_100", "busy", dict(which="pp_docs", pairs=100, count=100000)),
    ("pp_dws_1", "busy", dict(which="pp_dws", pairs=1, count=40000)),
    ("pp_dws_100", "busy", dict(which="pp_dws", pairs=100, count=100000)),
]
BUSY = [w[0] for w in WORKLOADS if w[1] == "busy"]
QUICK = ["W1_c100", "W2_echo_c8", "W3_idle10000", "W4_client", "chat_lines", "chat_flood",
         "micro_idle", "micro_sendbuf", "micro_chat"] + BUSY


class Progress:
    def __init__(self, stream=None, quiet=False):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.t0 = time.monotonic()

    def __call__(self, msg):
        if not self.quiet:
            print("[%6.1fs] %s" % (time.monotonic() - self.t0, msg), file=self.stream,
                  flush=True)


# --------------------------------------------------------------------------
# environment

def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_busy(cpu):
    """user+nice+system+steal ticks of one CPU (None if unknown)."""
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("cpu%d " % cpu):
                    v = [int(x) for x in line.split()[1:9]]
                    return v[0] + v[1] + v[2] + v[7]
    except (OSError, ValueError, IndexError):
        pass
    return None


HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def pick_cpus():
    """(cpu for the process under test, cpu for its peer) or (None, None)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None, None
    if len(cpus) < 2:
        return None, None
    return cpus[0], cpus[1]


def pinned(cpu):
    if cpu is None:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


def have_stdlib_asyncore():
    """(available, label or reason), checked in a subprocess (no import side effects here)."""
    code = ("import warnings,sys\nwarnings.simplefilter('ignore')\n"
            "import asyncore, asynchat\n"
            "f = getattr(asyncore, '__file__', '') or ''\n"
            "print('pyasyncore' if 'site-packages' in f or 'dist-packages' in f else 'stdlib')\n")
    try:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=60, env=child_env(None))
    except subprocess.TimeoutExpired:
        return False, "import asyncore timed out"
    if p.returncode == 0:
        return True, p.stdout.strip()
    if sys.version_info >= (3, 12):
        return False, ("no stdlib asyncore on Python %d.%d (removed in 3.12; "
                       "`pip install pyasyncore pyasynchat` to compare with it)"
                       % sys.version_info[:2])
    return False, "import asyncore failed: %s" % (p.stderr.strip().splitlines() or ["?"])[-1]


def have_module(name):
    code = "import %s" % name
    try:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    except subprocess.TimeoutExpired:
        return False
    return p.returncode == 0


def have_cffi_core():
    try:
        p = subprocess.run([sys.executable, "-c", "import fastasyncore"],
                           capture_output=True, timeout=60,
                           env=child_env("fastasyncore-cffi"))
    except subprocess.TimeoutExpired:
        return False
    return p.returncode == 0


#: impl -> the argv that starts its worker process, for implementations
#: outside this harness (benchmarks/hook_floor.py registers its floor loop)
WORKER_ARGV = {}


def worker_argv(impl):
    return list(WORKER_ARGV.get(impl) or
                [sys.executable, "-m", "fastasyncore._bench.worker"])


def child_env(impl):
    """Environment for a worker: this fastasyncore first on sys.path, backend chosen."""
    env = dict(os.environ)
    import fastasyncore
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(fastasyncore.__file__)))
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([pkg_parent] + parts)
    env["PYTHONWARNINGS"] = "ignore::DeprecationWarning"
    if impl and impl.startswith("fastasyncore-"):
        env["FASTASYNCORE_BACKEND"] = impl.split("-")[1]
    else:
        env["FASTASYNCORE_BACKEND"] = "auto"
    # A row's name says which loop it runs: -pyloop rows the Python loop, the
    # others the default (a FASTASYNCORE_LOOP set by the caller is not passed on).
    env.pop("FASTASYNCORE_LOOP", None)
    if impl and "-pyloop" in impl:
        env["FASTASYNCORE_LOOP"] = "py"
    return env


def build_c(workdir, progress):
    """Compile fabench.c; -> (path or None, message)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        return None, "no C compiler (cc) found: C load generator and C rows unavailable"
    if not sys.platform.startswith("linux"):
        return None, "the C load generator needs Linux (epoll): C rows unavailable"
    # Package data (pyproject.toml), so an installed package can build it too.
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "fabench.c"),
              encoding="utf-8") as f:
        src = f.read()
    digest = hashlib.sha256(src.encode()).hexdigest()[:16]
    exe = os.path.join(workdir, "fabench-%s" % digest)
    path = os.path.join(workdir, "fabench.c")
    with open(path, "w") as f:
        f.write(src)
    progress("compiling the C load generator with %s" % cc)
    try:
        p = subprocess.run(cc.split() + ["-O2", "-o", exe, path], capture_output=True,
                           text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, "C compiler failed (%s): C rows unavailable" % exc
    if p.returncode != 0:
        return None, "C compiler failed: %s" % (p.stderr.strip().splitlines() or ["?"])[-1]
    return exe, "compiled with %s" % cc


# --------------------------------------------------------------------------
# processes

class Server:
    """A server process under test (or the C fixture); stopped by closing stdin."""

    def __init__(self, argv, env, cpu, workdir, tag):
        self.out_path = os.path.join(workdir, "%s.out" % tag)
        self.err_path = os.path.join(workdir, "%s.err" % tag)
        self.out = open(self.out_path, "wb")
        self.err = open(self.err_path, "wb")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=self.out,
                                     stderr=self.err, env=env, preexec_fn=pinned(cpu),
                                     cwd=workdir)
        self.pid = self.proc.pid

    def _read(self, path):
        try:
            with open(path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def port(self, timeout=30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self._read(self.out_path)
            for line in text.splitlines():
                if line.startswith("PORT "):
                    return int(line.split()[1])
            if self.proc.poll() is not None:
                return None
            time.sleep(0.02)
        return None

    def stop(self, timeout=15.0):
        """-> (returncode, RESULT dict or None, stderr tail)."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.out.close()
        self.err.close()
        result = None
        for line in self._read(self.out_path).splitlines():
            if line.startswith("RESULT "):
                try:
                    result = json.loads(line[7:])
                except ValueError:
                    pass
        err = self._read(self.err_path).strip()
        return self.proc.returncode, result, err[-2000:]

    def alive(self):
        return self.proc.poll() is None


def run_json(argv, env, cpu, timeout, cwd):
    """Run a bounded subprocess that prints one JSON line; -> (dict or None, error)."""
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                           preexec_fn=pinned(cpu), cwd=cwd)
    except subprocess.TimeoutExpired:
        return None, "timed out after %.0f s (killed)" % timeout
    res = None
    for line in p.stdout.splitlines():
        line = line.strip()
        if line.startswith("RESULT "):
            line = line[7:]
        if line.startswith("{"):
            try:
                res = json.loads(line)
            except ValueError:
                pass
    if res is None or not res.get("ok", True):
        why = (res or {}).get("error") or (p.stderr.strip().splitlines() or ["no output"])[-1]
        return None, "exit %s: %s" % (p.returncode, why)
    return res, p.stderr


# --------------------------------------------------------------------------
# one run of one cell

def _interp(samples, t, k=1):
    """Counter k at time t from the server's (time, iterations, consumed) samples."""
    if not samples:
        return None
    prev = samples[0]
    for cur in samples:
        if cur[0] >= t:
            if cur[0] == prev[0]:
                return cur[k]
            return prev[k] + (cur[k] - prev[k]) * (t - prev[0]) / (cur[0] - prev[0])
        prev = cur
    return samples[-1][k]


def server_run(ctx, wid, spec, impl, variant):
    """One measured run of a server workload; -> run dict (ok or error)."""
    run = {"workload": wid, "impl": impl, "variant": variant}
    pattern = spec.get("pattern", "docs")
    if variant == "managed":
        pattern = "managed"
    elif variant == "plain":
        pattern = "docs"
    cpu_s, cpu_l = ctx.cpus
    if impl == "c-epoll":
        argv = [ctx.fabench, "server", "--mode",
                "discard" if pattern == "oneway" else "echo", "--max-seconds", "300"]
        env = dict(os.environ)
    else:
        argv = worker_argv(impl) + ["serve", "--impl", impl,
                                    "--pattern", pattern, "--max-seconds", "300"]
        env = child_env(impl)
    ctx.seq += 1
    srv = Server(argv, env, cpu_s, ctx.workdir, "srv%d" % ctx.seq)
    try:
        port = srv.port()
        if port is None:
            rc, _, err = srv.stop(timeout=5)
            run["error"] = "server did not start (exit %s): %s" % (
                rc, (err.splitlines() or ["?"])[-1])
            return run
        idle = spec.get("idle", 0)
        cargv = [ctx.fabench, "client", "--port", str(port), "--mode", spec["mode"],
                 "--conns", str(spec["conns"]), "--idle", str(idle),
                 "--warmup", str(ctx.warmup), "--duration", str(ctx.duration),
                 "--pid", str(srv.pid), "--setup-timeout", str(ctx.setup_timeout)]
        if "size" in spec:
            cargv += ["--size", str(spec["size"])]
        if "reply" in spec:
            cargv += ["--reply", str(spec["reply"])]
        if "fill" in spec:
            cargv += ["--fill", str(spec["fill"])]
        if ctx.max_requests:
            cargv += ["--max-requests", str(ctx.max_requests)]
        if cpu_s is not None:
            cargv += ["--cpus", "%d,%d" % (cpu_s, cpu_l)]
        timeout = ctx.setup_timeout + ctx.warmup + ctx.duration + 30
        res, err = run_json(cargv, None, cpu_l, timeout, ctx.workdir)
    finally:
        rc, sres, serr = srv.stop()
    if res is None:
        if "filedescriptor out of range" in serr or "out of range in select" in serr:
            run["error"] = "crashes: ValueError: filedescriptor out of range in select() (fd >= 1024)"
        else:
            last = (serr.splitlines() or [""])[-1]
            run["error"] = "load generator: %s%s" % (err, ("; server: " + last) if last else "")
        return run
    run.update(res)
    if sres and sres.get("errors"):
        run["server_errors"] = sres["errors"]
        run["server_first_error"] = sres.get("first_error")
    elapsed = res["elapsed"]
    if sres and sres.get("samples"):
        its = _interp(sres["samples"], res["t1"]) - _interp(sres["samples"], res["t0"])
        run["iterations"] = its
        if its > 0 and res["server_cpu"] >= 0:
            run["us_per_iter"] = res["server_cpu"] / its * 1e6
    metric = spec["metric"]
    if metric == "req":
        n = res["requests"]
        run["throughput"] = n / elapsed if elapsed > 0 else 0.0
        run["cpu_per_unit"] = res["server_cpu"] / n * 1e5 if n else None
        if n and res.get("server_sys", -1) >= 0:
            run["sys_per_unit"] = res["server_sys"] / n * 1e5
    elif metric == "bulk":
        nbytes = res["bytes_rx"] if spec["mode"] == "echo" else res["bytes_tx"]
        run["throughput"] = nbytes / elapsed / 1e6 if elapsed > 0 else 0.0
        run["cpu_per_unit"] = res["server_cpu"] / (nbytes / 1e9) if nbytes else None
    else:  # mib: MiB of input the server consumed during the window
        if not (sres and sres.get("samples")):
            run["error"] = "server reported no samples"
            return run
        nbytes = (_interp(sres["samples"], res["t1"], 2) -
                  _interp(sres["samples"], res["t0"], 2))
        run["consumed_bytes"] = nbytes
        mib = nbytes / float(1 << 20)
        run["throughput"] = mib / elapsed if elapsed > 0 else 0.0
        run["cpu_per_unit"] = res["server_cpu"] / mib * 1e3 if mib else None
    # disturbance: other processes' share of the pinned CPUs during the window
    other = []
    if res.get("cpu_busy_server", -1) >= 0 and res["server_cpu"] >= 0:
        other.append((res["cpu_busy_server"] - res["server_cpu"]) / elapsed)
    if res.get("cpu_busy_loadgen", -1) >= 0:
        other.append((res["cpu_busy_loadgen"] - res["loadgen_cpu"]) / elapsed)
    run["other_load"] = max(other) if other else None
    run["disturbed"] = bool(other) and max(other) > DISTURBED_SHARE
    if res["requests"] == 0 and metric == "req":
        run["error"] = "no request completed in the window"
    return run


def client_run(ctx, wid, spec, impl):
    """One W4 run: a C HTTP server as fixture, the client under test measured."""
    run = {"workload": wid, "impl": impl, "variant": ""}
    cpu_c, cpu_s = ctx.cpus       # the client under test gets the first CPU
    ctx.seq += 1
    srv = Server([ctx.fabench, "server", "--mode", "http", "--max-seconds", "300"],
                 dict(os.environ), cpu_s, ctx.workdir, "http%d" % ctx.seq)
    conns = ctx.w4_conns or spec["conns"]
    rounds = spec["rounds"]
    try:
        port = srv.port()
        if port is None:
            run["error"] = "C HTTP server did not start"
            return run
        busy0 = cpu_busy(cpu_c) if cpu_c is not None else None
        peer0 = cpu_busy(cpu_s) if cpu_s is not None else None
        if impl == "c-epoll":
            argv = [ctx.fabench, "httpclient", "--port", str(port), "--conns", str(conns),
                    "--rounds", str(rounds), "--setup-timeout", "60"]
            env = None
        else:
            argv = worker_argv(impl) + [
                    "w4client", "--impl", impl, "--port", str(port), "--conns", str(conns),
                    "--rounds", str(rounds), "--warmup-conns", str(max(1, conns // 10)),
                    "--min-seconds", str(ctx.duration), "--timeout", "60"]
            env = child_env(impl)
        w0 = time.monotonic()
        res, err = run_json(argv, env, cpu_c, 90, ctx.workdir)
        wall = time.monotonic() - w0
        busy1 = cpu_busy(cpu_c) if cpu_c is not None else None
        peer1 = cpu_busy(cpu_s) if cpu_s is not None else None
    finally:
        srv.stop()
    if res is None:
        run["error"] = err
        return run
    run.update(res)
    n = res["requests"]
    run["throughput"] = n / res["elapsed"] if res["elapsed"] > 0 else 0.0
    run["cpu_per_unit"] = res["client_cpu"] / n * 1e5 if n else None
    if n and "client_sys" in res:
        run["sys_per_unit"] = res["client_sys"] / n * 1e5
    want = conns * rounds * res.get("batches", 1)
    if n < want:
        run["error"] = "only %d of %d requests completed (%s)" % (
            n, want, res.get("first_error"))
    # Disturbance: the client's CPU was busier than the client process itself
    # over the process's whole life (other processes ran there).
    run["other_load"] = None
    run["disturbed"] = False
    if busy0 is not None and busy1 is not None and wall > 0:
        proc_cpu = res.get("process_cpu", res["client_cpu"])
        run["other_load"] = max(0.0, ((busy1 - busy0) / HZ - proc_cpu) / wall)
        run["disturbed"] = run["other_load"] > DISTURBED_SHARE
    return run


# --------------------------------------------------------------------------
# summaries

def med_range(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None, None
    return statistics.median(values), min(values), max(values)


def summarize_cell(runs):
    ok = [r for r in runs if not r.get("error")]
    if not ok:
        return {"error": runs[-1].get("error") if runs else "no runs", "n": 0}
    clean = [r for r in ok if not r.get("disturbed")]
    use = clean if len(clean) >= max(1, (len(ok) + 1) // 2) else ok
    t = med_range([r.get("throughput") for r in use])
    c = med_range([r.get("cpu_per_unit") for r in use])
    u = med_range([r.get("us_per_iter") for r in use])
    k = med_range([r.get("sys_per_unit") for r in use])
    us = med_range([r["cpu_per_unit"] - r["sys_per_unit"] for r in use
                    if r.get("sys_per_unit") is not None and r.get("cpu_per_unit") is not None])
    return {"n": len(use), "runs": len(runs), "disturbed": len(ok) - len(clean),
            "used_disturbed": use is ok and len(clean) < len(ok),
            "throughput": t[0], "throughput_min": t[1], "throughput_max": t[2],
            "cpu_per_unit": c[0], "cpu_min": c[1], "cpu_max": c[2],
            "us_per_iter": u[0],
            "user_per_unit": us[0], "user_min": us[1], "user_max": us[2],
            "sys_per_unit": k[0], "sys_min": k[1], "sys_max": k[2]}


UNITS = {"req": ("req/s", "CPU s/100k req"), "bulk": ("MB/s", "CPU s/GB"),
         "mib": ("MiB/s", "CPU ms/MiB")}


def fmt_num(v, metric_kind=None):
    if v is None:
        return "–"
    if v >= 100000:
        return "%.0fk" % (v / 1000)
    if v >= 10000:
        return "%.1fk" % (v / 1000)
    if v >= 100:
        return "%.0f" % v
    if v >= 10:
        return "%.1f" % v
    if v >= 1:
        return "%.2f" % v
    return "%.3g" % v


def fmt_ratio(v):
    if v is None:
        return "–"
    if v >= 10:
        return "%.0f×" % v
    return "%.2f×" % v


def row_label(impl, variant, stdlib_label):
    name = impl
    if impl in STDLIB and stdlib_label and stdlib_label != "stdlib":
        name = impl.replace("asyncore", stdlib_label)
    return name + (" (%s)" % variant if variant else "")


def reference(cells, wid, variant, impls):
    """The best (highest-throughput) summary among ``impls`` in workload wid, same variant first."""
    best = None
    for want_same in (True, False):
        for (w, impl, var), s in cells.items():
            if w != wid or impl not in impls or s.get("throughput") is None:
                continue
            if want_same and var != variant:
                continue
            if best is None or s["throughput"] > best["throughput"]:
                best = s
        if best is not None:
            return best
    return None


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def server_table(cells, order, stdlib_label):
    lines = []
    lines.append("| workload | implementation | throughput: median (min–max) | CPU per unit "
                 "(median) | µs/iter | × stdlib | CPU × stdlib | × uvloop | runs |")
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for wid, kind, spec in order:
        if kind not in ("server", "client"):
            continue
        tunit, cunit = UNITS[spec["metric"]]
        for (w, impl, var), s in cells.items():
            if w != wid:
                continue
            label = row_label(impl, var, stdlib_label)
            if s.get("error"):
                lines.append("| %s | %s | %s | | | | | | |" % (wid, label, s["error"]))
                continue
            ref = reference(cells, wid, var, STDLIB) if impl not in STDLIB else None
            uv = reference(cells, wid, var, ("uvloop",)) if impl != "uvloop" else None
            tr = ratio(s["throughput"], ref["throughput"]) if ref else None
            cr = ratio(s["cpu_per_unit"], ref["cpu_per_unit"]) if ref else None
            ur = ratio(s["throughput"], uv["throughput"]) if uv else None
            runs = "%d" % s["n"]
            if s["disturbed"]:
                runs += " (%d disturbed%s)" % (s["disturbed"],
                                               ", kept" if s["used_disturbed"] else "")
            lines.append("| %s | %s | %s %s (%s–%s) | %s %s | %s | %s | %s | %s | %s |" % (
                wid, label, fmt_num(s["throughput"]), tunit, fmt_num(s["throughput_min"]),
                fmt_num(s["throughput_max"]), fmt_num(s["cpu_per_unit"]), cunit,
                fmt_num(s["us_per_iter"]) if s.get("us_per_iter") else "–",
                fmt_ratio(tr), fmt_ratio(cr), fmt_ratio(ur), runs))
    return "\n".join(lines)


def split_table(cells, order, stdlib_label):
    """User and kernel CPU per unit of the process under test, where it was
    measured (requests rows): what the loop and the handlers cost in user
    space beside the send/recv/poll work in the kernel, which is the same
    syscalls for every implementation here."""
    lines = []
    for wid, kind, spec in order:
        if kind not in ("server", "client") or spec["metric"] != "req":
            continue
        cunit = UNITS[spec["metric"]][1]
        for (w, impl, var), s in cells.items():
            if w != wid or s.get("error") or s.get("user_per_unit") is None:
                continue
            ref = reference(cells, wid, var, STDLIB) if impl not in STDLIB else None
            ok = ref is not None and ref.get("user_per_unit") is not None
            lines.append("| %s | %s | %s (%s–%s) | %s (%s–%s) | %s | %s |" % (
                wid, row_label(impl, var, stdlib_label), fmt_num(s["user_per_unit"]),
                fmt_num(s["user_min"]), fmt_num(s["user_max"]), fmt_num(s["sys_per_unit"]),
                fmt_num(s["sys_min"]), fmt_num(s["sys_max"]),
                fmt_ratio(ratio(s["user_per_unit"], ref["user_per_unit"]) if ok else None),
                fmt_ratio(ratio(s["sys_per_unit"], ref["sys_per_unit"]) if ok else None)))
    if not lines:
        return ""
    return "\n".join([
        "### User and kernel CPU",
        "",
        "The process under test's CPU per unit (%s) split into user and kernel "
        "time (getrusage / `/proc/PID/stat`; Linux splits the exact total by where "
        "its timer ticks fell, so the split of one window is a sample: read medians). "
        "× stdlib: against the same stdlib cell as the ratios above." % cunit,
        "",
        "| workload | implementation | user: median (min–max) | kernel: median (min–max) "
        "| user × stdlib | kernel × stdlib |",
        "|---|---|---:|---:|---:|---:|"] + lines) + "\n"


def compact_table(cells, order, stdlib_label):
    """One row per workload (and server pattern), one column per implementation:
    median throughput with the CPU per unit in brackets (like performance.md's anchors)."""
    cols = [i for i in SERVER_IMPLS if any(k[1] == i for k in cells)]
    if not cols:
        return ""
    head = [row_label(c, "", stdlib_label) for c in cols]
    lines = ["| workload | unit | " + " | ".join(head) + " |",
             "|---|---|" + "---:|" * len(cols)]
    for wid, kind, spec in order:
        if kind not in ("server", "client"):
            continue
        variants = []
        for (w, impl, var) in cells:
            if w == wid and var not in variants:
                variants.append(var)
        named = [v for v in variants if v]
        for var in (named or [""]):
            tunit, cunit = UNITS[spec["metric"]]
            row = []
            for c in cols:
                sc = cells.get((wid, c, var)) or cells.get((wid, c, ""))
                if sc is None:
                    row.append("")
                elif sc.get("error"):
                    row.append("crashes" if "crash" in sc["error"] else "error")
                else:
                    row.append("%s (%s)" % (fmt_num(sc["throughput"]),
                                            fmt_num(sc["cpu_per_unit"])))
            label = wid + (" %s" % var if var else "")
            lines.append("| %s | %s (%s) | %s |" % (label, tunit, cunit, " | ".join(row)))
    return "\n".join(lines)


def micro_tables(micro, stdlib_label):
    out = []
    idle = micro.get("micro_idle")
    if idle:
        rows = idle.get("rows", [])
        n = rows[0]["idle"] if rows else 0
        out.append("**micro_idle**: CPU µs per `loop(timeout=0)` iteration with %d idle "
                   "channels (median of %s; ratio = stdlib poll / this)" % (
                       n, len(rows[0].get("runs_us", [])) if rows else 0))
        out.append("")
        out.append("| channels | implementation | µs/iter | stdlib poll ÷ this |")
        out.append("|---|---|---:|---:|")
        for row in rows:
            base = next((r for r in rows if r["kind"] == row["kind"]
                         and r["impl"] == "asyncore-poll" and r.get("runs_us")), None)
            label = row_label(row["impl"], "", stdlib_label)
            if row["impl"] == "floor":
                label = "floor: %s" % row.get("what", "")
            if row.get("error"):
                out.append("| %s | %s | %s | |" % (row["kind"], label, row["error"]))
                continue
            v = statistics.median(row["runs_us"])
            r = statistics.median(base["runs_us"]) / v if base else None
            out.append("| %s | %s | %s | %s |" % (row["kind"], label, fmt_num(v), fmt_ratio(r)))
        out.append("")
    sb = micro.get("micro_sendbuf")
    if sb:
        rows = sb.get("rows", [])
        sizes = sorted({r["bytes"] for r in rows})
        out.append("**micro_sendbuf**: `dispatcher_with_send.send()` of one big buffer, "
                   "CPU seconds until the peer has it all")
        out.append("")
        out.append("| implementation | %s | ratio |" % " | ".join(
            "%d MiB" % (s >> 20) for s in sizes))
        out.append("|---|%s---:|" % ("---:|" * len(sizes)))
        for impl in dict.fromkeys(r["impl"] for r in rows):
            vals = [statistics.median(r["runs_s"]) for s in sizes for r in rows
                    if r["impl"] == impl and r["bytes"] == s]
            rr = vals[-1] / vals[0] if len(vals) >= 2 and vals[0] > 0 else None
            label = row_label(impl, "", stdlib_label)
            if impl == "floor":
                label = "floor: raw socket sends of 64 KiB slices (no asyncore)"
            out.append("| %s | %s | %s |" % (label,
                                              " | ".join("%.4f s" % v for v in vals),
                                              fmt_ratio(rr)))
        out.append("")
    ch = micro.get("micro_chat")
    if ch:
        rows = ch.get("rows", [])
        out.append("**micro_chat**: async_chat with terminator `b\"\\n\"`, CPU seconds to "
                   "consume the input (ratio = this / stdlib)")
        out.append("")
        out.append("| input | implementation | CPU s | × stdlib |")
        out.append("|---|---|---:|---:|")
        for row in rows:
            base = next((r for r in rows if r["workload"] == row["workload"]
                         and r["impl"] == "asyncore-select"), None)
            v = statistics.median(row["runs_s"])
            r = v / statistics.median(base["runs_s"]) if base else None
            what = ("%d KiB of b\"\\n\"" if row["workload"] == "flood" else
                    "%d KiB of 1 KiB lines") % (row["bytes"] >> 10)
            out.append("| %s | %s | %.4f | %s |" % (what, row_label(row["impl"], "", stdlib_label),
                                                    v, fmt_ratio(r)))
        out.append("")
    return "\n".join(out)


def busy_unit(spec):
    return BUSY_UNITS["spin" if spec["which"].startswith("spin") else "pp"]


def busy_best_std(busy, wid):
    """The stdlib mode (select or poll) with the lower median CPU per unit."""
    cands = [busy.get((wid, i)) for i in STDLIB]
    cands = [c for c in cands if c and not c.get("error") and c.get("cpu_per_unit")]
    return min(cands, key=lambda c: c["cpu_per_unit"], default=None)


def busy_same_mode(impl, other):
    """``other``'s row in the loop mode of ``impl`` (select or poll)."""
    poll = impl.endswith("-poll")
    if other == "asyncore":
        return "asyncore-poll" if poll else "asyncore-select"
    return other + ("-poll" if poll else "")


def _busy_base(impl):
    if impl in STDLIB:
        return impl
    return impl[:-5] if impl.endswith("-poll") else impl


def busy_tables(busy, order, stdlib_label):
    """Markdown for the busy small map workloads (empty string when none ran)."""
    wids = [(w, spec) for w, kind, spec in order if kind == "busy"
            and any(k[0] == w for k in busy)]
    if not wids:
        return ""
    out = []
    std_name = stdlib_label if stdlib_label and stdlib_label != "stdlib" else "stdlib"
    out.append("### In-process busy small maps")
    out.append("")
    out.append("One process per run, pinned to one CPU, produces and consumes every event "
               "in one socket map (socketpairs; no load generator). CPU is "
               "`time.process_time()` over a fixed count after a warm-up of a tenth of it; "
               "each cell is the median (min–max) of its runs. spin: one `dispatcher` with "
               "the stock `readable()`/`writable()` (`handle_write` does nothing), "
               "`loop(timeout=0)`, per iteration. pp_docs_N: 64-byte ping-pong over N "
               "socketpairs, both ends in the map, the asyncore docs' channel (`writable()` "
               "→ `bool(self.buffer)`, `handle_read` `recv(8192)`s and queues the reply); "
               "pp_dws_N: the same with `dispatcher_with_send` (no predicate overridden, "
               "replies with `send()`); per message delivered (a round trip is 2 messages). "
               "Rows ending in -poll run `loop(use_poll=True)`, the others "
               "`loop(use_poll=False)`; -pyloop: the C backend with the Python loop "
               "(`FASTASYNCORE_LOOP=py`). CPU × %s: against the cheaper of %s select and "
               "poll (per cell median), and against the same mode; cffi vs pure: "
               "pure's CPU ÷ this row's, same mode (> 1: the C backend is cheaper)."
               % (std_name, std_name))
    out.append("")
    out.append("Median CPU per unit (in brackets: × the cheaper %s mode):" % std_name)
    out.append("")
    cols = [i for i in BUSY_IMPLS if any(k[1] == i for k in busy)]
    out.append("| workload | unit | " + " | ".join(row_label(c, "", stdlib_label)
                                                    for c in cols) + " |")
    out.append("|---|---|" + "---:|" * len(cols))
    for wid, spec in wids:
        std = busy_best_std(busy, wid)
        row = []
        for c in cols:
            s = busy.get((wid, c))
            if s is None:
                row.append("")
            elif s.get("error"):
                row.append("error")
            else:
                r = ratio(s["cpu_per_unit"], std["cpu_per_unit"]) if std else None
                row.append("%s%s" % (fmt_num(s["cpu_per_unit"]),
                                     " (%s)" % fmt_ratio(r) if r is not None else ""))
        out.append("| %s | %s | %s |" % (wid, busy_unit(spec), " | ".join(row)))
    out.append("")
    out.append("Every cell (loop: the `use_poll` mode, and for fastasyncore the loop that "
               "ran, C or Python, where the package reports it):")
    out.append("")
    out.append("| workload | implementation | loop | CPU µs per unit: median (min–max) "
               "| CPU × %s | CPU × %s same mode | cffi vs pure | units/s (wall) | µs/iter "
               "| runs |" % (std_name, std_name))
    out.append("|---|---|---|---:|---:|---:|---:|---:|---:|---|")
    for wid, spec in wids:
        std = busy_best_std(busy, wid)
        for impl in BUSY_IMPLS:
            s = busy.get((wid, impl))
            if s is None:
                continue
            label = row_label(_busy_base(impl), "", stdlib_label)
            mode = "poll" if impl.endswith("-poll") else "select"
            if s.get("loop_impl") and impl.startswith("fastasyncore"):
                mode += ", %s loop" % {"c": "C", "py": "Python"}.get(s["loop_impl"],
                                                                     s["loop_impl"])
            if s.get("error"):
                out.append("| %s | %s | %s | %s | | | | | | |" % (wid, label, mode, s["error"]))
                continue
            same = busy.get((wid, busy_same_mode(impl, "asyncore")))
            r_best = ratio(s["cpu_per_unit"], std["cpu_per_unit"]) if std else None
            r_same = (ratio(s["cpu_per_unit"], same["cpu_per_unit"])
                      if same and not same.get("error") else None)
            cvp = None
            if impl.startswith("fastasyncore-cffi"):
                pure = busy.get((wid, busy_same_mode(impl, "fastasyncore-pure")))
                if pure and not pure.get("error"):
                    cvp = ratio(pure["cpu_per_unit"], s["cpu_per_unit"])
            runs = "%d" % s["n"]
            if s["disturbed"]:
                runs += " (%d disturbed%s)" % (s["disturbed"],
                                               ", kept" if s["used_disturbed"] else "")
            out.append("| %s | %s | %s | %s (%s–%s) | %s | %s | %s | %s | %s | %s |" % (
                wid, label, mode, fmt_num(s["cpu_per_unit"]), fmt_num(s["cpu_min"]),
                fmt_num(s["cpu_max"]),
                fmt_ratio(r_best), fmt_ratio(r_same), fmt_ratio(cvp),
                fmt_num(s["throughput"]), fmt_num(s.get("us_per_iter")), runs))
    out.append("")
    return "\n".join(out)


def busy_run(ctx, wid, spec, impl, scale):
    """One run of a busy small map workload: its own worker process, pinned."""
    run = {"workload": wid, "impl": impl, "variant": "", "kind": "busy"}
    count = max(10, int(spec["count"] * scale))
    argv = [sys.executable, "-m", "fastasyncore._bench.worker", "busy", "--impl", impl,
            "--which", spec["which"], "--pairs", str(spec["pairs"] or 1),
            "--count", str(count), "--warmup", str(max(2, count // 10)),
            "--timeout", "60"]
    res, err = run_json(argv, child_env(impl), ctx.cpus[0], 120, ctx.workdir)
    if res is None:
        run["error"] = err
        return run
    run.update(res)
    run["throughput"] = res["units_per_s"]
    run["cpu_per_unit"] = res["cpu_us_per_unit"]
    run["us_per_iter"] = res["cpu_us_per_iter"]
    run["disturbed"] = res.get("other_load") is not None and res["other_load"] > DISTURBED_SHARE
    if res.get("errors"):
        run["error"] = "%d channel error(s): %s" % (res["errors"], res.get("first_error"))
    return run


def busy_impls(available, wanted, std_ok):
    """The busy rows to run: stdlib (both modes) always when available, as the reference."""
    out = []
    for impl in BUSY_IMPLS:
        if impl in STDLIB:
            if std_ok:
                out.append(impl)
            continue
        base = _busy_base(impl)
        if "cffi" in impl and not available.get("fastasyncore-cffi"):
            continue
        if wanted is not None and impl not in wanted and base not in wanted:
            continue
        out.append(impl)
    return out


def run_busy(ctx, workloads, impls, runs, retries, scale, progress):
    """Every busy cell; runs go round-robin over the implementations, so drift
    during the invocation touches every row alike.  -> (runs, {(wid, impl): summary})."""
    all_runs, cells = [], {}
    for wid, kind, spec in workloads:
        if kind != "busy":
            continue
        progress("[%s] in-process busy map: %s" % (wid, ", ".join(impls)))
        per = {impl: [] for impl in impls}
        extra = {impl: 0 for impl in impls}
        failed = set()
        rnd = 0
        while True:
            todo = [i for i in impls if i not in failed and
                    len(per[i]) < runs + extra[i]]
            if not todo:
                break
            rnd += 1
            for impl in todo:
                r = busy_run(ctx, wid, spec, impl, scale)
                r["run"] = len(per[impl]) + 1
                per[impl].append(r)
                all_runs.append(r)
                if r.get("error"):
                    progress("[%s] %s: %s" % (wid, impl, r["error"]))
                    failed.add(impl)
                elif r.get("disturbed"):
                    progress("[%s] %s run %d disturbed (other load %.0f%%)" % (
                        wid, impl, r["run"], 100 * r["other_load"]))
                    if extra[impl] < retries:
                        extra[impl] += 1
            progress("[%s] round %d of %d: %s" % (
                wid, rnd, runs, ", ".join("%s %s" % (i, fmt_num(per[i][-1].get("cpu_per_unit")))
                                          for i in todo)))
        for impl in impls:
            cells[(wid, impl)] = summarize_cell(per[impl])
            loops = sorted({r["loop_info"]["loop"] for r in per[impl]
                            if (r.get("loop_info") or {}).get("loop")})
            if loops:
                cells[(wid, impl)]["loop_impl"] = "/".join(loops)
    return all_runs, cells


# --------------------------------------------------------------------------
# targets (performance.md and issue 3)

def evaluate_targets(cells, micro):
    """-> list of (target, verdict, detail); verdict is met / missed / n/a."""
    res = []

    def cell(w, impl, var=""):
        s = cells.get((w, impl, var))
        return s if s and not s.get("error") else None

    def best_std(w, var=""):
        return reference(cells, w, var, STDLIB)

    fa = [i for i in ("fastasyncore-cffi", "fastasyncore-pure")]

    def add(name, ok, detail):
        res.append((name, "n/a" if ok is None else ("met" if ok else "missed"), detail))

    for w in ("W1_c100", "W1_c1000"):
        std, c = best_std(w), cell(w, "c-epoll")
        for impl in fa:
            s = cell(w, impl)
            if not s or not std:
                continue
            r1 = s["cpu_per_unit"] / std["cpu_per_unit"]
            r2 = s["cpu_per_unit"] / c["cpu_per_unit"] if c else None
            r3 = s["throughput"] / std["throughput"]
            ok = r1 <= 0.85 and (r2 is None or r2 <= 1.15) and r3 >= 1.0
            add("%s %s: CPU/req ≤ 0.85× stdlib, ≤ 1.15× C; req/s ≥ stdlib" % (w, impl), ok,
                "CPU %.2f× stdlib, %s C; req/s %.2f× stdlib" % (
                    r1, "%.2f×" % r2 if r2 else "n/a", r3))
    w = "W2_echo_c8"
    uv = cell(w, "uvloop")
    for var in ("", "docs", "managed"):
        std = best_std(w, var)
        for impl in fa:
            s = cell(w, impl, var)
            if s and std:
                r1 = s["throughput"] / std["throughput"]
                r2 = s["throughput"] / uv["throughput"] if uv else None
                add("%s%s %s: ≥ 2× stdlib MB/s, ≥ uvloop" % (w, " " + var if var else "", impl),
                    r1 >= 2 and (r2 is None or r2 >= 1),
                    "%.2f× stdlib, %s uvloop (CPU/GB %.2f× stdlib)" % (
                        r1, "%.2f×" % r2 if r2 else "n/a",
                        s["cpu_per_unit"] / std["cpu_per_unit"]))
    for impl in fa:
        s0, s1 = cell("W3_idle0", impl, "managed"), cell("W3_idle10000", impl, "managed")
        std = cell("W3_idle10000", "asyncore-poll", "managed")
        uv = cell("W3_idle10000", "uvloop")
        if s0 and s1 and std:
            flat = s1["us_per_iter"] / s0["us_per_iter"] if s0.get("us_per_iter") and \
                s1.get("us_per_iter") else None
            r1 = s1["throughput"] / std["throughput"]
            r2 = s1["throughput"] / uv["throughput"] if uv else None
            add("W3 managed %s: µs/iter independent of idle; ≥ 100× stdlib poll; ≥ uvloop"
                % impl, (flat is None or flat <= 1.5) and r1 >= 100 and (r2 is None or r2 >= 1),
                "µs/iter 10k idle ÷ 0 idle = %s; %.0f× stdlib poll; %s uvloop" % (
                    "%.2f" % flat if flat else "n/a", r1, "%.2f×" % r2 if r2 else "n/a"))
        s1 = cell("W3_idle10000", impl, "docs")
        std = cell("W3_idle10000", "asyncore-poll", "docs")
        if s1 and std:
            r1 = s1["throughput"] / std["throughput"]
            add("W3 docs-pattern %s: ≥ 10× stdlib poll; select mode past fd 1024" % impl,
                r1 >= 10, "%.0f× stdlib poll (fastasyncore rows run loop() in select mode "
                "with fds > 10,000)" % r1)
    w = "W4_client"
    std, uv = best_std(w), cell(w, "uvloop")
    for impl in fa:
        s = cell(w, impl)
        if s and std:
            r1 = s["throughput"] / std["throughput"]
            r2 = s["throughput"] / uv["throughput"] if uv else None
            add("W4 %s: ≥ 1.25× stdlib req/s; ≥ 1.5× uvloop" % impl,
                r1 >= 1.25 and (r2 is None or r2 >= 1.5),
                "%.2f× stdlib, %s uvloop" % (r1, "%.2f×" % r2 if r2 else "n/a"))
    plain = cell("chat_lines", "asyncore-select", "plain") or cell(
        "chat_lines", "asyncore-poll", "plain")
    for impl in fa:
        s = cell("chat_lines", impl, "chat")
        if s and plain:
            r = s["cpu_per_unit"] / plain["cpu_per_unit"]
            add("chat_lines %s: CPU/req ≤ stdlib plain dispatcher's" % impl, r <= 1.0,
                "%.2f× stdlib plain dispatcher" % r)
        s = cell("chat_flood", impl, "chat")
        std = min((c for c in (cell("chat_flood", i, "chat") for i in STDLIB) if c),
                  key=lambda c: c["cpu_per_unit"], default=None)
        if s and std:
            r = std["cpu_per_unit"] / s["cpu_per_unit"]
            add("chat_flood %s: ≥ 3× cheaper than stdlib" % impl, r >= 3, "%.1f× cheaper" % r)
    # pure never slower than stdlib on any row.  Judged on CPU per unit (the
    # process's own CPU time), which other load disturbs far less than
    # throughput; 5% tolerance.
    slower = []
    checked = 0
    for (w, impl, var), s in cells.items():
        if impl != "fastasyncore-pure" or s.get("error") or not s.get("cpu_per_unit"):
            continue
        std = min((c for c in (cells.get((w, i, var)) for i in STDLIB)
                   if c and not c.get("error") and c.get("cpu_per_unit")),
                  key=lambda c: c["cpu_per_unit"], default=None)
        if std:
            checked += 1
            r = s["cpu_per_unit"] / std["cpu_per_unit"]
            if r > 1.05:
                slower.append("%s%s %.2f×" % (w, "/" + var if var else "", r))
    if checked:
        add("pure backend: never slower than stdlib (CPU per unit ÷ best stdlib, ≤ 1.05)",
            not slower, "slower on: " + ", ".join(slower) if slower else
            "%d rows checked" % checked)
    ahead, behind = [], []
    for (w, impl, var), s in cells.items():
        if impl != "fastasyncore-cffi" or s.get("error") or not s.get("cpu_per_unit"):
            continue
        p = cells.get((w, "fastasyncore-pure", var))
        if p and not p.get("error") and p.get("cpu_per_unit"):
            r = p["cpu_per_unit"] / s["cpu_per_unit"]
            (ahead if r >= 1.0 else behind).append("%s%s %.2f×" % (w, "/" + var if var else "", r))
    if ahead or behind:
        add("C vs pure: the C backend ahead (CPU per unit, pure ÷ cffi)", not behind,
            "ahead: %s; behind: %s" % (", ".join(ahead) or "-", ", ".join(behind) or "-"))
    # issue 3 micro targets
    idle = (micro.get("micro_idle") or {}).get("rows", [])
    for kind, limit in (("managed-dws", 60), ("managed-chat", 60), ("override", 8)):
        base = next((r for r in idle if r["kind"] == kind and r["impl"] == "asyncore-poll"
                     and r.get("runs_us")), None)
        for r in idle:
            if r["kind"] != kind or not r["impl"].startswith("fastasyncore") or not base:
                continue
            if not r.get("runs_us"):
                add("issue 3 idle %s %s ≤ 1/%d stdlib poll" % (kind, r["impl"], limit), False,
                    r.get("error", "?"))
                continue
            q = statistics.median(base["runs_us"]) / statistics.median(r["runs_us"])
            floor = next((f for f in idle if f["kind"] == kind and f["impl"] == "floor"), None)
            extra = ""
            if floor:
                extra = "; the writable() calls alone cost 1/%.0f" % (
                    statistics.median(base["runs_us"]) / statistics.median(floor["runs_us"]))
            add("issue 3 idle %s %s: ≤ 1/%d of stdlib poll per iteration" % (
                kind, r["impl"], limit), q >= limit, "1/%.0f (%.2f µs vs %.0f µs)%s" % (
                    q, statistics.median(r["runs_us"]), statistics.median(base["runs_us"]),
                    extra))
    sb = (micro.get("micro_sendbuf") or {}).get("rows", [])

    def growth(impl):
        vals = sorted((r["bytes"], statistics.median(r["runs_s"])) for r in sb
                      if r["impl"] == impl)
        return (vals[-1][1] / vals[0][1], vals) if len(vals) >= 2 and vals[0][1] > 0 else \
            (None, vals)

    fq, _ = growth("floor")
    sq, _ = growth("asyncore-select")
    for impl in dict.fromkeys(r["impl"] for r in sb):
        q, vals = growth(impl)
        if q is not None and impl.startswith("fastasyncore"):
            add("issue 3 dispatcher_with_send %s: %d MiB ≤ 12× %d MiB" % (
                impl, vals[-1][0] >> 20, vals[0][0] >> 20), q <= 12, "%.1f×%s%s" % (
                    q, "; stdlib %.0f×" % sq if sq else "",
                    "; raw socket sends (floor) %.1f×" % fq if fq else ""))
    ch = (micro.get("micro_chat") or {}).get("rows", [])
    for wl, limit in (("flood", 1 / 3), ("lines", 1.0)):
        base = next((r for r in ch if r["workload"] == wl and r["impl"] == "asyncore-select"),
                    None)
        for r in ch:
            if r["workload"] != wl or not r["impl"].startswith("fastasyncore") or not base:
                continue
            q = statistics.median(r["runs_s"]) / statistics.median(base["runs_s"])
            add("issue 3 async_chat %s %s: CPU ≤ %s stdlib" % (
                wl, r["impl"], "1/3" if wl == "flood" else "1×"), q <= limit * 1.0001,
                "%.3f× stdlib" % q)
    return res


def targets_table(targets):
    lines = ["| target | verdict | measured |", "|---|---|---|"]
    for name, verdict, detail in targets:
        lines.append("| %s | **%s** | %s |" % (name, verdict, detail))
    return "\n".join(lines)


# --------------------------------------------------------------------------
# plot

def plot(cells, order, path, title):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no chart (pip install 'fastasyncore[bench]')"
    groups = []
    for wid, kind, spec in order:
        if kind not in ("server", "client"):
            continue
        variants = [var for (w, impl, var) in cells if w == wid and var != "plain"]
        if any(variants):
            variants = [v for v in variants if v]   # "" rows are drawn in every group
        for var in variants:
            if (wid, var) not in groups:
                groups.append((wid, var))
    impls = [i for i in SERVER_IMPLS if any(k[1] == i for k in cells)]
    if not groups or not impls:
        return "nothing to plot"
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.1 * len(groups)), 8))
    width = 0.8 / len(impls)
    for ax, key, ylabel in ((axes[0], "throughput", "throughput ÷ best stdlib asyncore"),
                            (axes[1], "cpu_per_unit", "CPU per unit ÷ best stdlib asyncore")):
        for k, impl in enumerate(impls):
            xs, ys = [], []
            for g, (wid, var) in enumerate(groups):
                s = cells.get((wid, impl, var)) or cells.get((wid, impl, ""))
                ref = reference(cells, wid, var, STDLIB)
                if not s or s.get("error") or not ref or not s.get(key) or not ref.get(key):
                    continue
                xs.append(g - 0.4 + width * (k + 0.5))
                ys.append(s[key] / ref[key])
            ax.bar(xs, ys, width, label=impl)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_ylabel(ylabel)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(["%s%s" % (w, "\n" + v if v else "") for w, v in groups],
                           fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8, ncol=4)
    axes[0].set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return "chart written to %s" % path


# --------------------------------------------------------------------------
# main

class Ctx:
    pass


def select_workloads(only, quick):
    ids = [w[0] for w in WORKLOADS]
    if only:
        want = [x.strip() for x in only.split(",") if x.strip()]
        chosen = []
        for w in want:
            if w == "busy":
                chosen += [b for b in BUSY if b not in chosen]
                continue
            hits = [i for i in ids if i == w or i.startswith(w + "_") or
                    (w.endswith("*") and i.startswith(w[:-1]))]
            if not hits:
                hits = [i for i in ids if i.lower().startswith(w.lower())]
            if not hits:
                raise SystemExit("bench: unknown workload %r; known: %s" % (w, ", ".join(ids)))
            chosen += [h for h in hits if h not in chosen]
        return [w for w in WORKLOADS if w[0] in chosen]
    if quick:
        return [w for w in WORKLOADS if w[0] in QUICK]
    return list(WORKLOADS)


def build_parser(parser=None):
    p = parser or argparse.ArgumentParser(prog="python -m fastasyncore bench")
    p.add_argument("--quick", action="store_true",
                   help="a subset, 1 run per cell, short windows (about a minute)")
    p.add_argument("--only", metavar="IDS",
                   help="comma-separated workload ids or prefixes (W1, W3_idle10000, micro, "
                        "pp, busy = %s, ...)" % ",".join(BUSY))
    p.add_argument("--impls", metavar="NAMES",
                   help="comma-separated implementations (default: all available): "
                        + ", ".join(SERVER_IMPLS) + "; busy-map rows also: "
                        + ", ".join(i for i in BUSY_IMPLS if i not in SERVER_IMPLS)
                        + " (a fastasyncore name selects both its loop modes; the stdlib "
                        "rows of the busy maps always run, as the reference)")
    p.add_argument("--busy-scale", type=float, default=None,
                   help="multiply the busy-map workloads' counts (default 1, quick 0.3)")
    p.add_argument("--json", metavar="FILE", help="write every run and the summaries as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="write a chart (needs matplotlib)")
    p.add_argument("--runs", type=int, help="measured runs per cell (default 3, quick 1)")
    p.add_argument("--duration", type=float, help="seconds per measured window (default 1.0)")
    p.add_argument("--warmup", type=float, help="warm-up seconds per run (default 0.3)")
    p.add_argument("--max-requests", type=int, default=0,
                   help="end a window after this many requests (default: no cap)")
    p.add_argument("--idle", type=int, help="idle connections for W3_idle10000 (default 10000)")
    p.add_argument("--w4-conns", type=int, help="W4 connections (default 1000)")
    p.add_argument("--micro-idle", type=int, help="idle channels in micro_idle (default 8000)")
    p.add_argument("--replot", metavar="JSON",
                   help="no benchmarks: re-render the table (and --plot) from a --json file")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return p


def _git_commit():
    """The git commit of the fastasyncore tree being measured, if it is a checkout."""
    import fastasyncore
    src = os.path.dirname(os.path.dirname(os.path.abspath(fastasyncore.__file__)))
    if os.path.basename(src) != "src":      # an installed package, not a checkout
        return None
    root = os.path.dirname(src)
    try:
        p = subprocess.run(["git", "-C", root, "describe", "--always", "--dirty"],
                           capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout.strip() or None if p.returncode == 0 else None


def render(meta, notes, all_runs, cells, micro, workloads, std_label, args, out, progress,
           busy=None):
    """Markdown report on out; chart and JSON when asked."""
    report = []
    title = "fastasyncore %s, %s, %s, %s" % (meta["fastasyncore"], meta["python"],
                                              meta["cpu"], meta["date"])
    report.append("## fastasyncore benchmarks")
    report.append("")
    report.append("%s (%s); %s, %d CPUs; %s; fastasyncore %s%s; %d run(s) per cell, "
                  "%.1f s windows after %.1f s warm-up." % (
                      meta["python"], meta["platform"], meta["cpu"], meta["cpus"],
                      meta["date"], meta["fastasyncore"],
                      " (%s)" % meta["commit"] if meta.get("commit") else "",
                      meta["runs_per_cell"], meta["window_s"], meta["warmup_s"]))
    report.append("%s. Ratios: against the better of stdlib asyncore select/poll "
                  "in the same workload (same server pattern), and against uvloop. "
                  "CPU is the process under test's utime+stime. A run is *disturbed* when "
                  "other processes used > %d%% of a pinned CPU during its window; the median "
                  "uses clean runs when at least half are clean. A workload's runs go "
                  "round-robin over its cells (run 1 of each, then run 2 ...), so drift "
                  "touches every cell alike." % (
                      meta["pinning"], DISTURBED_SHARE * 100))
    report.append("")
    if cells:
        report.append("### Summary: median throughput (CPU of the process under test "
                      "per unit)")
        report.append("")
        report.append(compact_table(cells, workloads, std_label))
        report.append("")
        report.append("### Every cell")
        report.append("")
        report.append(server_table(cells, workloads, std_label))
        report.append("")
        st = split_table(cells, workloads, std_label)
        if st:
            report.append(st)
    mt = micro_tables(micro, std_label)
    if mt:
        report.append(mt)
    bt = busy_tables(busy or {}, workloads, std_label)
    if bt:
        report.append(bt)
    targets = evaluate_targets(cells, micro)
    if targets:
        report.append("### Targets")
        report.append("")
        report.append(targets_table(targets))
        report.append("")
    if notes:
        report.append("Notes:")
        for n in dict.fromkeys(notes):
            report.append("- " + n)
        report.append("")
    print("\n".join(report), file=out, flush=True)
    if args.plot:
        msg = plot(cells, workloads, args.plot, title)
        print(msg, file=sys.stderr if "written" in msg else out)
    if args.json:
        doc = {"meta": meta, "notes": list(dict.fromkeys(notes)), "runs": all_runs,
               "cells": [dict(workload=w, impl=i, variant=v, **s)
                         for (w, i, v), s in cells.items()],
               "micro": micro,
               "busy": [dict(workload=w, impl=i, mode="poll" if i.endswith("-poll") else
                             "select", **s) for (w, i), s in (busy or {}).items()],
               "targets": [dict(target=t, verdict=v, measured=d) for t, v, d in targets]}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        progress("JSON written to %s" % args.json)


def replot(args, out=sys.stdout):
    """Re-render the table (and --plot/--json) from a JSON file of an earlier run."""
    with open(args.replot) as f:
        doc = json.load(f)
    cells = {}
    for c in doc.get("cells", []):
        c = dict(c)
        key = (c.pop("workload"), c.pop("impl"), c.pop("variant"))
        cells[key] = c
    busy = {}
    for c in doc.get("busy", []):
        c = dict(c)
        c.pop("mode", None)
        busy[(c.pop("workload"), c.pop("impl"))] = c
    present = {k[0] for k in cells} | set(doc.get("micro", {})) | {k[0] for k in busy}
    workloads = [w for w in WORKLOADS if w[0] in present]
    meta = doc["meta"]
    meta.setdefault("runs_per_cell", 0)
    if args.json and os.path.abspath(args.json) == os.path.abspath(args.replot):
        raise SystemExit("bench: --json must not overwrite the --replot input")
    render(meta, doc.get("notes", []), doc.get("runs", []), cells, doc.get("micro", {}),
           workloads, meta.get("stdlib_asyncore") or "stdlib", args, out,
           Progress(quiet=args.quiet), busy=busy)
    return 0


def run(args, out=sys.stdout):
    if getattr(args, "replot", None):
        return replot(args, out)
    progress = Progress(quiet=args.quiet)
    quick = args.quick or args.tiny
    runs = args.runs or (1 if quick else 3)
    ctx = Ctx()
    ctx.seq = 0
    ctx.duration = args.duration or (0.1 if args.tiny else 0.3 if quick else 1.0)
    ctx.warmup = args.warmup if args.warmup is not None else (
        0.05 if args.tiny else 0.1 if quick else 0.3)
    ctx.setup_timeout = 30 if args.tiny else 90
    ctx.max_requests = args.max_requests
    ctx.w4_conns = args.w4_conns or (20 if args.tiny else None)
    ctx.load_limit = (os.cpu_count() or 1) * 1.5
    ctx.cpus = pick_cpus()
    idle_n = args.idle or (200 if args.tiny else 2000 if quick else 10000)
    micro_idle_n = args.micro_idle or (100 if args.tiny else 2000 if quick else 8000)
    workloads = select_workloads(args.only, quick)
    if args.tiny and not args.only:
        workloads = [w for w in WORKLOADS if w[0] in ("W1_c1",)]

    notes = []
    workdir = tempfile.mkdtemp(prefix="fastasyncore-bench-")
    ctx.workdir = workdir
    try:
        import fastasyncore
        meta = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "cpu": cpu_model(), "cpus": os.cpu_count(),
            "python": "%s %s" % (platform.python_implementation(), platform.python_version()),
            "platform": platform.platform(), "fastasyncore": fastasyncore.__version__,
            "pinning": ("process under test on CPU %d, its peer on CPU %d" % ctx.cpus
                        if ctx.cpus[0] is not None else "not pinned (fewer than 2 CPUs)"),
            "runs_per_cell": runs, "window_s": ctx.duration, "warmup_s": ctx.warmup,
            "argv": sys.argv[1:], "quick": quick,
        }
        if ctx.cpus[0] is None:
            notes.append("fewer than 2 CPUs available: server and load generator are not pinned")
        if any(kind in ("server", "client") for _, kind, _ in workloads):
            ctx.fabench, msg = build_c(workdir, progress)
        else:       # micro-benchmarks and busy maps need no load generator
            ctx.fabench, msg = None, None
        if ctx.fabench is None and msg:
            notes.append(msg + "; the socket workloads (W1-W4, chat_*) need it and are "
                         "skipped, the micro-benchmarks still run")
        std_ok, std_label = have_stdlib_asyncore()
        if not std_ok:
            notes.append(std_label + ": stdlib asyncore rows skipped")
            std_label = "stdlib"
        meta["stdlib_asyncore"] = std_label if std_ok else None
        available = {"asyncio": True, "c-epoll": ctx.fabench is not None,
                     "asyncore-select": std_ok, "asyncore-poll": std_ok,
                     "fastasyncore-pure": True, "fastasyncore-cffi": have_cffi_core(),
                     "uvloop": have_module("uvloop")}
        if not available["uvloop"]:
            notes.append("uvloop is not installed: no uvloop rows "
                         "(pip install uvloop to compare with it)")
        if not available["fastasyncore-cffi"]:
            notes.append("the C core (fastasyncore._core) is not built: no fastasyncore-cffi rows")
        wanted = None
        if args.impls:
            wanted = [x.strip() for x in args.impls.split(",") if x.strip()]
            known = SERVER_IMPLS + [i for i in BUSY_IMPLS if i not in SERVER_IMPLS]
            bad = [x for x in wanted if x not in known]
            if bad:
                raise SystemExit("bench: unknown implementation(s) %s; known: %s"
                                 % (", ".join(bad), ", ".join(known)))
        if args.tiny and wanted is None:
            wanted = ["fastasyncore-cffi" if available["fastasyncore-cffi"]
                      else "fastasyncore-pure"]
        meta["available"] = available
        for n in notes:
            progress("note: " + n)

        all_runs = []
        cells = {}
        micro = {}
        for wid, kind, spec in workloads:
            if kind == "busy":
                continue
            if kind == "micro":
                which = spec["which"]
                mimpls = [m for m in MICRO_IMPLS if
                          (std_ok or not m.startswith("asyncore")) and
                          (available["fastasyncore-cffi"] or "cffi" not in m)]
                if wanted is not None:
                    mimpls = [m for m in mimpls if any(m.startswith(w) for w in wanted)
                              or m.startswith("asyncore")]
                if which == "sendbuf":
                    mimpls = [m for m in mimpls if not m.endswith("-poll") or
                              m == "asyncore-poll"]
                    mimpls = [m for m in mimpls if m != "asyncore-poll"]
                if which == "chat":
                    mimpls = [m for m in mimpls if not m.endswith("-poll")]
                argv = [sys.executable, "-m", "fastasyncore._bench.worker", "micro",
                        "--which", which, "--impls", ",".join(mimpls),
                        "--repeats", str(max(3, runs) if not args.tiny else 1)]
                if which == "idle":
                    argv += ["--idle", str(micro_idle_n), "--target",
                             "0.02" if args.tiny else "0.05" if quick else "0.2"]
                elif which == "sendbuf":
                    argv += ["--sizes", "1,2" if args.tiny else "1,8" if quick else "4,32"]
                else:
                    argv += ["--flood-kib", "64" if args.tiny else "256" if quick else "1024",
                             "--lines-kib", "64" if args.tiny else "1024" if quick else "4096"]
                progress("[%s] in-process micro-benchmark: %s" % (wid, ", ".join(mimpls)))
                b0 = cpu_busy(ctx.cpus[1]) if ctx.cpus[1] is not None else None
                res, err = run_json(argv, child_env("fastasyncore-pure"), ctx.cpus[0], 600,
                                    workdir)
                if res is None:
                    micro[wid] = {"error": err, "rows": []}
                    progress("[%s] failed: %s" % (wid, err))
                else:
                    micro[wid] = res
                    for name, why in res.get("skipped", []):
                        notes.append("%s: %s skipped: %s" % (wid, name, why))
                del b0
                continue
            if ctx.fabench is None:
                continue
            impls = list(spec.get("impls", SERVER_IMPLS))
            if wanted is not None:
                impls = [i for i in impls if i in wanted]
            cell_list = []
            for impl in impls:
                if not available.get(impl):
                    continue
                variants = spec.get("variants", ("",))
                if impl in ("asyncio", "uvloop", "c-epoll"):
                    variants = ("",)
                if kind == "server" and spec.get("pattern", "").startswith("chat"):
                    variants = ("chat",)
                for var in variants:
                    cell_list.append((impl, var))
            if spec.get("plain"):
                for impl in STDLIB:
                    if available.get(impl) and (wanted is None or impl in wanted):
                        cell_list.append((impl, "plain"))
            # Round-robin over the cells (run 1 of each, then run 2 ...), as
            # the busy rows do: this guest's speed drifts by 10-20% over a
            # minute, and a cell's runs taken one after the other would carry
            # that drift into the ratios between cells.
            cell_state = {c: {"runs": [], "extra": 0, "done": False} for c in cell_list}
            while True:
                todo = [c for c in cell_list if not cell_state[c]["done"] and
                        len(cell_state[c]["runs"]) < runs + cell_state[c]["extra"]]
                if not todo:
                    break
                for impl, var in todo:
                    cs = cell_state[(impl, var)]
                    i = len(cs["runs"]) + 1
                    progress("[%s] %s%s run %d of %d" % (wid, impl, " (%s)" % var if var else "",
                                                         i, runs + cs["extra"]))
                    if kind == "server":
                        r = server_run(ctx, wid, spec, impl, var)
                    else:
                        r = client_run(ctx, wid, spec, impl)
                    r["run"] = i
                    cs["runs"].append(r)
                    all_runs.append(r)
                    if r.get("error"):
                        progress("[%s] %s: %s" % (wid, impl, r["error"]))
                        cs["done"] = True
                        continue
                    if r.get("disturbed"):
                        progress("[%s] %s run %d disturbed (other load %s)" % (
                            wid, impl, i, "%.0f%%" % (100 * r["other_load"])
                            if r.get("other_load") is not None else "high loadavg"))
                        if cs["extra"] < 2 and not args.tiny:
                            cs["extra"] += 1
            for impl, var in cell_list:
                cells[(wid, impl, var)] = summarize_cell(cell_state[(impl, var)]["runs"])

        busy = {}
        if any(kind == "busy" for _, kind, _ in workloads):
            bimpls = busy_impls(available, wanted, std_ok)
            scale = args.busy_scale or (0.02 if args.tiny else 0.3 if quick else 1.0)
            bruns = 1 if args.tiny else max(3, runs)
            meta["busy"] = {"runs_per_cell": bruns, "scale": scale,
                            "counts": {w: max(10, int(spec["count"] * scale))
                                       for w, kind, spec in workloads if kind == "busy"}}
            if "FASTASYNCORE_LOOP" in os.environ:
                notes.append("FASTASYNCORE_LOOP=%s from the environment is not passed on: "
                             "fastasyncore rows run the default loop, -pyloop rows "
                             "FASTASYNCORE_LOOP=py" % os.environ["FASTASYNCORE_LOOP"])
            if any("-pyloop" in i for i in bimpls):
                notes.append("-pyloop rows set FASTASYNCORE_LOOP=py; a fastasyncore without "
                             "that switch ignores it (those rows then run the default loop)")
            bres, busy = run_busy(ctx, workloads, bimpls, bruns, 0 if args.tiny else 2,
                                  scale, progress)
            all_runs += bres
            odd = sorted({"%s (%s)" % (i, s_["loop_impl"]) for (w, i), s_ in busy.items()
                          if "-pyloop" in i and s_.get("loop_impl") not in (None, "py")})
            if odd:
                notes.append("FASTASYNCORE_LOOP=py did not give the Python loop: %s"
                             % ", ".join(odd))

        meta["commit"] = _git_commit()
        render(meta, notes, all_runs, cells, micro, workloads, std_label, args, out, progress,
               busy=busy)
        return 0 if cells or micro or busy else 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv=None):
    args = build_parser().parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
