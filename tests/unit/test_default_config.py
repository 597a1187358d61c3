"""deploy/hanabi.toml, the commented config `make install` puts at /etc/hanabi/hanabi.toml.

It must name every key of hanabi_common.config with its default, commented out: uncommenting
every `# key = value` line gives a valid config equal to the built-in defaults, and nothing
of the model is missing from it.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from pydantic import BaseModel

from hanabi_common.config import Config, load_config

FILE = Path(__file__).resolve().parents[2] / "deploy" / "hanabi.toml"
SETTING = re.compile(r"^# ([a-z_]+) = (.+?)(\s+\(no default: unset\))?$")
UNSET = "(no default: unset)"
INTERNAL = {"source"}  # set by load_config, not a key of the file


def uncommented(text: str) -> tuple[str, set[str]]:
    """The TOML with every `# key = value` line uncommented, and the dotted keys shown as unset."""
    lines, unset, section = [], set(), ""
    for line in text.splitlines():
        header = re.match(r"^\[([a-z_.]+)\]$", line)
        if header:
            section = header.group(1) + "."
            lines.append(line)
            continue
        setting = SETTING.match(line.strip()) if "=" in line else None
        if not setting:
            continue
        key = section + setting.group(1)
        if UNSET in line:
            unset.add(key)
        else:
            lines.append(f"{setting.group(1)} = {setting.group(2)}")
    return "\n".join(lines) + "\n", unset


def model_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Every dotted leaf key of a config model."""
    keys = set()
    for name, field in model.model_fields.items():
        if not prefix and name in INTERNAL:
            continue
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            keys |= model_keys(kind, f"{prefix}{name}.")
        else:
            keys.add(prefix + name)
    return keys


def flat(doc: dict, prefix: str = "") -> set[str]:
    keys = set()
    for name, value in doc.items():
        keys |= flat(value, f"{prefix}{name}.") if isinstance(value, dict) else {prefix + name}
    return keys


def test_the_file_as_shipped_is_the_defaults():
    assert load_config(FILE).model_copy(update={"source": None}) == Config()


def test_every_key_is_there_commented_with_its_default():
    text, unset = uncommented(FILE.read_text())
    doc = tomllib.loads(text)
    shown = flat(doc) | unset
    assert shown == model_keys(Config), (
        f"missing from deploy/hanabi.toml: {sorted(model_keys(Config) - shown)}; "
        f"unknown there: {sorted(shown - model_keys(Config))}")
    assert Config.model_validate(doc) == Config()


def test_keys_shown_unset_have_no_default():
    _, unset = uncommented(FILE.read_text())
    defaults = Config().model_dump()
    for key in unset:
        value = defaults
        for part in key.split("."):
            value = value[part]
        assert value is None, f"{key} is shown unset but defaults to {value!r}"


def test_a_changed_default_is_caught():
    text = FILE.read_text().replace("# vcpus = 1", "# vcpus = 2")
    assert Config.model_validate(tomllib.loads(uncommented(text)[0])) != Config()


def test_agentds_output_buffer_stays_within_what_the_guest_resends(tmp_path):
    """A kill -9 of agentd loses what it held for a stand-in unless the guest resends it:
    the buffer may not outgrow the guest's replay window (less the socket's share)."""
    import pytest

    from hanabi_common.errors import InvalidArgument
    from hanabi_wire.constants import OUTPUT_BUFFER_MAX, REPLAY_BYTES, REPLAY_SOCKET_ALLOWANCE

    assert Config().agent.output_buffer_bytes <= OUTPUT_BUFFER_MAX == REPLAY_BYTES - REPLAY_SOCKET_ALLOWANCE
    path = tmp_path / "hanabi.toml"
    path.write_text(f"[agent]\noutput_buffer_bytes = {OUTPUT_BUFFER_MAX}\n")
    assert load_config(path).agent.output_buffer_bytes == OUTPUT_BUFFER_MAX
    path.write_text(f"[agent]\noutput_buffer_bytes = {OUTPUT_BUFFER_MAX + 1}\n")
    with pytest.raises(InvalidArgument, match="output_buffer_bytes"):
        load_config(path)
