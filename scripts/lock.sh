#!/usr/bin/env bash
# Regenerate the lock files from requirements.txt and requirements-dev.txt (`make lock`).
#
#   requirements.lock        every runtime package but torch, with hashes: the
#                            image and `make install` install exactly this
#   requirements-dev.lock    the same versions plus the test tools (`make install`)
#   requirements-torch.lock  torch from PyPI (the CUDA 13 build) with the CUDA
#                            libraries it pulls in, with hashes: the image's torch
#   bench/gpu/bundle.lock    what the lent GPU machine lacks of the runtime lock,
#                            for Python 3.12 (`make gpu-bundle` downloads it)
#
# torch itself is left out of the first two because its builds differ: the CPU
# build, PyPI's CUDA 13 build and PyTorch's CUDA 12 builds have different hashes
# and different dependencies (nvidia-*, triton). Resolving against a CPU build
# keeps every CUDA library out of them; what is left are the dependencies all
# builds share, at the same versions in all three files.
#
# TORCH_CPU_WHEELS: a directory or flat index holding torch's CPU build
# (default: the wheel pip picks on this machine, which must be a +cpu build;
# elsewhere e.g. https://download.pytorch.org/whl/cpu/torch/).
set -euo pipefail
cd "$(dirname "$0")/.."
uv="${UV:-uv}"
common=(--quiet --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28
    --custom-compile-command "make lock")

wheels="${TORCH_CPU_WHEELS:-}"
if [ -z "$wheels" ]; then
    wheels=build/torch-wheel
    rm -rf "$wheels"
    wheel="$(scripts/torch-wheel.sh "$wheels")"
    case "$wheel" in
        *+cpu-*) ;;
        *) echo "pip picks $wheel here, not a CPU build: set TORCH_CPU_WHEELS" >&2; exit 1 ;;
    esac
fi

"$uv" pip compile requirements.txt "${common[@]}" --find-links "$wheels" --no-emit-package torch \
    -o requirements.lock
"$uv" pip compile requirements-dev.txt "${common[@]}" --find-links "$wheels" --no-emit-package torch \
    -c requirements.lock -o requirements-dev.lock
grep -E '^torch==' requirements.txt | "$uv" pip compile - "${common[@]}" -c requirements.lock \
    -o requirements-torch.lock
# The wheels the lent GPU machine lacks follow the runtime lock (bench/gpu/bundle.py).
"${PYTHON:-python3}" -m bench.gpu.bundle lock
