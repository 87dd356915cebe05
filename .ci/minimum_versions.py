"""Print pip constraints pinning each runtime dependency to its floor in pyproject.toml.

CI installs the package with these to check that the oldest versions the
dependencies allow still pass the tests (a floor nobody runs is a guess).
Needs Python 3.11 or later (tomllib), as CI's python3 is.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib


def floors(pyproject: Path) -> list[str]:
    """``name==version`` for every dependency with a ``>=`` lower bound."""
    project = tomllib.loads(pyproject.read_text())["project"]
    pins = []
    for requirement in project["dependencies"]:
        name = re.match(r"[A-Za-z0-9_.-]+", requirement)
        floor = re.search(r">=\s*([0-9][0-9A-Za-z.]*)", requirement)
        if name is None or floor is None:
            sys.exit(f"{requirement!r} has no '>=' floor to test; give it one in pyproject.toml")
        pins.append(f"{name.group(0)}=={floor.group(1)}")
    return pins


if __name__ == "__main__":
    pins = floors(Path(__file__).resolve().parent.parent / "pyproject.toml")
    sys.stdout.write("\n".join(pins) + "\n")
