"""guest/ holds only the in-VM agent; the host-side image builder is hanabi_image.

The agent imports nothing but the standard library, its own modules and the protocol package
hanabi_wire (it runs as PID 1 with a trimmed interpreter); no module under services/ or libs/
imports it (the host speaks to it only through hanabi_wire), and every agent module goes into
the image.
"""

from __future__ import annotations

import ast
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
AGENT_DIR = ROOT / "guest/hanabi_guest"


def _imports(path: pathlib.Path) -> set[str]:
    """The top-level packages `path` imports (absolute imports only)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_the_agent_imports_only_the_stdlib_and_hanabi_wire():
    allowed = set(sys.stdlib_module_names) | {"hanabi_wire", "hanabi_guest", "__future__"}
    bad = {p.name: sorted(_imports(p) - allowed) for p in AGENT_DIR.glob("*.py") if _imports(p) - allowed}
    assert not bad, f"agent modules import more than the stdlib and hanabi_wire: {bad}"


def test_no_host_module_imports_the_agent():
    users = sorted(str(p.relative_to(ROOT)) for side in ("services", "libs") for p in (ROOT / side).rglob("*.py")
                   if "hanabi_guest" in _imports(p))
    assert not users, f"host modules import the in-VM agent: {users}"


def test_the_builder_lives_outside_guest_and_ships_every_agent_module():
    from hanabi_image import image

    assert not (AGENT_DIR / "image.py").exists() and not (AGENT_DIR / "cli.py").exists()
    assert sorted(image.AGENT_FILES) == sorted(p.name for p in AGENT_DIR.glob("*.py"))
    assert set(image.sources()) >= {f"hanabi_guest/{f}" for f in image.AGENT_FILES} | {"init"}


def test_the_builder_reads_the_agent_without_importing_it():
    import subprocess

    code = ("import sys; from hanabi_image import image; image.sources(); image.agent_version(); "
            "assert 'hanabi_guest' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_hanabi_image_command_is_the_builders():
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["hanabi-image"] == "hanabi_image.cli:main"


def test_the_manifest_names_the_agents_own_version():
    from hanabi_guest.core import AGENT_VERSION
    from hanabi_image import image

    assert image.agent_version() == AGENT_VERSION
