#!/usr/bin/env bash
# Packs what bench/triton_vs_torch.py needs on a GPU machine that has CPython 3.12 with torch and transformers but no
# package registry (issue [7 of 8]) into one archive small enough to carry with a call (under 64 MiB):
#   site/                    ragq's own dependencies for the benchmark and tritonclient (HTTP and gRPC), CPython 3.12
#                            wheels at this environment's versions; torch, transformers and numpy stay the machine's
#   unpacked/                the tritonserver folder of the nvidia-pytriton wheel as tests/triton_server.py unpacks
#                            it, trimmed to the binary, the Python backend with the 3.12 stub, and its libraries
# Usage (here):      bash bench/triton_carry.sh [ARCHIVE]          default .carry/triton-gpu.tar.xz
# On the GPU machine: mkdir -p /tmp/c && tar -xJf .carry/triton-gpu.tar.xz -C /tmp/c &&
#   PYTHONPATH=/tmp/c/site RAGQ_PYTRITON_CACHE=/tmp/c python3 bench/triton_vs_torch.py --device cuda:0 ...
set -euo pipefail
cd "$(dirname "$0")/.."
archive=${1:-.carry/triton-gpu.tar.xz}
python=${PYTHON:-.venv/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# the server folder, unpacked from the wheel by the same code the tests use (pip fetches the wheel once)
server=$("$python" -c 'from tests.triton_server import server_dir; print(server_dir())')
unpacked=$(dirname "$(dirname "$server")")
mkdir -p "$work/unpacked/pytriton/tritonserver/backends"
cp -r "$server/bin" "$server/caches" "$work/unpacked/pytriton/tritonserver/"
mkdir -p "$work/unpacked/pytriton/tritonserver/backends/python"
cp "$server/backends/python/libtriton_python.so" "$server/backends/python/triton_python_backend_utils.py" \
  "$work/unpacked/pytriton/tritonserver/backends/python/"
cp "$server/python_backend_stubs/3.12/triton_python_backend_stub" \
  "$work/unpacked/pytriton/tritonserver/backends/python/"
mkdir -p "$work/unpacked/nvidia_pytriton.libs"
# every library but the wheel's own libpython (pytriton's, not the stub's: the stub links the machine's)
find "$unpacked/nvidia_pytriton.libs" -type f ! -name 'libpython3*' -exec cp {} "$work/unpacked/nvidia_pytriton.libs/" \;

# CPython 3.12 wheels at the versions this environment runs
names="annotated-types dill doclang docling-core jsonref latex2mathml mpire multiprocess platformdirs
prometheus-client pydantic pydantic-core pydantic-settings python-dotenv semchunk tree-sitter tree-sitter-c
tree-sitter-javascript tree-sitter-python tree-sitter-typescript typing-extensions typing-inspection wcwidth
tritonclient python-rapidjson gevent geventhttpclient greenlet zope.event zope.interface brotli grpcio protobuf"
pins=$("$python" - $names <<'EOF'
import sys
from importlib.metadata import version
print(" ".join(f"{n}=={version(n)}" for n in sys.argv[1:]))
EOF
)
platform=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_5_x86_64
          --platform manylinux1_x86_64)
# shellcheck disable=SC2086
"$python" -m pip install --quiet --no-deps --no-compile --target "$work/site" "${platform[@]}" $pins
rm -rf "$work/site/bin"
find "$work" -name __pycache__ -prune -exec rm -rf {} +

mkdir -p "$(dirname "$archive")"
tar -C "$work" -cf - site unpacked | xz -T0 -6 > "$work/archive.tar.xz"   # no half-written archive on failure
mv "$work/archive.tar.xz" "$archive"
ls -l "$archive"
