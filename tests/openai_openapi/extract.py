"""Cut the parts sd35 speaks out of OpenAI's OpenAPI document, for tests/test_conformance.py.

    python tests/openai_openapi/extract.py PATH/TO/openapi.json COMMIT > tests/openai_openapi/openapi.images.json

PATH/TO/openapi.json: ``openapi.json`` of https://github.com/openai/openai-openapi
at COMMIT. Kept: the image and model paths sd35 serves and every schema they
reference (transitively), plus the error schemas; dropped: ``x-oaiMeta``
(documentation examples in several languages), which no validation reads.
Everything kept is OpenAI's text, unchanged.
"""

from __future__ import annotations

import json
import sys
from typing import Any

PATHS = ("/images/generations", "/images/edits", "/images/variations", "/models", "/models/{model}")
# Not referenced by the paths (OpenAI documents no error responses there), but what every error is.
EXTRA_SCHEMAS = ("ErrorResponse", "Error")
REF_PREFIX = "#/components/schemas/"


def _strip(node: Any) -> Any:
    if isinstance(node, dict):
        return {key: _strip(value) for key, value in node.items() if key != "x-oaiMeta"}
    if isinstance(node, list):
        return [_strip(value) for value in node]
    return node


def _refs(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = {node["$ref"][len(REF_PREFIX) :]} if str(node.get("$ref", "")).startswith(REF_PREFIX) else set()
        return found.union(*(_refs(value) for value in node.values()))
    if isinstance(node, list):
        return set().union(*(_refs(value) for value in node))
    return set()


def extract(document: dict[str, Any], commit: str) -> dict[str, Any]:
    paths = {path: _strip(document["paths"][path]) for path in PATHS}
    schemas = document["components"]["schemas"]
    wanted, todo = set(), _refs(paths) | set(EXTRA_SCHEMAS)
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            todo |= _refs(schemas[name])
    return {
        "openapi": document["openapi"],
        "info": {
            **document["info"],
            "x-sd35-source": f"https://github.com/openai/openai-openapi/blob/{commit}/openapi.json",
            "x-sd35-extract": f"paths {', '.join(PATHS)} and the schemas they reference; x-oaiMeta dropped",
        },
        "servers": document.get("servers", []),
        "paths": paths,
        "components": {"schemas": {name: _strip(schemas[name]) for name in sorted(wanted)}},
    }


if __name__ == "__main__":
    source, commit = sys.argv[1], sys.argv[2]
    with open(source) as file:
        print(json.dumps(extract(json.load(file), commit), indent=1, ensure_ascii=False))
