"""The vendored Firecracker OpenAPI spec as the tests use it: the strict body schema of an
operation (unknown fields refused), body validation, and a concrete path's spec template.
Shared by the contract tests and the stand-in Firecracker (tests/helpers/fake_firecracker.py)."""
from __future__ import annotations

import copy

import jsonschema


def _strict(definitions: dict) -> dict:
    """The spec's definitions with additionalProperties: false on every object with properties,
    so a field the spec does not know (a typo) fails validation."""
    defs = copy.deepcopy(definitions)

    def walk(node):
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node:
                node["additionalProperties"] = False
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(defs)
    return defs


def body_schema(spec: dict, method: str, path: str) -> dict:
    op = spec["paths"][path][method.lower()]
    bodies = [p for p in op.get("parameters", []) if p.get("in") == "body"]
    if len(bodies) != 1:
        raise AssertionError(f"{method} {path} takes no body in the spec")
    return {**bodies[0]["schema"], "definitions": _strict(spec["definitions"])}


def validate(spec: dict, method: str, path: str, body: dict) -> None:
    jsonschema.Draft4Validator(body_schema(spec, method, path)).validate(body)


def spec_path_for(spec: dict, path: str) -> str:
    """Map a concrete path (/drives/ph0) to the spec's template (/drives/{drive_id})."""
    if path in spec["paths"]:
        return path
    for template in spec["paths"]:
        t_parts, p_parts = template.split("/"), path.split("/")
        if len(t_parts) == len(p_parts) and all(
                t == p or (t.startswith("{") and t.endswith("}") and p)
                for t, p in zip(t_parts, p_parts, strict=True)):
            return template
    raise AssertionError(f"{path} is not a path of the Firecracker API")
