"""The generation engine: the only package that imports torch and diffusers.

- :mod:`~sd35.engine.params` — what a request asks for;
- :mod:`~sd35.engine.loading` and :mod:`~sd35.engine.memory` — loading the
  weights as ``MEMORY_MODE`` says, and whether they fit;
- :mod:`~sd35.engine.adapters` — LoRA adapters: loading, choosing, switching;
- :mod:`~sd35.engine.calls` — one pipeline call for a batch;
- :mod:`~sd35.engine.worker` — the queue, batching and the worker thread.
"""

from sd35.engine.params import GenerationParams
from sd35.engine.worker import EngineStatus, GenerationEngine

__all__ = ["EngineStatus", "GenerationEngine", "GenerationParams"]
