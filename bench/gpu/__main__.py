"""``python -m bench.gpu``: see :mod:`bench.gpu`."""

from bench.gpu.cli import main

raise SystemExit(main())
