"""``python -m fastasyncore demo|info|run|bench``, each in a subprocess."""

import subprocess
import sys
import textwrap

import pytest

from _subproc import REQUIRE_CORE, core_status, need_backend, subprocess_env

pytestmark = pytest.mark.timeout(120)


def _cli(*args, cwd=None, env=None, timeout=90):
    return subprocess.run([sys.executable, "-m", "fastasyncore"] + list(args),
                          cwd=cwd, env=env if env is not None else subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("backend", ["pure", "cffi"])
@pytest.mark.parametrize("use_poll", [False, True])
def test_demo(backend, use_poll, tmp_path):
    need_backend(backend)
    args = ["demo", "--clients", "50", "--duration", "0.5"]
    if use_poll:
        args.append("--use-poll")
    proc = _cli(*args, cwd=str(tmp_path), env=subprocess_env(FASTASYNCORE_BACKEND=backend))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "backend:       %s" % backend in out
    assert "poller:" in out
    assert "50 connected, 50 accepted" in out
    assert "requests/s:" in out
    assert "errors:" not in out


def test_demo_request_cap(tmp_path):
    proc = _cli("demo", "--clients", "10", "--duration", "30", "--requests", "200",
                cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Stops at the cap, long before the 30 s duration.
    line = [l for l in proc.stdout.splitlines() if "requests:" in l and " in " in l][0]
    assert int(line.split()[1]) >= 200
    assert float(line.split(" in ")[1].split()[0]) < 25


def test_demo_bad_arguments():
    proc = _cli("demo", "--clients", "0")
    assert proc.returncode != 0 and "--clients" in proc.stderr


def test_info(tmp_path):
    proc = _cli("info", cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    for key in ("fastasyncore:", "backend:", "poller:", "loop:", "python:", "platform:",
                "C core:", "core path:", "C loop:", "C loop path:"):
        assert key in proc.stdout
    core_line = _info_line(proc.stdout, "C core:")
    assert ("not built" not in core_line) == core_status()[0], core_line
    cloop_line = _info_line(proc.stdout, "C loop:")
    assert ("not built" not in cloop_line) == _cloop_built(), cloop_line


def _info_line(out, key):
    return [l for l in out.splitlines() if l.startswith(key)][0][len(key):].strip()


def _cloop_built():
    proc = subprocess.run([sys.executable, "-c", "import fastasyncore._cloop"],
                          env=subprocess_env(), capture_output=True, timeout=60)
    return proc.returncode == 0


@pytest.mark.parametrize("backend,loop", [("cffi", "auto"), ("cffi", "py"), ("pure", "auto")])
def test_info_tells_which_loop_runs(backend, loop, tmp_path):
    need_backend(backend)
    proc = _cli("info", cwd=str(tmp_path),
                env=subprocess_env(FASTASYNCORE_BACKEND=backend, FASTASYNCORE_LOOP=loop))
    assert proc.returncode == 0, proc.stderr
    line = _info_line(proc.stdout, "loop:")
    if backend == "pure":
        assert line == "Python (the pure backend always runs the Python loop)", line
    elif loop == "py":
        assert line == "Python (FASTASYNCORE_LOOP=py)", line
    elif _cloop_built():
        assert line == "C (fastasyncore._cloop)", line
    else:
        assert not REQUIRE_CORE, "FASTASYNCORE_REQUIRE_CORE=1 but _cloop is not built"
        assert line.startswith("Python (fastasyncore._cloop "), line


LEGACY = textwrap.dedent("""\
    import sys
    import asyncore
    import asynchat
    import fastasyncore
    assert asyncore is fastasyncore.asyncore, asyncore
    assert asynchat is fastasyncore.asynchat, asynchat

    class Echo(asyncore.dispatcher_with_send):
        def handle_read(self):
            self.send(self.recv(1024))

    print("ARGV", sys.argv[1:])
    print("NAME", __name__)
    sys.exit(int(sys.argv[1]))
    """)


def test_run_script(tmp_path):
    script = tmp_path / "legacy_prog.py"
    script.write_text(LEGACY)
    proc = _cli("run", str(script), "7", "-v", "--flag", cwd=str(tmp_path))
    assert proc.returncode == 7, proc.stderr
    assert "ARGV ['7', '-v', '--flag']" in proc.stdout
    assert "NAME __main__" in proc.stdout
    assert "DeprecationWarning" not in proc.stderr


def test_run_module(tmp_path):
    (tmp_path / "legacy_mod.py").write_text(LEGACY)
    proc = _cli("run", "-m", "legacy_mod", "0", cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "ARGV ['0']" in proc.stdout


def test_run_missing_script(tmp_path):
    proc = _cli("run", str(tmp_path / "nope.py"))
    assert proc.returncode != 0
    assert "no such file" in proc.stderr


def test_no_command_prints_help():
    proc = _cli()
    assert proc.returncode == 2
    assert "demo" in proc.stderr and "run" in proc.stderr


def test_bench_help():
    # The benchmarks themselves are exercised by tests/test_bench_smoke.py.
    proc = _cli("bench", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout


@pytest.mark.parametrize("backend", ["pure", "cffi"])
def test_demo_tls(backend, tmp_path):
    pytest.importorskip("trustme")
    need_backend(backend)
    proc = _cli("demo", "--tls", "--clients", "20", "--duration", "0.5",
                cwd=str(tmp_path), env=subprocess_env(FASTASYNCORE_BACKEND=backend))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "handshakes:    20/20" in proc.stdout
    assert "requests/s:" in proc.stdout and "errors:" not in proc.stdout


def test_demo_tls_without_trustme(tmp_path):
    code = ("import sys; sys.modules['trustme'] = None\n"
            "from fastasyncore.__main__ import main\n"
            "sys.exit(main(['demo', '--tls', '--duration', '0.2']))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path),
                          env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "trustme" in proc.stderr and proc.stdout == ""
