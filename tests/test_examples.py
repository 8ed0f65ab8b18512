"""examples/http_client.py against a local http.server on 127.0.0.1."""

import hashlib
import http.server
import importlib.util
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from _subproc import need_backend, subprocess_env

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "http_client.py"



# Large enough to need many recv(8192) calls, deterministic, not all one byte.
BODY = b"".join(hashlib.sha256(b"%d" % i).hexdigest().encode() + b"\n"
                for i in range(20000))  # 1.3 MB


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def do_GET(self):
        if self.path != "/blob":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def _load_example():
    spec = importlib.util.spec_from_file_location("fastasyncore_example_http_client", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _split(response):
    head, sep, body = response.partition(b"\r\n\r\n")
    assert sep, "no end of headers in %r" % response[:200]
    return head, body


@pytest.mark.timeout(60)
def test_http_client_example_in_process(http_server):
    example = _load_example()
    response = example.main("127.0.0.1", http_server, "/blob", timeout=20)
    head, body = _split(response)
    assert head.startswith(b"HTTP/1.0 200"), head
    assert b"Content-Length: %d" % len(BODY) in head
    assert len(body) == len(BODY)
    assert body == BODY


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["pure", "cffi"])
def test_http_client_example_script(http_server, backend, tmp_path):
    """Run the example as a program, as a user would, under each backend."""
    need_backend(backend)
    env = subprocess_env(FASTASYNCORE_BACKEND=backend)
    proc = subprocess.run([sys.executable, str(EXAMPLE), "127.0.0.1", str(http_server), "/blob"],
                          env=env, cwd=str(tmp_path), capture_output=True, timeout=45)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    head, body = _split(proc.stdout)
    assert head.startswith(b"HTTP/1.0 200"), head
    assert body == BODY


@pytest.mark.timeout(60)
def test_http_client_example_404(http_server):
    example = _load_example()
    response = example.main("127.0.0.1", http_server, "/missing", timeout=20)
    assert response.startswith(b"HTTP/1.0 404")
