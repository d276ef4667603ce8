"""Write docs/LAYOUT.md: every module of the package with the first paragraph of its docstring.

python docs/make_layout.py            # rewrite docs/LAYOUT.md
python docs/make_layout.py --counts   # print the table with line counts instead (for reviews)
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["", "nn", "fit", "convert", "data", "train", "export", "io", "cli"]
HEADER = """# Code layout: one room per concept

Each stage lives in a package of its own; a module does one thing and says what in its docstring (its
first paragraph is listed below; `python docs/make_layout.py` rewrites this file). The packages import
each other without cycles, lower to higher: `nn` (nothing of vconvert's) ← `fit` ← `convert`; `data`
(only `errors`); `io` (`convert`, `data`, `nn`: rebuilding a `.vc.pt` re-applies its plan); `evaluate`
(`data`, `io`); `export` (`convert`, `io`, `nn`, and `data` only to read a checkpoint's calibration and
verification images); `train` (all of those); `cli` and `demo` on top. Only `cli` knows about flags:
library errors name Python parameters in backticks (`` `bn_mode` ``, `` `trust=True` ``) and
`cli.common.as_flags` shows the flags instead, in one place.
"""
FOOTER = """
Algebra and formats the code relies on: docs/ALGEBRA.md (the layer, the fold, stored size), docs/FIT.md
(data-free fit and mask rules), docs/FORMAT.md (`.vc.pt`, the trust policy, ONNX metadata). Tests mirror
the packages (`tests/<package>/test_*.py`; `tests/conftest.py` holds the shared helpers); benchmarks share
`benchmarks/common.py`, and `benchmarks/results/INDEX.md` says which results file answers which question.
"""


def modules() -> list[tuple[str, int, str]]:
    """(path, lines, first docstring paragraph) of every module, package by package."""
    rows = []
    for package in PACKAGES:
        for path in sorted((ROOT / "vconvert" / package).glob("*.py")):
            if path.name == "__main__.py":
                continue
            text = path.read_text()
            doc = ast.get_docstring(ast.parse(text)) or ""
            rows.append(
                (path.relative_to(ROOT).as_posix(), len(text.splitlines()), " ".join(doc.split("\n\n")[0].split()))
            )
    return rows


def layout() -> str:
    table = ["| module | what it is |", "|---|---|"] + [f"| `{path}` | {doc} |" for path, _, doc in modules()]
    return HEADER + "\n" + "\n".join(table) + "\n" + FOOTER


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", action="store_true", help="print paths with line counts instead")
    if parser.parse_args().counts:
        rows = modules()
        for path, lines, _ in rows:
            print(f"{lines:6d}  {path}")
        print(f"{sum(lines for _, lines, _ in rows):6d}  total")
        return
    (ROOT / "docs" / "LAYOUT.md").write_text(layout())


if __name__ == "__main__":
    main()
