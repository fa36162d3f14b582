"""README.md stays true to the code: every setting has its row, the development tree names every module."""

from __future__ import annotations

import re

from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else None]


def test_every_variable_the_settings_read_has_a_row_in_the_configuration_table() -> None:
    source = (ROOT / "sd35" / "config.py").read_text()
    variables = set(re.findall(r'_(?:parse|get)\(\s*env,\s*"([A-Z0-9_]+)"', source))
    assert {"MODEL_ID", "API_KEYS_FILE", "MAX_IMAGES_PER_REQUEST", "BODY_MIN_RATE"} <= variables
    rows = [line.split("|")[1] for line in _section("Configuration").splitlines() if line.startswith("| `")]
    missing = sorted(name for name in variables if not any(f"`{name}`" in row for row in rows))
    assert not missing, f"no row in README's Configuration table for {missing}"


def test_the_development_tree_names_every_module() -> None:
    tree = _section("Development").split("```")[1]
    modules = sorted(
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "sd35").rglob("*.py")
        if path.name != "__init__.py" and "static" not in path.parts
    )
    # A module is named by its path, or inside its package's line(s) by its name (`sd35/api/ ... images, files`).
    missing = [
        module
        for module in modules
        if module not in tree and not re.search(rf"\b{re.escape(module.rsplit('/', 1)[-1][:-3])}\b", tree)
    ]
    missing += [f"{package}/" for package in ("sd35/a1111", "sd35/api", "sd35/engine", "sd35/middleware")]
    missing = [name for name in missing if name not in tree]
    assert not missing, f"README's development tree does not name {missing}"
