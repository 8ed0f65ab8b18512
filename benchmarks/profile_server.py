"""Profile one implementation on one workload: where does the server's time go?

    python benchmarks/profile_server.py W1_c100 fastasyncore-cffi [--variant managed]
        [--seconds 3] [--top 25] [--sort tottime]

Runs the same server as the harness (fastasyncore._bench.worker serve) under
cProfile, pinned to the first CPU, drives it with the C load generator pinned
to the second for ``--seconds``, then prints the top functions.  For W4 the
client under test is profiled against the C HTTP server instead.
Bounded like the harness: subprocess timeouts, the server stops on stdin EOF.
"""

import argparse
import os
import pstats
import subprocess
import sys
import tempfile

try:
    import fastasyncore  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "src"))

from fastasyncore._bench import runner  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("workload")
    p.add_argument("impl")
    p.add_argument("--variant", default="")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--sort", default="tottime")
    args = p.parse_args(argv)
    spec = dict(next((s for w, k, s in runner.WORKLOADS if w == args.workload), None) or {})
    kind = next((k for w, k, s in runner.WORKLOADS if w == args.workload), None)
    if kind is None or kind == "micro":
        raise SystemExit("profile: need a socket workload id, e.g. W1_c100, W3_idle10000, "
                         "W4_client, chat_lines")
    workdir = tempfile.mkdtemp(prefix="fastasyncore-prof-")
    exe, msg = runner.build_c(workdir, lambda m: print(m, file=sys.stderr))
    if exe is None:
        raise SystemExit(msg)
    prof = os.path.join(workdir, "prof.out")
    cpu_s, cpu_l = runner.pick_cpus()
    env = runner.child_env(args.impl)
    if kind == "client":
        srv = runner.Server([exe, "server", "--mode", "http", "--max-seconds", "300"],
                            dict(os.environ), cpu_l, workdir, "http")
        port = srv.port()
        try:
            subprocess.run([sys.executable, "-m", "cProfile", "-o", prof, "-m",
                            "fastasyncore._bench.worker", "w4client", "--impl", args.impl,
                            "--port", str(port), "--conns", str(spec["conns"]), "--rounds",
                            str(spec["rounds"])], env=env, timeout=120,
                           preexec_fn=runner.pinned(cpu_s), cwd=workdir)
        finally:
            srv.stop()
    else:
        pattern = spec.get("pattern", "docs")
        if args.variant == "managed":
            pattern = "managed"
        srv = runner.Server([sys.executable, "-m", "cProfile", "-o", prof, "-m",
                             "fastasyncore._bench.worker", "serve", "--impl", args.impl,
                             "--pattern", pattern, "--max-seconds", "300"],
                            env, cpu_s, workdir, "srv")
        try:
            port = srv.port()
            if port is None:
                raise SystemExit("server did not start")
            cargv = [exe, "client", "--port", str(port), "--mode", spec["mode"],
                     "--conns", str(spec["conns"]), "--idle", str(spec.get("idle", 0)),
                     "--warmup", "0.2", "--duration", str(args.seconds)]
            for key in ("size", "reply", "fill"):
                if key in spec:
                    cargv += ["--" + key, str(spec[key])]
            res, err = runner.run_json(cargv, None, cpu_l, args.seconds + 120, workdir)
            print("load generator:", res or err, file=sys.stderr)
        finally:
            srv.stop(timeout=60)
    st = pstats.Stats(prof)
    st.strip_dirs().sort_stats(args.sort).print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
