"""AUTOMATIC1111's web UI API (``/sdapi/v1``), spoken by Open WebUI, SillyTavern, ``webuiapi`` and more.

- :mod:`~sd35.a1111.protocol` — request and response models in AUTOMATIC1111's shapes;
- :mod:`~sd35.a1111.translate` — what a request asks for, as engine work
  (prompt LoRA tags, seeds, sizes, masks), and the ``info`` it is answered with;
- :mod:`~sd35.a1111.serving` — running it on the same engine and queue as the
  OpenAI routes; per-key options, progress, interrupt and skip.

The HTTP routes are in :mod:`sd35.api.a1111`.
"""
