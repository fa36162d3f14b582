"""The bare pipeline call, in a process of its own: ``python -m bench.bare MODEL_DIR``.

Reads one JSON request per line (``{"size", "seed", "steps", "n"}``) and
answers each with the seconds that ``pipe(..., output_type="pt")`` took: what
the service's overhead is measured against (bench/cpu.py). A BentoML worker is
a fresh Python process with torch's default threads; so is this.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from sd35.config import Settings
from sd35.engine.loading import load_pipeline

PROMPT = "a lighthouse at dawn"


def main() -> None:
    pipe, _ = load_pipeline(Settings(model_id=sys.argv[1], warmup=False))
    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        n, size = request["n"], request["size"]
        generators = [torch.Generator("cpu").manual_seed(request["seed"] + i) for i in range(n)]
        started = time.perf_counter()
        with torch.inference_mode():
            pipe(
                prompt=[PROMPT] * n,
                height=size,
                width=size,
                num_inference_steps=request["steps"],
                guidance_scale=0.0,
                generator=generators,
                output_type="pt",
            )
        print(time.perf_counter() - started, flush=True)


if __name__ == "__main__":
    main()
