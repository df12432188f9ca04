"""The previous release's spellings, rewritten to today's with a notice on stderr.

They keep working for one release (docs/adr/0018-cli.md): ``--json`` is ``-o json``;
``models promote|retire|flag NAME VERSION`` is ``NAME@VERSION``; ``models rollback NAME
--version VERSION`` is ``NAME@VERSION``; ``models register --name NAME`` is ``-m NAME``.
"""

from __future__ import annotations

import sys

REMOVED_IN = "the next release"

# The options of the rewritten commands that take a value (so their values are not
# mistaken for positional arguments).
VALUED = {
    "promote": {"--to", "--percent", "--reason", "-o", "--output", "-m", "--model"},
    "retire": {"--reason", "-o", "--output", "-m", "--model"},
    "flag": {"--reason", "-o", "--output", "-m", "--model"},
    "rollback": {"--reason", "--version", "-o", "--output", "-m", "--model"},
}
GLOBAL_VALUED = {"--bootstrap-server", "--redis-url"}


def _notice(old: str, new: str) -> None:
    print(
        f"scoremesh: deprecated: {old!r} is now {new!r}; the old spelling stops working in "
        f"{REMOVED_IN}",
        file=sys.stderr,
        flush=True,
    )


def _command_path(argv: list[str]) -> tuple[list[str], int]:
    """The command words (``models promote``) and the index after them, global options
    (and their values) skipped."""
    words: list[str] = []
    i = 0
    while i < len(argv) and len(words) < 2:
        arg = argv[i]
        if arg in GLOBAL_VALUED:
            i += 2
            continue
        if arg.startswith("-"):
            i += 1
            continue
        words.append(arg)
        i += 1
        if words[0] != "models":
            break
    return words, i


def rewrite(argv: list[str]) -> list[str]:
    """Today's spelling of a command line (a notice on stderr for each old form)."""
    if "--" in argv:
        head, tail = argv[: argv.index("--")], argv[argv.index("--") :]
    else:
        head, tail = list(argv), []
    if "--json" in head:
        head = [arg for arg in head if arg != "--json"]
        head += ["-o", "json"]
        _notice("--json", "-o json")
    words, start = _command_path(head)
    if len(words) == 2 and words[0] == "models":
        head = _models(words[1], head, start)
    return head + tail


def _positionals(args: list[str], start: int, valued: set[str]) -> list[int]:
    found = []
    i = start
    while i < len(args):
        arg = args[i]
        if arg in valued:
            i += 2
            continue
        if not arg.startswith("-"):
            found.append(i)
        i += 1
    return found


def _models(action: str, args: list[str], start: int) -> list[str]:
    if action in ("promote", "retire", "flag"):
        found = _positionals(args, start, VALUED[action])
        if len(found) == 2 and "@" not in args[found[0]] and "@" not in args[found[1]]:
            name, version = args[found[0]], args[found[1]]
            _notice(f"models {action} {name} {version}", f"models {action} {name}@{version}")
            args = [a for i, a in enumerate(args) if i != found[1]]
            args[found[0]] = f"{name}@{version}"
    elif action == "rollback" and "--version" in args[start:]:
        at = args.index("--version", start)
        found = _positionals(args, start, VALUED[action])
        if at + 1 < len(args) and len(found) == 1 and "@" not in args[found[0]]:
            name, version = args[found[0]], args[at + 1]
            _notice(
                f"models rollback {name} --version {version}", f"models rollback {name}@{version}"
            )
            index = found[0] - (2 if found[0] > at else 0)
            args = args[:at] + args[at + 2 :]
            args[index] = f"{name}@{version}"
    elif action == "register" and "--name" in args[start:]:
        at = args.index("--name", start)
        _notice("models register --name NAME", "models register -m NAME")
        args = [*args[:at], "-m", *args[at + 1 :]]
    return args
