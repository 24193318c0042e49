"""`shared` must import on the hosts' Python 3.9/3.10: 3.9 grammar, postponed annotations."""
from __future__ import annotations

import ast
import pathlib

import pytest

FILES = sorted((pathlib.Path(__file__).resolve().parents[1] / "shared").rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_module_parses_with_python39_grammar(path):
    src = path.read_text()
    tree = ast.parse(src, feature_version=(3, 9))
    uses_annotations = any(
        isinstance(n, (ast.AnnAssign, ast.arg)) and getattr(n, "annotation", None) is not None
        or isinstance(n, (ast.FunctionDef,)) and n.returns is not None
        for n in ast.walk(tree)
    )
    if uses_annotations:
        assert "from __future__ import annotations" in src, f"{path.name}: add `from __future__ import annotations`"
