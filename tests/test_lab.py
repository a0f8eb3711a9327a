"""``make lab`` is what readers start: JupyterLab on tutorials/, with the secure-ai kernel as default.

The test takes the command from the Makefile itself (``make -n``, so the environment is not rebuilt),
starts it headless on a free port, and talks to it through jupyter_server's REST API and, for the kernel,
jupyter_client.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from jupyter_client import BlockingKernelClient

from tools.book import series

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "secure-ai-test-token"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def lab_command(port: int) -> list[str]:
    """The recipe of ``make lab`` with headless arguments, as make would run it (not rebuilding .venv)."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    args = f"--no-browser --port={port} --port-retries=0 --ip=127.0.0.1 --IdentityProvider.token={TOKEN}"
    venv = sys.prefix  # the environment these tests run in (.venv, or .venv312 for Python 3.12)
    dry = subprocess.run(["make", "-n", "-o", f"{venv}/.installed", "lab", f"VENV={venv}",
                          f"LAB_ARGS={args}"], cwd=ROOT, capture_output=True, text=True, check=True)
    lines = [line for line in dry.stdout.splitlines() if " lab " in f" {line} "]
    assert len(lines) == 1, dry.stdout
    return shlex.split(lines[0])


def api(port: int, path: str, method: str = "GET", body: dict | None = None):
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"token {TOKEN}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        text = response.read().decode()
        return response.status, (json.loads(text) if text and path.startswith("/api") else text)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    port, runtime = free_port(), tmp_path_factory.mktemp("jupyter-runtime")
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(runtime))
    server = subprocess.Popen(lab_command(port), cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                api(port, "/api/status")
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"JupyterLab did not start:\n{server.stderr.read()[-3000:]}") from None
                time.sleep(0.5)
        yield port, runtime
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()


def test_lab_serves_the_tutorials(lab):
    port, _ = lab
    status, listing = api(port, "/api/contents")
    names = {item["name"] for item in listing["content"]}
    expected = {p.name for p in series()} | {"secure_ai"}   # the chapters and the appendices
    assert expected <= names, f"JupyterLab serves {sorted(names)}, not tutorials/"
    status, page = api(port, "/lab")
    assert status == 200 and "JupyterLab" in page


def test_the_default_kernel_is_secure_ai_and_imports_the_helper(lab):
    port, runtime = lab
    _, specs = api(port, "/api/kernelspecs")
    assert specs["default"] == "secure-ai"
    # A reader opens a chapter: a session for that notebook, with the server's default kernel.
    notebook = sorted((ROOT / "tutorials").glob("Part-*.ipynb"))[0].name
    _, session = api(port, "/api/sessions", "POST", {"path": notebook, "type": "notebook", "kernel": {}})
    kernel = session["kernel"]
    assert kernel["name"] == "secure-ai"
    client = BlockingKernelClient(connection_file=str(runtime / f"kernel-{kernel['id']}.json"))
    client.load_connection_file()
    client.start_channels()
    try:
        deadline = time.monotonic() + 90
        while True:  # a kernel still starting misses heartbeats, which the client takes for dead
            try:
                client.wait_for_ready(timeout=30)
                break
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        seen = []
        reply = client.execute_interactive(
            "import sys, secure_ai; print(secure_ai.__file__); print(sys.prefix)",
            timeout=60, output_hook=lambda msg: seen.append(msg["content"].get("text", "")),
        )
        assert reply["content"]["status"] == "ok", reply["content"]
        module, prefix = "".join(seen).split()
        assert Path(module).resolve() == (ROOT / "tutorials" / "secure_ai" / "__init__.py").resolve()
        # the project's environment: .venv, or the one `make test VENV=...` runs in (.ci/run's .venv312)
        assert Path(prefix).resolve() == Path(sys.prefix).resolve(), "the kernel must run on this venv"
    finally:
        client.stop_channels()
        api(port, f"/api/sessions/{session['id']}", "DELETE")
