"""OCI runtime-spec documents: validation of config.json against the official JSON schema.

The schemas are vendored from opencontainers/runtime-spec (schemas/oci/, Apache-2.0); their
`$ref`s are relative file names, resolved here through a `referencing` registry.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources

from hanabi_common.errors import InvalidArgument

BASE_URI = "https://hanabi.invalid/oci/"
OCI_VERSION = "1.2.0"


@cache
def _validator(schema_name: str):
    from jsonschema import Draft4Validator
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT4

    folder = resources.files("hanabi_common.schemas") / "oci"
    registry = Registry()
    for entry in folder.iterdir():
        if entry.name.endswith(".json") and entry.name != "LICENSE":
            contents = json.loads(entry.read_text())
            registry = registry.with_resource(BASE_URI + entry.name,
                                              Resource.from_contents(contents, default_specification=DRAFT4))
    schema = dict(json.loads((folder / schema_name).read_text()), id=BASE_URI + schema_name)
    return Draft4Validator(schema, registry=registry)


def schema_errors(document: object, schema_name: str = "config-schema.json") -> list[str]:
    """Every way `document` breaks the schema, as readable lines (empty when valid)."""
    errors = sorted(_validator(schema_name).iter_errors(document), key=lambda e: list(e.absolute_path))
    lines = []
    for err in errors[:10]:
        where = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        lines.append(f"{where}: {err.message[:300]}")
    return lines


def validate_config(document: object, source: str = "config.json") -> dict:
    """Return the config if it passes the OCI schema; else InvalidArgument listing the errors."""
    if not isinstance(document, dict):
        raise InvalidArgument(f"{source} must be a JSON object")
    problems = schema_errors(document)
    if problems:
        raise InvalidArgument(f"{source} does not conform to the OCI runtime-spec schema: "
                              + "; ".join(problems), details={"errors": problems})
    return document
