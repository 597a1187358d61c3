"""Container ids on the lean paths: hanabi_wire's ID_RE, without importing hanabi_wire.

`hanabi_common.ids` imports `hanabi_wire.constants`, and importing a submodule runs the
package's `__init__`, which loads the whole guest protocol (framing, schema, messages).
The hot paths need one regex: they execute `hanabi_wire/constants.py` (stdlib `re` only)
as a private module, so the rule stays defined once. An id it refuses goes to the full
CLI, which words the refusal (`hanabi_common.ids.validate_id`).
"""

from __future__ import annotations

import os

from hanabi_runtime.lean.records import Fallback

_ID_RE = None


def _id_re():
    global _ID_RE
    if _ID_RE is None:
        import importlib.util

        package = importlib.util.find_spec("hanabi_wire")  # found, not imported
        path = os.path.join(package.submodule_search_locations[0], "constants.py")
        spec = importlib.util.spec_from_file_location("_hanabi_wire_constants", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _ID_RE = module.ID_RE
    return _ID_RE


def checked_id(value: str) -> str:
    """`value` if it is a valid container id; else Fallback (before anything was done)."""
    if not _id_re().fullmatch(value):
        raise Fallback()
    return value
