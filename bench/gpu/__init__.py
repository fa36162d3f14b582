"""GPU benchmark of the real service on the full-size SD3.5 Large architecture with random weights.

The architecture is built from its published component configurations
(``bench/sd35-large-architecture.json``) with random bf16 weights made on the
GPU: the real shapes, so the real FLOPs and memory, with no download and no
gated licence. Each scenario serves it through the real service and measures
over HTTP (and the bare pipeline call, for the baseline): p50/p95 latency at
1024² and 4 steps, images/s with 16 concurrent clients, GPU memory after load
and under traffic, per memory mode and knob; what ``MEMORY_MODE=auto`` picks
on smaller cards; how far batched images are from the same seeds alone.

On the lent GPU machine run ``bench/gpu/run.sh`` (it installs the wheels
``make gpu-bundle`` prepared, checks versions, then runs one window of
≤ 8 minutes); ``make gpu-rehearsal`` runs the same script here on the CPU.
Modules: :mod:`~bench.gpu.arch` (the architecture), :mod:`~bench.gpu.scenarios`
(scenarios and windows), :mod:`~bench.gpu.checkpoint` (the random weights),
:mod:`~bench.gpu.measure` (running one scenario), :mod:`~bench.gpu.report`
(results files), :mod:`~bench.gpu.cli`, and, importing nothing heavy,
:mod:`~bench.gpu.bundle` (the wheels) and :mod:`~bench.gpu.check_env` (versions).

Elsewhere: ``python -m bench.gpu --describe`` prints parameter counts and
every memory mode's fit (no GPU needed); ``python -m bench.gpu --tiny --quick``
runs the script end to end on a CPU in seconds (a functional check).
"""
