#!/usr/bin/env bash
# make container-test: a Docker daemon and a python:3.11-slim base (both made
# here when missing), then the container tests, which build the image with
# `make containerize` (tag sd35:latest) and run it. make container-test-cuda:
# the same for the CUDA image (tests/test_container_cuda.py, tag sd35:cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/docker-daemon.sh
scripts/base-image.sh
# The compose tests use Debian's docker-compose (v1).
command -v docker-compose >/dev/null || {
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null
}
# CONTAINER_TESTS=tests/test_container_cuda.py: the CUDA image instead (make container-test-cuda).
exec .venv/bin/python -m pytest -m container "${CONTAINER_TESTS:-tests/test_container.py}" "$@"
