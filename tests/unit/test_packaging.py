"""pyproject.toml ships every package and data file (a non-editable install, as `make install`
does, has only what is listed there; the editable one of the dev venv hides a missing entry)."""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _packages_on_disk() -> dict[str, Path]:
    found = {}
    for top, where in SETUPTOOLS["package-dir"].items():
        base = ROOT / where
        for init in base.rglob("__init__.py"):
            if "__pycache__" in init.parts:
                continue
            rel = init.parent.relative_to(base)
            found[".".join((top, *rel.parts))] = init.parent
    return found


def test_every_package_is_listed():
    on_disk = set(_packages_on_disk())
    listed = set(SETUPTOOLS["packages"])
    assert on_disk - listed == set(), f"packages missing from pyproject.toml: {sorted(on_disk - listed)}"
    assert listed - on_disk == set(), f"listed packages that do not exist: {sorted(listed - on_disk)}"


def test_every_data_file_is_shipped():
    data = SETUPTOOLS.get("package-data", {})
    packages = _packages_on_disk()
    missing = []
    for where in SETUPTOOLS["package-dir"].values():
        for path in (ROOT / where).rglob("*"):
            if not path.is_file() or path.suffix in (".py", ".pyc") or "__pycache__" in path.parts:
                continue
            shipped = any(fnmatch.fnmatch(str(path.relative_to(pdir)), pattern)
                          for package, pdir in packages.items() if pdir in path.parents
                          for pattern in data.get(package, []))
            if not shipped:
                missing.append(str(path.relative_to(ROOT)))
    assert missing == [], f"data files no package-data pattern ships: {missing}"
