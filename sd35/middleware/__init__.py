"""ASGI middleware installed at the BentoML level, where every path is seen, in the order requests meet it.

1. :class:`EdgeMiddleware` (ahead of BentoML's own layers): request id,
   ``openai-processing-ms``, route templates for BentoML's metrics and access
   log, the last-resort error reply.
2. :class:`RealPath`, the first of the service's own: the real path again.
3. CORS, when configured (it answers preflights).
4. :class:`RouteGate`: 404/405 for what is no route, on the request line alone.
5. authentication (:mod:`sd35.auth`), on the headers alone.
6. :class:`BodySizeLimitMiddleware`: bodies read within limits, then replayed.

So nothing reads a body before its route is known and its caller authenticated.
"""

from sd35.middleware.bentoml_errors import adopt_bentoml_traffic_errors
from sd35.middleware.bodies import BodySizeLimitMiddleware, BufferBudget
from sd35.middleware.edge import EdgeMiddleware, RealPath, install_edge
from sd35.middleware.gate import RouteGate
from sd35.middleware.routes import UNMATCHED, RouteMatch, route_of

__all__ = [
    "UNMATCHED",
    "BodySizeLimitMiddleware",
    "BufferBudget",
    "EdgeMiddleware",
    "RealPath",
    "RouteGate",
    "RouteMatch",
    "adopt_bentoml_traffic_errors",
    "install_edge",
    "route_of",
]
