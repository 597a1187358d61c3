"""The plain TOML a hanabi config is usually made of, read without tomllib.

Importing tomllib (with typing and datetime) is a third of a hot call. `simple_toml`
returns what `tomllib.loads` returns when every line is blank, a comment, a table header of
bare keys (`[vmm.firecracker]`) or `bare_key = value` with a basic string without escapes, a
decimal integer or float, or a boolean (each with an optional comment); for anything else
it returns None and the caller uses tomllib. Whatever it reads is trusted only once its text
matches the one the full CLI validated (records.CONFIG_STAMP), so only valid TOML counts.
"""

from __future__ import annotations

import re

_KEY = r"[A-Za-z0-9_-]+"
_COMMENT = r"(?:#[^\n]*)?"
_HEADER = re.compile(rf"[ \t]*\[[ \t]*({_KEY}(?:[ \t]*\.[ \t]*{_KEY})*)[ \t]*\][ \t]*{_COMMENT}")
_PAIR = re.compile(rf'[ \t]*({_KEY})[ \t]*=[ \t]*(?:"([^"\\\x00-\x1f\x7f]*)"|([+-]?(?:0|[1-9][0-9]*))'
                   rf'|([+-]?(?:0|[1-9][0-9]*)\.[0-9]+)|(true|false))[ \t]*{_COMMENT}')
_BLANK = re.compile(rf"[ \t]*{_COMMENT}")


def simple_toml(text: str) -> dict | None:
    """The document as tomllib reads it, or None when it is not this simple."""
    document: dict = {}
    table = document
    for line in text.splitlines():
        if _BLANK.fullmatch(line):
            continue
        header = _HEADER.fullmatch(line)
        if header:
            table = document
            for key in header.group(1).split("."):
                table = table.setdefault(key.strip(" \t"), {})
                if not isinstance(table, dict):
                    return None
            continue
        pair = _PAIR.fullmatch(line)
        if pair is None:
            return None
        key, string, integer, number, boolean = pair.groups()
        if key in table:
            return None
        if string is not None:
            table[key] = string
        elif integer is not None:
            table[key] = int(integer)
        elif number is not None:
            table[key] = float(number)
        else:
            table[key] = boolean == "true"
    return document
