"""Every `# type: ignore` in the code names its error code and says why.

mypy (tox, `make test`) checks the codes are real and still needed (`warn_unused_ignores`,
`ignore-without-code`); this test checks each one carries a reason after it:
``x = f()  # type: ignore[attr-defined]  # why the checker is wrong here``.
"""

from __future__ import annotations

import io
import pathlib
import re
import tokenize

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHECKED = ["libs", "services", "guest", "tests", "bench"]
IGNORE = re.compile(r"type:\s*ignore\b")
WITH_REASON = re.compile(r"^#\s*type:\s*ignore\[[a-z0-9-]+(,\s*[a-z0-9-]+)*\]\s+#\s*\S.*$")


def _comments(path: pathlib.Path) -> list[tuple[int, str]]:
    source = path.read_text(encoding="utf-8")
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    return [(tok.start[0], tok.string) for tok in tokens if tok.type == tokenize.COMMENT]


def _sources() -> list[pathlib.Path]:
    return sorted(p for top in CHECKED for p in (ROOT / top).rglob("*.py") if ".venv" not in p.parts)


def bad_ignores(paths: list[pathlib.Path]) -> list[str]:
    """`path:line: comment` for each type-ignore comment without a code and a reason."""
    bad = []
    for path in paths:
        for line, comment in _comments(path):
            if IGNORE.search(comment) and not WITH_REASON.match(comment):
                bad.append(f"{path}:{line}: {comment}")
    return bad


def test_every_type_ignore_has_a_code_and_a_reason() -> None:
    assert bad_ignores(_sources()) == []


@pytest.mark.parametrize("comment, ok", [
    ("# type: ignore[attr-defined]  # set by make_app", True),
    ("# type: ignore[arg-type, union-attr]  # pydantic validates it", True),
    ("# type: ignore[attr-defined]", False),
    ("# type: ignore  # no code", False),
    ("# type: ignore", False),
    ("# type:ignore[misc]  #", False),
])
def test_the_rule_itself(tmp_path: pathlib.Path, comment: str, ok: bool) -> None:
    src = tmp_path / "probe.py"
    src.write_text(f"x = 1  {comment}\ny = '# type: ignore in a string is not a comment'\n")
    assert (bad_ignores([src]) == []) is ok
