#!/usr/bin/env bash
# The one command to run on the lent GPU machine, from the repository root, with build/gpu-bundle carried:
#
#   bench/gpu/run.sh                      # the first window: ≤ 8 minutes on an H100
#   bench/gpu/run.sh --window compile     # later windows, one invocation each (see bench/gpu/scenarios.py)
#   bench/gpu/run.sh --rehearse ...       # here, on the CPU at reduced size (`make gpu-rehearsal`)
#
# device tool call:  command "bench/gpu/run.sh", carry ["build/gpu-bundle"], timeout_s 540.
# It installs the bundle with pip --no-index into a target directory (kept for the next call on the same
# machine), checks every version the service depends on (seconds: nothing wasted on a ModuleNotFoundError),
# then runs the window. Results go to bench/results/gpu-<date>-<device>.json and .md after every scenario,
# and to $OUT too when it is set (the only folder whose files come back); the log to $OUT/run-<window>.log.
# Any other option goes to `python -m bench.gpu` (--scenarios, --sequential, --env NAME=VALUE ...).
#
# What the rehearsal (make gpu-rehearsal) does differently from the GPU machine:
#   - Python 3.12.1 from pyenv, not 3.12.3; a venv holding machine.txt's pinned versions (torch 2.11.0 from
#     PyPI, CUDA 13.0 build, as there) and, for everything else those pins pull in, the newest versions pip
#     picks, where the machine has whatever its image has (check_env reports them there);
#   - the CPU, no GPU: the tiny architecture (sd35.tiny's sizes) in float32 at 256², a few requests; fp8 and
#     nf4 are skipped (they need CUDA), the memory caps compute what auto would pick for the full-size model
#     and serve the tiny one in that mode, and batching is measured in float32 and bf16;
#   - there the baseline is float32 and the quantized modes compute in bf16, and torch 2.11 draws a seed's
#     bf16 noise differently from its float32 noise (2.13 does not): their "MAD vs baseline" compares unrelated
#     images there; on the GPU every mode is bf16 and the comparison holds;
#   - OMP_WAIT_POLICY=PASSIVE (2 shared cores); nothing is judged against the targets; the results go to
#     build/gpu-results/rehearsal.json and .md.
# What only the GPU can show: CUDA memory figures and caps, fp8 and nf4, speed. The first window's length
# on an H100 is an estimate (~1.5 min to build and save the 27 GB checkpoint, ~1-1.5 min per served
# scenario, less for the caps); --deadline skips what would not end in time, with the reason.
set -euo pipefail
cd "$(dirname "$0")/../.."

python="${PYTHON:-python3}"
site="${SD35_GPU_SITE:-/tmp/sd35-gpu-site}"
# Seconds the window may take in all, install and checks included (the lent machine's call limit is 10
# minutes; 8 leave room to start and to copy the results back).
window_s="${WINDOW_SECONDS:-480}"
window=first
rehearse=()
passed=()
while [ $# -gt 0 ]; do
    case "$1" in
        --window) window="$2"; shift 2 ;;
        --window=*) window="${1#*=}"; shift ;;
        --rehearse) rehearse=(--rehearse); shift ;;
        --scenarios|--scenarios=*) window=custom; passed+=("$1"); shift ;;
        *) passed+=("$1"); shift ;;
    esac
done
started=$(date +%s)
# No network there: nothing may wait on the Hub or on BentoML's usage tracking.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 BENTOML_DO_NOT_TRACK=true
if [ -n "${OUT:-}" ]; then
    exec > >(tee -a "$OUT/run-$window.log") 2>&1
fi
echo "== sd35 GPU benchmark, window $window, $(date -Is)"

# 1. The bundle(s): build/gpu-bundle, and build/gpu-bundle-nf4 (bitsandbytes alone) when carried. A
#    target directory left by an earlier call on this machine is reused while its wheels are the same.
installed=0
for bundle in build/gpu-bundle build/gpu-bundle-nf4; do
    [ -d "$bundle" ] || continue
    stamp="$site/.sd35-$(basename "$bundle")"
    want="$(cd "$bundle" && ls -- *.whl | sort | sha256sum | cut -c1-16)"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        "$python" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
            --upgrade --target "$site" "$bundle"/*.whl
        echo "$want" >"$stamp"
        echo "installed $bundle ($(ls "$bundle"/*.whl | wc -l) wheels) into $site"
    else
        echo "$bundle: already in $site"
    fi
    installed=1
done
if [ "$installed" = 0 ] && [ ! -d "$site" ]; then
    echo "no build/gpu-bundle here and nothing installed in $site: run \`make gpu-bundle\` and carry build/gpu-bundle" >&2
    exit 2
fi
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"

# 2. Versions: everything the service needs, compatible; a GPU unless rehearsing.
expect=()
[ ${#rehearse[@]} -eq 0 ] && expect=(--expect-cuda)
"$python" -m bench.gpu.check_env "${expect[@]}" || { echo "environment check failed: nothing was run" >&2; exit 3; }

# 3. The window: no scenario starts that would end after the deadline (30 s kept to write and copy back).
deadline=$((started + window_s - 30))
select=()
[ "$window" != custom ] && select=(--window "$window")
mirror=()
[ -n "${OUT:-}" ] && mirror=(--mirror "$OUT")
echo "== $(($(date +%s) - started)) s for install and checks; $((deadline - $(date +%s))) s left for the scenarios"
exec "$python" -m bench.gpu "${select[@]}" "${rehearse[@]}" --deadline "$deadline" "${mirror[@]}" "${passed[@]}"
