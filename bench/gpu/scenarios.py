"""What the GPU benchmark measures: its scenarios, and the windows that group them into one short run each.

A window is what one invocation of ``bench/gpu/run.sh`` runs, sized to finish
in ≤ 8 minutes on an H100 (a lent GPU machine gives 15 minutes in all, its
start included). ``first`` answers the questions that matter most and runs
before anything else; the others are separate invocations.

A scenario that cannot run here (no CUDA GPU, no FP8 units, a library the
machine lacks) is skipped with the reason, never failed.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

from bench.gpu.bundle import EXCLUDED


@dataclass(frozen=True)
class Scenario:
    name: str
    about: str
    env: dict[str, str] = field(default_factory=dict)
    # serve: the service over HTTP; cap: MEMORY_MODE=auto under a simulated
    # smaller card; batching: batched against solo images of the same seeds.
    kind: str = "serve"
    cap_gib: int | None = None
    # What the device must have: "cuda", "fp8" (FP8 units), or a module to import.
    needs: tuple[str, ...] = ()
    # Also time the bare pipeline call, to separate the service's overhead from the model's.
    bare: bool = False


# What each memory mode's kernels need beyond torch.
MODE_NEEDS: dict[str, tuple[str, ...]] = {
    "fp8": ("cuda", "fp8", "torchao"),
    "int8": ("torchao",),
    "nf4": ("cuda", "bitsandbytes"),
    "nf4_no_t5": ("cuda", "bitsandbytes"),
}


def _cap(gib: int) -> Scenario:
    return Scenario(
        f"auto_{gib}gb",
        f"MEMORY_MODE=auto with PyTorch capped to {gib} GiB (set_per_process_memory_fraction): the mode it picks, "
        "and whether that mode serves 16 clients without running out of memory",
        {"MEMORY_MODE": "auto"},
        kind="cap",
        cap_gib=gib,
    )


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("baseline", "bf16, every component resident on the GPU", bare=True),
        Scenario(
            "fp8",
            "transformer in float8 (torchao, dynamic activations)",
            {"MEMORY_MODE": "fp8"},
            needs=MODE_NEEDS["fp8"],
        ),
        Scenario(
            "int8",
            "transformer and T5 in int8 weight-only (torchao)",
            {"MEMORY_MODE": "int8"},
            needs=MODE_NEEDS["int8"],
        ),
        _cap(40),
        _cap(24),
        _cap(16),
        Scenario("compile", "torch.compile of each transformer block", {"TORCH_COMPILE": "blocks"}),
        Scenario(
            "cache_dit",
            "cache-dit: step 2 of 4 mostly from the cache",
            {"ENABLE_CACHE_DIT": "true"},
            needs=("cache_dit",),
        ),
        Scenario("channels_last", "VAE in channels_last layout", {"VAE_CHANNELS_LAST": "true"}),
        Scenario(
            "nf4",
            "transformer and T5 in NF4 (bitsandbytes)",
            {"MEMORY_MODE": "nf4"},
            needs=MODE_NEEDS["nf4"],
        ),
        Scenario(
            "nf4_no_t5", "NF4 transformer, T5 dropped", {"MEMORY_MODE": "nf4_no_t5"}, needs=MODE_NEEDS["nf4_no_t5"]
        ),
        Scenario("no_t5", "T5-XXL dropped: CLIP-only prompts", {"MEMORY_MODE": "no_t5"}),
        Scenario("cpu_offload", "one component on the GPU at a time", {"MEMORY_MODE": "cpu_offload"}),
        Scenario(
            "all",
            "compile + cache_dit + channels_last",
            {"TORCH_COMPILE": "blocks", "ENABLE_CACHE_DIT": "true", "VAE_CHANNELS_LAST": "true"},
            needs=("cache_dit",),
        ),
        Scenario(
            "batching",
            "each seed's image alone and inside one batch, in the serving dtype: the largest pixel difference",
            kind="batching",
        ),
    )
}

WINDOWS: dict[str, tuple[str, ...]] = {
    # p50 over HTTP and bare, images/s with 16 clients and peak memory in bf16;
    # the same for fp8 and int8; what auto picks on 40, 24 and 16 GiB and whether it serves.
    "first": ("baseline", "int8", "fp8", "auto_40gb", "auto_24gb", "auto_16gb"),
    "compile": ("compile",),
    "cache_dit": ("cache_dit", "channels_last"),
    "nf4": ("nf4", "nf4_no_t5"),
    "offload": ("no_t5", "cpu_offload"),
    "batching": ("batching",),
    "combined": ("all",),
}


def skip_reason(scenario: Scenario, device: str, capability: tuple[int, int] | None = None) -> str | None:
    """Why ``scenario`` cannot run on ``device`` (None: it can)."""
    for need in scenario.needs:
        if need == "cuda" and not device.startswith("cuda"):
            return f"needs a CUDA GPU; this run is on {device}"
        if need == "fp8" and capability is not None and capability < (8, 9):
            return f"needs FP8 units (compute capability ≥ 8.9); this GPU has {capability[0]}.{capability[1]}"
        if need not in ("cuda", "fp8") and importlib.util.find_spec(need) is None:
            why = EXCLUDED.get(need.replace("_", "-"))
            return f"{need} is not installed" + (f" ({why})" if why else "")
    return None


def mode_skip_reason(mode: str, device: str, capability: tuple[int, int] | None = None) -> str | None:
    """Why ``MEMORY_MODE=mode`` cannot run on ``device`` (None: it can)."""
    return skip_reason(Scenario(mode, "", needs=MODE_NEEDS.get(mode, ())), device, capability)
