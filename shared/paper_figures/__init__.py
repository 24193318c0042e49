"""The four papers' published efficiency figures (CSV, package data; ``README.md`` here gives the
source of every row). ``load(name)`` reads one table; ``folder()`` is where they live."""
from __future__ import annotations

import csv
import os
from typing import Dict, List

TABLES = ("adatoken3d", "fast3d", "fast3d_scores", "lvlm_csp", "segpruner")


def folder() -> str:
    return os.path.dirname(os.path.abspath(__file__))


def load(name: str, tables: str = "") -> List[Dict[str, str]]:
    """Rows of table ``name`` (one of ``TABLES``) from ``tables`` (default: the packaged copy)."""
    if name not in TABLES:
        raise ValueError(f"name: expected one of {', '.join(TABLES)}, got {name!r}")
    path = os.path.join(tables or folder(), f"{name}.csv")
    if not os.path.exists(path):
        raise FileNotFoundError(f"tables: {path} is missing")
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


__all__ = ["TABLES", "folder", "load"]
