"""sd35's service plus one route that never answers, for tests of the shutdown's last resort.

It stands for any request that would hold a worker past the grace, such as a
client that never reads its response.
"""

from __future__ import annotations

import asyncio

from service import SD35, app

__all__ = ["SD35"]


@app.get("/hang")
async def hang() -> None:
    await asyncio.Event().wait()
