#!/usr/bin/env bash
# make gpu-rehearsal: bench/gpu/run.sh, every window, on this machine's CPU at reduced size, in an environment
# like the lent GPU machine's: Python 3.12, the versions bench/gpu/machine.txt pins (torch 2.11.0 is PyPI's CUDA
# build, ~2.7 GB, the only torch 2.11 for Python 3.12 there is; it runs on a CPU), and the bundle installed by
# run.sh exactly as it installs it there. bench/gpu/run.sh's header lists what still differs.
#
# The venv is kept while machine.txt is unchanged, and uv's cache keeps the wheels for a new one: only the
# first run downloads (~2.7 GB). Results: build/gpu-results/rehearsal.json and .md.
set -euo pipefail
cd "$(dirname "$0")/.."

python312="${GPU_PYTHON:-}"
if [ -z "$python312" ]; then
    for candidate in "$HOME/.pyenv/versions/3.12.1/bin/python" "$(command -v python3.12 || true)"; do
        [ -x "$candidate" ] && { python312="$candidate"; break; }
    done
fi
[ -x "$python312" ] || { echo "no Python 3.12: set GPU_PYTHON (pyenv install 3.12)" >&2; exit 1; }
work="${GPU_REHEARSAL_DIR:-build/gpu-rehearsal}"
venv="$work/venv"
stamp="$venv/.sd35-machine"
want="$("$python312" --version) $(sha256sum bench/gpu/machine.txt | cut -c1-16)"
# uv (from `make install`) downloads in parallel and keeps what it downloaded in its cache (~/.cache/uv),
# so a later venv, in this clone or another, installs without the network.
uv="${UV:-.venv/bin/uv}"

started=$(date +%s)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    rm -rf "$venv"
    mapfile -t pins < <(grep -E '^[A-Za-z0-9._-]+==' bench/gpu/machine.txt)
    # --seed: pip in the venv, which run.sh uses to install the bundle as it does on the GPU machine.
    "$uv" venv --quiet --seed --python "$python312" "$venv"
    "$uv" pip install --quiet --python "$venv/bin/python" "${pins[@]}"
    echo "$want" >"$stamp"
    echo "== the machine's packages installed in $venv in $(($(date +%s) - started)) s"
else
    echo "== reusing $venv (machine.txt unchanged)"
fi

# A fresh target each time: the rehearsal installs the bundle as the first call on a new machine does.
# The random checkpoint too: the first window builds and saves it, the later ones reuse it.
site="$work/site"
checkpoint="$work/checkpoint"
rm -rf "$site" "$checkpoint" build/gpu-results/rehearsal.json build/gpu-results/rehearsal.md
# Spinning OpenMP threads of one pool slow the other (the service's worker) on 2 cores.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
for window in ${GPU_WINDOWS:-first compile cache_dit nf4 offload batching combined}; do
    PYTHON="$venv/bin/python" SD35_GPU_SITE="$site" bench/gpu/run.sh --rehearse --window "$window" --checkpoint "$checkpoint"
done
echo "== rehearsal passed in $(($(date +%s) - started)) s: build/gpu-results/rehearsal.json"
