"""Starts `turbine serve` for the client suites: the workspace's `target/release/turbine`
(built when missing; `TURBINE_BIN` overrides the path) on a free loopback port, waited for
and stopped afterwards."""

import contextlib
import os
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def binary() -> Path:
    override = os.environ.get("TURBINE_BIN")
    if override:
        return Path(override)
    path = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "release" / "turbine"
    if not path.is_file():
        subprocess.run(["cargo", "build", "--release", "-p", "turbine-shell"], cwd=ROOT, check=True)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(env=None, args=(), cafile=None):
    """Yields the server's base URL (https when `cafile`, the certificate to trust)."""
    port = free_port()
    full_env = dict(os.environ, OLLAMA_HOST=f"127.0.0.1:{port}", **(env or {}))
    full_env.pop("OLLAMA_API_KEY", None)
    proc = subprocess.Popen(
        [str(binary()), "serve", *args], env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"{'https' if cafile else 'http'}://127.0.0.1:{port}"
    context = ssl.create_default_context(cafile=cafile) if cafile else None
    deadline = time.monotonic() + 60
    try:
        while True:
            try:
                with urllib.request.urlopen(url + "/", timeout=2, context=context) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"turbine serve exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError("turbine serve did not answer within 60 s")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
