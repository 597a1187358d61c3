"""The command lines the lean paths take, parsed by hand; anything else is the full CLI's.

Global flags as `hanabi_runtime.cli` declares them (runc's --root, --log, --log-format,
--debug, --systemd-cgroup, and hanabi's --config and --hypervisor), then one of the hot
commands with its own options. `parse` answers None for whatever it does not know exactly
(--help, --version, --debug, `--`, an unknown option, a missing or extra argument), and
typer then parses the command line and gives its own answer.
"""

from __future__ import annotations

GLOBAL_VALUES = ("--root", "--log", "--log-format", "--config", "--hypervisor")
GLOBAL_FLAGS = ("--systemd-cgroup",)
# command -> (positional names, minimum positionals, options taking a value, flags)
COMMANDS = {
    "state": (("id",), 1, {}, {}),
    "start": (("id",), 1, {}, {}),
    "pause": (("id",), 1, {}, {}),
    "resume": (("id",), 1, {}, {}),
    "kill": (("id", "signal"), 1, {}, {"--all": "all", "-a": "all"}),
    "ps": (("id",), 1, {"--format": "format", "-f": "format"}, {}),
    "events": (("id",), 1, {"--interval": "interval"}, {"--stats": "stats"}),
    "delete": (("id",), 1, {}, {"--force": "force", "-f": "force"}),
    # Not lean (Runtime.create needs the models), but without typer: `lean.create`.
    "create": (("id",), 1, {"--bundle": "bundle", "-b": "bundle", "--pid-file": "pid_file",
                            "--console-socket": "console_socket", "--preserve-fds": "preserve_fds"},
               {"--no-pivot": "no_pivot", "--no-new-keyring": "no_new_keyring"}),
}


class Command:
    """A parsed hot command: its name, the global options and its own arguments."""

    def __init__(self, name: str, options: dict) -> None:
        self.name = name
        self.globals = options
        self.args: dict = {}


def _option(argv: list[str], i: int, names) -> tuple[str, str, int] | None:
    """(name, value, next index) when argv[i] is one of `names` with its value."""
    word = argv[i]
    if "=" in word and word.startswith("--"):
        name, _, value = word.partition("=")
        return (name, value, i + 1) if name in names else None
    if word in names and i + 1 < len(argv):
        return word, argv[i + 1], i + 2
    return None


def split_globals(argv: list[str]) -> tuple[dict, str, int] | None:
    """The global options of `argv` (without the program name), the command word and its
    index; None when a global option is not one parsed here, or there is no command."""
    options: dict = {"root": None, "log": None, "log_format": "text", "config": None, "hypervisor": None}
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        if argv[i] in GLOBAL_FLAGS:
            i += 1
            continue
        found = _option(argv, i, GLOBAL_VALUES)
        if found is None:
            return None
        name, value, i = found
        options[name[2:].replace("-", "_")] = value
    return (options, argv[i], i) if i < len(argv) else None


def parse(argv: list[str]) -> Command | None:
    """The hot command of `argv` (without the program name), or None for the full CLI."""
    split = split_globals(argv)
    if split is None or split[1] not in COMMANDS:
        return None
    options, name, i = split
    positional_names, minimum, valued, flags = COMMANDS[name]
    command = Command(name, options)
    positionals = []
    i += 1
    while i < len(argv):
        word = argv[i]
        if word.startswith("-") and word != "-":
            if word in flags:
                command.args[flags[word]] = True
                i += 1
                continue
            found = _option(argv, i, valued)
            if found is None:
                return None
            option, value, i = found
            command.args[valued[option]] = value
            continue
        positionals.append(word)
        i += 1
    if not minimum <= len(positionals) <= len(positional_names):
        return None
    command.args.update(zip(positional_names, positionals, strict=False))
    return command
