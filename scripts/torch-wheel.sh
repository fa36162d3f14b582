#!/usr/bin/env bash
# Put the torch wheel that pip picks on this machine into DIR (no dependencies).
#
# On the CPU-only development and CI machines that is the local CPU build
# (pip's configuration points at it), which `make lock` resolves torch's
# dependencies from and `make container-test` serves to the image build.
set -euo pipefail
dir="$1"
python="${PYTHON:-python3}"
pin="$(grep -E '^torch==' "$(dirname "$0")/../requirements.txt")"
mkdir -p "$dir"
"$python" -m pip download --quiet --no-deps --only-binary=:all: --dest "$dir" "$pin"
ls "$dir"/torch-*.whl
