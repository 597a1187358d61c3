"""Container ids on the lean paths: hanabi_wire's ID_RE (and its other constants), without
importing hanabi_wire.

`hanabi_common.ids` imports `hanabi_wire.constants`, and importing a submodule runs the
package's `__init__`, which loads the whole guest protocol (framing, schema, messages).
The hot paths need one regex and the init's exec id: they execute
`hanabi_wire/constants.py` (stdlib `re` only) as a private module (`wire_constants`), so
each rule stays defined once. An id it refuses goes to the full CLI, which words the
refusal (`hanabi_common.ids.validate_id`).
"""

from __future__ import annotations

import os

from hanabi_runtime.lean.records import Fallback

_CONSTANTS = None


def wire_constants():
    """`hanabi_wire/constants.py`, executed once as a private module (hanabi_wire is found,
    not imported)."""
    global _CONSTANTS
    if _CONSTANTS is None:
        import types
        from importlib.machinery import PathFinder, SourceFileLoader  # not importlib.util: 1 ms more

        package = PathFinder.find_spec("hanabi_wire")  # found, not imported
        if package is None:  # on sys.path only through another finder (an editable install's)
            import importlib.util

            package = importlib.util.find_spec("hanabi_wire")
        assert package is not None and package.submodule_search_locations
        path = os.path.join(package.submodule_search_locations[0], "constants.py")
        module = types.ModuleType("_hanabi_wire_constants")
        module.__file__ = path
        exec(SourceFileLoader(module.__name__, path).get_code(module.__name__), module.__dict__)  # its .pyc
        _CONSTANTS = module
    return _CONSTANTS


def checked_id(value: str) -> str:
    """`value` if it is a valid container id; else Fallback (before anything was done)."""
    if not wire_constants().ID_RE.fullmatch(value):
        raise Fallback()
    return value
