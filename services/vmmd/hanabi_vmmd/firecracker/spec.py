"""The vendored Firecracker OpenAPI (Swagger 2.0) spec and a loader for it (contract tests).

`firecracker-v1.16.1.yaml` next to this file is a verbatim copy of Firecracker's
`src/firecracker/swagger/firecracker.yaml` at tag v1.16.1 (Apache-2.0, see LICENSE here).
It is read with PyYAML (a test dependency: nothing at run time needs the spec). PyYAML
follows YAML 1.1, which reads the Logger level `Off` as False; Firecracker means the
string, so the loader puts it back.
"""

from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path

SPEC_VERSION = "1.16.1"
SPEC_PATH = Path(__file__).with_name(f"firecracker-v{SPEC_VERSION}.yaml")


def _restore_yaml11_booleans(spec: dict) -> dict:
    """Undo YAML 1.1's reading of the enum value `Off` as False (Logger.level)."""
    for definition in spec.get("definitions", {}).values():
        for prop in (definition.get("properties") or {}).values():
            enum = prop.get("enum") if isinstance(prop, dict) else None
            if enum and prop.get("type") == "string":
                prop["enum"] = ["Off" if value is False else "On" if value is True else value for value in enum]
    return spec


@lru_cache(maxsize=1)
def _load() -> dict:
    import yaml  # test dependency (pyproject: [test])

    return _restore_yaml11_booleans(yaml.safe_load(SPEC_PATH.read_text(encoding="utf-8")))


def load_spec() -> dict:
    """The vendored Firecracker API spec as plain data (a fresh copy each call)."""
    return copy.deepcopy(_load())
