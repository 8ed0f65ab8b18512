"""The benchmark harness runs (tiniest configuration): no timing assertions.

``python -m fastasyncore bench --tiny`` runs W1 with one connection for a
fraction of a second against one fastasyncore backend, through the real C
load generator, server subprocess, pinning, /proc CPU accounting, table,
JSON and chart code; so the harness cannot rot silently.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(180)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    import importlib.util
    env = dict(os.environ)
    spec = importlib.util.find_spec("fastasyncore")
    if spec is not None and spec.submodule_search_locations:
        where = os.path.dirname(list(spec.submodule_search_locations)[0])
        env["PYTHONPATH"] = os.pathsep.join(
            [where] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def _bench(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "fastasyncore", "bench", "--tiny"] + list(args),
                          cwd=str(tmp_path), env=_env(), capture_output=True, text=True,
                          timeout=150)


def _have_cc():
    return sys.platform.startswith("linux") and bool(
        os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc"))


def test_tiny_socket_workload(tmp_path):
    out = tmp_path / "bench.json"
    png = tmp_path / "bench.png"
    proc = _bench(tmp_path, "--json", str(out), "--plot", str(png))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| workload | implementation |" in proc.stdout
    # progress on stderr: workload, implementation, run i of n
    assert "[W1_c1]" in proc.stderr and "run 1 of" in proc.stderr
    doc = json.loads(out.read_text())
    assert doc["meta"]["python"]
    if not _have_cc():
        assert any("compiler" in n for n in doc["notes"])
        return
    runs = [r for r in doc["runs"] if r["workload"] == "W1_c1"]
    assert runs, doc
    for r in runs:
        assert not r.get("error"), r
        assert r["requests"] > 0 and r["throughput"] > 0
        assert r["server_cpu"] >= 0
        # (the kernel's part, from the same /proc ticks as the whole)
        assert 0 <= r["server_sys"] <= r["server_cpu"] + 1e-9
        assert r["sys_per_unit"] == pytest.approx(r["server_sys"] / r["requests"] * 1e5)
    assert "### User and kernel CPU" in proc.stdout
    again = subprocess.run([sys.executable, "-m", "fastasyncore", "bench", "--replot", str(out)],
                           cwd=str(tmp_path), env=_env(), capture_output=True, text=True,
                           timeout=60)
    assert again.returncode == 0, again.stderr
    assert "| W1_c1 |" in again.stdout
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in proc.stdout
    else:
        assert png.exists() and png.stat().st_size > 0


def test_tiny_micro_benchmarks(tmp_path):
    out = tmp_path / "micro.json"
    proc = _bench(tmp_path, "--only", "micro_sendbuf,micro_chat,micro_idle", "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    for key in ("micro_sendbuf", "micro_chat", "micro_idle"):
        assert not doc["micro"][key].get("error"), doc["micro"][key]
        rows = doc["micro"][key]["rows"]
        assert any(r["impl"].startswith("fastasyncore") for r in rows)
    assert "micro_sendbuf" in proc.stdout and "### Targets" in proc.stdout


def test_tiny_busy_maps(tmp_path):
    """The in-process busy small map rows: one worker per run, tiny counts."""
    out = tmp_path / "busy.json"
    proc = _bench(tmp_path, "--only", "busy", "--impls",
                  "fastasyncore-cffi,fastasyncore-cffi-pyloop,fastasyncore-pure",
                  "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "### In-process busy small maps" in proc.stdout
    doc = json.loads(out.read_text())
    ids = ["spin", "spin_timer", "pp_docs_1", "pp_docs_100", "pp_dws_1", "pp_dws_100"]
    assert sorted(doc["meta"]["busy"]["counts"]) == sorted(ids)
    cells = {(c["workload"], c["impl"]): c for c in doc["busy"]}
    for wid in ids:
        assert "| %s |" % wid in proc.stdout
        for impl in ("fastasyncore-pure", "fastasyncore-pure-poll"):
            c = cells[(wid, impl)]
            assert not c.get("error"), c
            assert c["n"] == 1 and c["cpu_per_unit"] > 0 and c["throughput"] > 0
            assert c["mode"] == ("poll" if impl.endswith("-poll") else "select")
    runs = [r for r in doc["runs"] if r.get("kind") == "busy"]
    assert runs and all(not r.get("error") and r["units"] > 0 for r in runs), runs
    # the rows' environment: backend from the name, the Python loop for -pyloop
    for r in runs:
        info = r["loop_info"]
        if r["impl"].startswith("fastasyncore-"):
            assert info["FASTASYNCORE_BACKEND"] == r["impl"].split("-")[1]
            assert info["FASTASYNCORE_LOOP"] == ("py" if "-pyloop" in r["impl"] else None)
    again = subprocess.run([sys.executable, "-m", "fastasyncore", "bench", "--replot", str(out)],
                           cwd=str(tmp_path), env=_env(), capture_output=True, text=True,
                           timeout=60)
    assert again.returncode == 0, again.stderr
    assert "### In-process busy small maps" in again.stdout and "| pp_dws_100 |" in again.stdout


def test_w4_client_repeats_whole_batches_to_fill_its_window(tmp_path):
    """The W4 client runs whole batches (connections x rounds) until its
    measured window is --min-seconds long, counts every request of every
    batch, and splits its CPU into user and kernel time."""
    if not _have_cc():
        pytest.skip("the C HTTP server needs a C compiler on Linux")
    from fastasyncore._bench import runner
    exe, msg = runner.build_c(str(tmp_path), lambda m: None)
    if exe is None:
        pytest.skip(msg)
    srv = runner.Server([exe, "server", "--mode", "http", "--max-seconds", "60"],
                        dict(os.environ), None, str(tmp_path), "http")
    try:
        port = srv.port()
        assert port, "the C HTTP server did not start"
        res, err = runner.run_json(
            [sys.executable, "-m", "fastasyncore._bench.worker", "w4client", "--impl",
             "fastasyncore-cffi", "--port", str(port), "--conns", "4", "--rounds", "3",
             "--warmup-conns", "1", "--min-seconds", "0.3", "--timeout", "60"],
            _env(), None, 90, str(tmp_path))
    finally:
        srv.stop()
    assert res is not None, err
    assert res["errors"] == 0, res
    from fastasyncore._bench import worker
    assert 2 <= res["batches"] <= worker.MAX_W4_BATCHES
    assert res["requests"] == res["batches"] * 4 * 3
    # (batches this small may reach the bound on their count first)
    assert res["elapsed"] >= 0.3 or res["batches"] == worker.MAX_W4_BATCHES
    assert res["client_user"] >= 0 and res["client_sys"] >= 0
    assert res["client_cpu"] == pytest.approx(res["client_user"] + res["client_sys"])


def test_unknown_workload_is_an_error(tmp_path):
    proc = _bench(tmp_path, "--only", "W9_nonsense")
    assert proc.returncode != 0
    assert "unknown workload" in proc.stderr


def test_c_source_ships_with_the_package():
    import fastasyncore._bench as b
    path = os.path.join(os.path.dirname(b.__file__), "fabench.c")
    with open(path, encoding="utf-8") as f:
        assert "int main" in f.read()


def _instructions_row(tmp_path, row, unit, impl, scale):
    """Run benchmarks/instructions.py for one row and implementation; -> its
    Ir per unit (skips where the script or valgrind is missing)."""
    script = os.path.join(ROOT, "benchmarks", "instructions.py")
    if not os.path.exists(script):
        pytest.skip("benchmarks/instructions.py not in this tree")
    if shutil.which("valgrind") is None:
        pytest.skip("valgrind is not installed")
    proc = subprocess.run([sys.executable, script, "--rows", row, "--impls", impl,
                           "--scale", str(scale), "--jobs", "1"],
                          cwd=str(tmp_path), env=_env(), capture_output=True, text=True,
                          timeout=170)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    prefix = "| %s (per %s) | %s |" % (row, unit, impl)
    rows = [line for line in proc.stdout.splitlines() if line.startswith(prefix)]
    assert len(rows) == 1, proc.stdout
    return float(rows[0].split("|")[3].replace(",", ""))


def test_instruction_counts_script(tmp_path):
    """benchmarks/instructions.py (callgrind counts of the busy rows) runs:
    one row, one implementation, tiny counts."""
    ir = _instructions_row(tmp_path, "spin", "iteration", "fastasyncore-pure", 0.05)
    # a loop iteration is thousands of instructions, not zero or millions
    assert 500 < ir < 200000, ir


@pytest.mark.parametrize("impl", ["fastasyncore-pure", "hook-floor"])
def test_instruction_counts_script_tcp_row(tmp_path, impl):
    """Its TCP rows run the server under callgrind against the C load
    generator: one row, one implementation, a few hundred requests; also
    benchmarks/hook_floor.py's loop (--impls hook-floor: its extension
    built), on a row it is made for ..."""
    if not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler for the load generator")
    if not sys.platform.startswith("linux"):
        pytest.skip("the C load generator needs Linux")
    ir = _instructions_row(tmp_path, "W1_c100", "request", impl, 0.02)
    # a request (a read, a consult, a write) is thousands of instructions
    assert 1000 < ir < 500000, ir


def test_instruction_counts_refuse_the_hook_floor_on_other_rows(tmp_path):
    """... and refuses a run where it would count nothing."""
    script = os.path.join(ROOT, "benchmarks", "instructions.py")
    if not os.path.exists(script):
        pytest.skip("benchmarks/instructions.py not in this tree")
    proc = subprocess.run([sys.executable, script, "--rows", "spin", "--impls", "hook-floor"],
                          cwd=str(tmp_path), env=_env(), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "hook-floor counts only the rows W1_c100" in proc.stderr


def test_instruction_counts_refuse_a_w4_run_that_lost_requests(tmp_path):
    """A W4 count is divided by connections x rounds: a client run that
    reports fewer completed requests (a connection closed early) fails the
    row instead of skewing it."""
    script = os.path.join(ROOT, "benchmarks", "instructions.py")
    if not os.path.exists(script):
        pytest.skip("benchmarks/instructions.py not in this tree")
    if shutil.which("valgrind") is None:
        pytest.skip("valgrind is not installed")
    import importlib.util
    spec = importlib.util.spec_from_file_location("fa_instructions", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    argv = [sys.executable, "-c", 'print(\'{"ok": true, "requests": 3}\')']
    assert mod.callgrind_total(argv, _env(), str(tmp_path), "full", requests=3) > 0
    with pytest.raises(RuntimeError, match="3 requests completed, 4 expected"):
        mod.callgrind_total(argv, _env(), str(tmp_path), "short", requests=4)


def test_hook_floor_script(tmp_path):
    """benchmarks/hook_floor.py builds its floor loop and times it beside
    3.11's loop and the C loop through the harness's own runs: one round of
    W1_c100, short windows; every cell a positive number."""
    script = os.path.join(ROOT, "benchmarks", "hook_floor.py")
    if not os.path.exists(script):
        pytest.skip("benchmarks/hook_floor.py not in this tree")
    if not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler")
    if not sys.platform.startswith("linux"):
        pytest.skip("the C load generator needs Linux")
    try:
        from fastasyncore._bench import worker
        worker.stdlib_modules()
    except ImportError as exc:
        pytest.skip("no stdlib asyncore for the reference column: %s" % exc)
    import fastasyncore
    if fastasyncore.BACKEND != "cffi":
        pytest.skip("the C loop is not built")
    proc = subprocess.run([sys.executable, script, "--rows", "W1_c100", "--rounds", "1",
                           "--duration", "0.2", "--warmup", "0.05"],
                          cwd=str(tmp_path), env=_env(), capture_output=True, text=True,
                          timeout=170)
    if proc.returncode and "hook_floor.c failed" in proc.stderr:
        pytest.skip("no headers to build the floor: %s" % proc.stderr.strip()[-200:])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| W1_c100 |")]
    assert len(rows) == 1, proc.stdout
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    medians = [float(c.split()[0]) for c in cells[2:]]
    assert len(medians) == 6 and all(m > 0 for m in medians), rows[0]


def _issue10_module():
    script = os.path.join(ROOT, "benchmarks", "issue10.py")
    if not os.path.exists(script):
        pytest.skip("benchmarks/issue10.py not in this tree")
    import importlib.util
    spec = importlib.util.spec_from_file_location("fa_issue10", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cell(wid, impl, cpu, thr=1.0, var=""):
    return {"workload": wid, "impl": impl, "variant": var, "cpu_per_unit": cpu,
            "cpu_min": cpu, "cpu_max": cpu, "throughput": thr,
            "throughput_min": thr, "throughput_max": thr}


def test_issue10_table_verdicts():
    """benchmarks/issue10.py: each ratio against the cheaper stdlib mode,
    W4 on requests/s against the faster one; a target is met or missed by
    the unrounded ratio (1.298x ahead of pure is not 1.3x)."""
    mod = _issue10_module()
    busy = [dict(_cell("spin", "asyncore-select", 2.0), mode="select"),
            dict(_cell("spin", "asyncore-poll", 1.0), mode="poll"),
            dict(_cell("spin", "fastasyncore-cffi", 0.5), mode="select"),      # 0.5x: met
            dict(_cell("spin", "fastasyncore-pure", 1.05), mode="select"),     # 2.1x ahead
            dict(_cell("spin", "fastasyncore-cffi-poll", 0.5), mode="poll"),
            dict(_cell("spin", "fastasyncore-pure-poll", 0.649), mode="poll")]  # 1.298x
    cells = [_cell("W1_c100", "asyncore-select", 1.0), _cell("W1_c100", "asyncore-poll", 1.2),
             _cell("W1_c100", "fastasyncore-cffi", 0.91), _cell("W1_c100", "fastasyncore-pure", 1.1),
             _cell("W4_client", "asyncore-select", 2.0, 100.0),
             _cell("W4_client", "asyncore-poll", 1.9, 105.0),
             _cell("W4_client", "fastasyncore-cffi", 1.7, 116.0),
             _cell("W4_client", "fastasyncore-pure", 2.3, 90.0)]
    got = {r[0]: r for r in mod.rows({"busy": busy, "cells": cells})}
    assert got["spin (select)"][7] == "met" and got["spin (select)"][8] == "met"
    assert got["spin (poll)"][7] == "**missed**"            # ahead of pure 1.298x
    assert got["W1_c100"][7] == "**missed**"                # 0.91x
    assert got["W1_c100"][8] == "met"                       # 1.10x
    assert "**1.10×**" in got["W4_client"][3]               # 116 / 105 req/s
    assert got["W4_client"][7] == "met"                     # (1.105)
    assert got["W4_client"][8] == "**missed**"              # pure CPU 2.3 / 1.9
    assert "| spin (select) |" in mod.table({"busy": busy, "cells": cells})


def test_user_and_kernel_table_from_runs():
    """The report's user/kernel split: per cell the medians of each run's
    user part (CPU minus kernel) and kernel part, and each against the
    stdlib cell the other ratios use (the one with more throughput)."""
    from fastasyncore._bench import runner

    def run(impl, cpu, sys_, thr):
        return {"workload": "W1_c100", "impl": impl, "throughput": thr,
                "cpu_per_unit": cpu, "sys_per_unit": sys_}

    cells = {
        ("W1_c100", "asyncore-select", ""): runner.summarize_cell(
            [run("asyncore-select", 1.0, 0.7, 100.0), run("asyncore-select", 1.2, 0.8, 90.0),
             run("asyncore-select", 1.1, 0.8, 95.0)]),
        ("W1_c100", "asyncore-poll", ""): runner.summarize_cell(
            [run("asyncore-poll", 1.3, 0.9, 80.0)]),
        ("W1_c100", "fastasyncore-cffi", ""): runner.summarize_cell(
            [run("fastasyncore-cffi", 0.9, 0.72, 110.0), run("fastasyncore-cffi", 0.95, 0.75, 105.0),
             run("fastasyncore-cffi", 1.0, 0.8, 100.0)]),
    }
    c = cells[("W1_c100", "fastasyncore-cffi", "")]
    assert c["user_per_unit"] == pytest.approx(0.2)         # median of 0.18, 0.2, 0.2
    assert (c["user_min"], c["user_max"]) == (pytest.approx(0.18), pytest.approx(0.2))
    assert c["sys_per_unit"] == pytest.approx(0.75)
    spec = next(s for w, k, s in runner.WORKLOADS if w == "W1_c100")
    text = runner.split_table(cells, [("W1_c100", "server", spec)], "stdlib")
    line = next(ln for ln in text.splitlines() if "| fastasyncore-cffi |" in ln)
    # against asyncore-select (more throughput): user 0.2 / 0.3, kernel 0.75 / 0.8
    assert line.endswith("| 0.67× | 0.94× |"), line
    assert "| asyncore-poll | 0.4" in text
    # no split measured (another metric, or an older JSON): no table
    assert runner.split_table({}, [("W1_c100", "server", spec)], "stdlib") == ""


def test_issue10_several_runs():
    """benchmarks/issue10.py with several runs: each run's ratio, the median
    of the runs and the verdict on it, and in how many runs a target was met
    (a run without the row is not counted)."""
    mod = _issue10_module()

    def run(cffi, pure, w4=None):
        cells = [_cell("W1_c100", "asyncore-select", 1.0), _cell("W1_c100", "asyncore-poll", 1.2),
                 _cell("W1_c100", "fastasyncore-cffi", cffi),
                 _cell("W1_c100", "fastasyncore-pure", pure)]
        if w4 is not None:
            cells += [_cell("W4_client", "asyncore-select", 2.0, 100.0),
                      _cell("W4_client", "asyncore-poll", 2.0, 100.0),
                      _cell("W4_client", "fastasyncore-cffi", 1.8, w4),
                      _cell("W4_client", "fastasyncore-pure", 2.1, 95.0)]
        return {"busy": [], "cells": cells}

    docs = [run(0.85, 1.05, 120.0), run(0.95, 1.12, 105.0), run(0.88, 1.08)]
    got = {r[0]: r for r in mod.runs_rows(docs)}
    w1 = got["W1_c100"]
    assert w1[2] == "0.85× / **0.95×** / 0.88×"
    assert w1[3].startswith("0.88×")            # median of 0.85, 0.95, 0.88
    assert w1[4] == "met" and w1[5] == "2 of 3"
    assert w1[6] == "1.05× / **1.12×** / 1.08×" and w1[7] == "1.08×"
    assert w1[8] == "met" and w1[9] == "2 of 3"
    w4 = got["W4_client"]                        # only in the first two runs
    assert w4[5] == "1 of 2"
    assert w4[3].startswith("1.12×")            # median of 1.20 and 1.05
    assert w4[4] == "met"
    # a lead over pure below 1.3x is named where it is what missed
    spin = [dict(_cell("spin", "asyncore-select", 2.0), mode="select"),
            dict(_cell("spin", "asyncore-poll", 2.0), mode="select"),
            dict(_cell("spin", "fastasyncore-cffi", 0.5), mode="select"),
            dict(_cell("spin", "fastasyncore-pure", 0.6), mode="select")]
    row = mod.runs_rows([{"busy": spin, "cells": []}])[0]
    assert row[2] == "**0.25× (ahead 1.200×)**" and row[4] == "**missed**"
    assert "| W1_c100 |" in mod.runs_table(docs)
