"""The vendored Firecracker OpenAPI (Swagger 2.0) spec and a loader for it.

`firecracker-v1.16.1.yaml` next to this file is a verbatim copy of Firecracker's
`src/firecracker/swagger/firecracker.yaml` at tag v1.16.1 (Apache-2.0, see LICENSE here).

PyYAML is not a hanabi dependency, so `load_spec()` uses a small parser for the YAML subset
the spec is written in: block mappings and sequences, plain (possibly multi-line, folded)
and quoted scalars, flow sequences of scalars, and comment lines. It follows YAML 1.2 core
scalars, so `Off` (a Logger level) stays the string Firecracker expects, where PyYAML's
YAML 1.1 would turn it into False; otherwise it gives exactly what PyYAML gives (tested
where PyYAML is importable).
"""

from __future__ import annotations

import copy
import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

SPEC_VERSION = "1.16.1"
SPEC_PATH = Path(__file__).with_name(f"firecracker-v{SPEC_VERSION}.yaml")

_INT = re.compile(r"^[-+]?[0-9]+$")
_FLOAT = re.compile(r"^[-+]?([0-9]+\.[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$")


def _scalar(text: str) -> Any:
    text = text.strip()
    if text.startswith('"'):
        return json.loads(text)
    if text.startswith("'"):
        return text[1:-1].replace("''", "'")
    if text.startswith("["):
        inner = text[1:-1].strip()
        return [_scalar(part) for part in inner.split(",")] if inner else []
    if text in ("null", "Null", "NULL", "~", ""):
        return None
    if text in ("true", "True", "TRUE"):
        return True
    if text in ("false", "False", "FALSE"):
        return False
    if _INT.match(text):
        return int(text)
    if _FLOAT.match(text):
        return float(text)
    return text


def _fold(parts: list[str | None]) -> str:
    """Fold the lines of a multi-line scalar: line breaks become spaces, blank lines '\\n'."""
    out = ""
    pending_blank = 0
    for part in parts:
        if part is None:
            pending_blank += 1
            continue
        if out:
            out += "\n" * pending_blank if pending_blank else " "
        out += part
        pending_blank = 0
    return out


def _split_key(text: str) -> tuple[str, str] | None:
    """'key: rest' -> (key, rest); None if the text is not a mapping entry."""
    if text[:1] in ('"', "'", "["):
        return None
    m = re.match(r"^([^#:\s][^:]*?|):(?:\s+(.*))?$", text)
    if not m:
        return None
    return m.group(1), (m.group(2) or "")


class _Parser:
    def __init__(self, source: str) -> None:
        # (indent, text) per line; None for blank lines (they matter inside folded scalars).
        self.lines: list[tuple[int, str] | None] = []
        for raw in source.splitlines():
            stripped = raw.strip()
            if not stripped:
                self.lines.append(None)
            elif stripped.startswith("#"):
                continue
            else:
                self.lines.append((len(raw) - len(raw.lstrip(" ")), stripped))
        self.i = 0

    def _peek(self) -> tuple[int, str] | None:
        while self.i < len(self.lines) and self.lines[self.i] is None:
            self.i += 1
        return self.lines[self.i] if self.i < len(self.lines) else None

    def _continuation(self, first: str, indent: int) -> Any:
        """A scalar that starts with `first` and may continue on deeper-indented lines."""
        parts: list[str | None] = [first]
        j = self.i
        while j < len(self.lines):
            line = self.lines[j]
            if line is not None and line[0] <= indent:
                break
            parts.append(None if line is None else line[1])
            j += 1
        while parts and parts[-1] is None:
            parts.pop()
            j -= 1
        # do not swallow trailing blank lines: step back over them
        self.i = j if len(parts) > 1 else self.i
        if len(parts) == 1:
            return _scalar(first)
        if first.startswith('"'):
            return json.loads(_fold(parts))
        return _scalar(_fold(parts))

    def block(self, indent: int) -> Any:
        line = self._peek()
        assert line is not None and line[0] == indent
        if line[1] == "-" or line[1].startswith("- "):
            return self.sequence(indent)
        return self.mapping(indent)

    def _value_after_key(self, indent: int, rest: str, seq_ok_at: int) -> Any:
        if rest and not rest.startswith("#"):
            return self._continuation(rest, indent)
        nxt = self._peek()
        if nxt is None:
            return None
        if nxt[0] > indent:
            if not (nxt[1] == "-" or nxt[1].startswith("- ")) and _split_key(nxt[1]) is None:
                # a plain scalar that starts on the line after its key
                self.i += 1
                return self._continuation(nxt[1], indent)
            return self.block(nxt[0])
        if nxt[0] == seq_ok_at and (nxt[1] == "-" or nxt[1].startswith("- ")):
            return self.sequence(nxt[0])
        return None

    def mapping(self, indent: int) -> dict:
        out: dict = {}
        while True:
            line = self._peek()
            if line is None or line[0] != indent or line[1].startswith("- ") or line[1] == "-":
                if line is not None and line[0] > indent:
                    raise ValueError(f"unexpected indentation at line {self.i + 1}: {line[1]!r}")
                return out
            kv = _split_key(line[1])
            if kv is None:
                raise ValueError(f"expected 'key:' at line {self.i + 1}: {line[1]!r}")
            self.i += 1
            key: Any = _scalar(kv[0]) if kv[0][:1] in ('"', "'") or _INT.match(kv[0]) else kv[0]
            out[key] = self._value_after_key(indent, kv[1], indent)

    def sequence(self, indent: int) -> list:
        out: list = []
        while True:
            line = self._peek()
            if line is None or line[0] != indent or not (line[1] == "-" or line[1].startswith("- ")):
                return out
            content = line[1][1:].strip()
            if not content:
                self.i += 1
                nxt = self._peek()
                out.append(self.block(nxt[0]) if nxt is not None and nxt[0] > indent else None)
            elif _split_key(content) is not None:
                # "- key: value" starts a mapping indented at the item's content column.
                self.lines[self.i] = (indent + 2, content)
                out.append(self.mapping(indent + 2))
            else:
                self.i += 1
                out.append(self._continuation(content, indent))


def parse_yaml_subset(source: str) -> Any:
    parser = _Parser(source)
    first = parser._peek()
    if first is None:
        return None
    value = parser.block(first[0])
    if parser._peek() is not None:
        raise ValueError(f"trailing content at line {parser.i + 1}")
    return value


@lru_cache(maxsize=1)
def _load() -> dict:
    return parse_yaml_subset(SPEC_PATH.read_text(encoding="utf-8"))


def load_spec() -> dict:
    """The vendored Firecracker API spec as plain data (a fresh copy each call)."""
    return copy.deepcopy(_load())
