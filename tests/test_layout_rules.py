"""Rules of the code's layout that a reader relies on: zarr is imported only by the cache's store
package (the one owner of the format), and no library file grows past 400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = [p for d in ("pipeline", "stages") for p in sorted((ROOT / d).rglob("*.py"))]
STORE = ROOT / "pipeline" / "cache" / "store"


def _imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_zarr_is_imported_only_by_the_store_package():
    assert LIBRARY and any(p.parent == STORE for p in LIBRARY)
    outside = [str(p.relative_to(ROOT)) for p in LIBRARY if "zarr" in _imported(p) and STORE not in p.parents]
    assert outside == [], outside
    assert "zarr" in _imported(STORE / "layout.py")  # the rule is about a real import, which this finds


def test_no_library_file_is_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in LIBRARY if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}, long
