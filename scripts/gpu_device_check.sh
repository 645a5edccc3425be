#!/bin/sh
# The GPU device check (scripts/gpu_device_check.py) on a lent GPU machine, which has PyTorch and
# NVML's bindings but not shieldml's other dependencies, and no package registry.
#
#   here:   scripts/gpu_device_check.sh --fetch     # wheels for CPython 3.12 into .whl/ (ignored)
#   there:  sh scripts/gpu_device_check.sh          # with .whl carried; writes $OUT/gpu_check.json
#
# The versions are the ones the test suite runs with (`.venv/bin/pip freeze`). A broker is part of
# the check (it verifies the GPU's evidence), so its stack travels too. About 20 MB.
set -eu
WHEELS="cryptography==50.0.2 cffi==2.1.1 pycparser==3.12 cbor2==6.3.0 signxml==5.2.0
fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0
annotated-doc==0.0.7 typing-inspection==0.4.5 typing_extensions==4.16.0 uvicorn==0.55.0
httptools==0.9.0 SQLAlchemy==2.1.9 greenlet pyOpenSSL==26.4.0 anyio==4.16.0 h11==0.16.0"
if [ "${1:-}" = "--fetch" ]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
    # shellcheck disable=SC2086
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl $WHEELS
    du -sh .whl
    exit 0
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade .whl/*.whl
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
nvidia-smi conf-compute -f 2>/dev/null || echo "nvidia-smi conf-compute: not available"
export PYTHONUNBUFFERED=1
python3 scripts/gpu_device_check.py --runs "${RUNS:-3}" --out "${OUT:-/tmp/gpu-check}"
