"""A real Triton Inference Server for tests and benchmarks, from the `nvidia-pytriton` wheel: it carries Triton's
server binary, the Python backend and its stubs. Only the server is used (pytriton's own Python package, with its
numpy<2 pin, is never installed): the wheel is fetched once with pip into a cache (RAGQ_PYTRITON_CACHE) and
unpacked; the stub runs with the calling environment's packages, numpy 2 included."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

WHEEL = "nvidia-pytriton==0.7.0"


def server_dir(cache: Path | None = None) -> Path:
    """The unpacked tritonserver folder (bin/, backends/python with this Python's stub, and the shared libraries)."""
    cache = cache or Path(os.environ.get("RAGQ_PYTRITON_CACHE", Path.home() / ".cache" / "ragq" / "pytriton"))
    out = cache / "unpacked"
    server = out / "pytriton" / "tritonserver"
    stub = server / "backends" / "python" / "triton_python_backend_stub"
    if stub.exists():
        return server
    cache.mkdir(parents=True, exist_ok=True)
    wheels = list(cache.glob("nvidia_pytriton-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(cache), WHEEL],
                       check=True)
        wheels = list(cache.glob("nvidia_pytriton-*.whl"))
    with zipfile.ZipFile(wheels[0]) as wheel:
        for member in wheel.namelist():
            if member.startswith(("pytriton/tritonserver/", "nvidia_pytriton.libs/")):
                wheel.extract(member, out)
    for path in (server / "bin").iterdir():
        path.chmod(0o755)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    shutil.copyfile(server / "python_backend_stubs" / version / "triton_python_backend_stub", stub)
    stub.chmod(0o755)
    return server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TritonServer:
    """tritonserver in explicit model-control mode over `repository`, on free local ports."""

    def __init__(self, repository: Path, log_path: Path) -> None:
        self.repository = repository
        self.log_path = log_path
        self.http_port, self.grpc_port, self.metrics_port = _free_port(), _free_port(), _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"grpc://127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self, timeout_s: float = 120.0) -> TritonServer:
        server = server_dir()
        libs = server.parent.parent / "nvidia_pytriton.libs"
        # the Python backend's stub does not see PYTHONPATH: ragq writes its paths beside each model.py instead
        # the 3.x stub links libpython3.x: this interpreter's LIBDIR, where a non-system Python keeps it
        libdirs = [str(libs), str(sysconfig.get_config_var("LIBDIR") or ""), os.environ.get("LD_LIBRARY_PATH", "")]
        env = dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join(p for p in libdirs if p))
        self.repository.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [str(server / "bin" / "tritonserver"), f"--model-repository={self.repository}",
             "--model-control-mode=explicit", f"--backend-directory={server / 'backends'}",
             f"--http-port={self.http_port}", f"--grpc-port={self.grpc_port}", f"--metrics-port={self.metrics_port}",
             "--allow-metrics=true", "--log-verbose=0", "--exit-timeout-secs=5"],
            env=env, stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
        import tritonclient.http as http

        client = http.InferenceServerClient(f"127.0.0.1:{self.http_port}")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited ({self.process.returncode}): "
                                   f"{self.log_path.read_text()[-3000:]}")
            try:
                if client.is_server_ready():
                    return self
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            time.sleep(0.2)
        raise RuntimeError(f"tritonserver did not become ready in {timeout_s:.0f}s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
