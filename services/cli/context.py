"""What every command shares: the settings (with the global flags winning over the
environment), how models and versions are named, and the errors that map to exit codes.

Light on purpose: `scoremesh --help` imports this module, so the settings (pydantic) and
everything heavier are imported inside the functions that need them.
"""

from __future__ import annotations

import re
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

if TYPE_CHECKING:
    from services.common.settings import Settings

T = TypeVar("T")

# One rule for names, as the settings' SCOREMESH_MODEL_NAME and the registry apply it.
MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)$")


class UsageProblem(Exception):
    """A command line that cannot mean anything: exit code 2, like a parse error."""


@dataclass
class GlobalFlags:
    """The root command's options: settings given on the command line, by setting name."""

    given: dict[str, str] = field(default_factory=dict)


FLAGS = GlobalFlags()  # reset by the root callback on every invocation
FLAG_NAMES = {"kafka_bootstrap": "--bootstrap-server", "redis_url": "--redis-url"}


def set_flags(**values: str | None) -> None:
    FLAGS.given = {name: value for name, value in values.items() if value}


def flag_origin(setting: str) -> str | None:
    """'from --bootstrap-server' when a global flag gave this setting, else None."""
    return f"from {FLAG_NAMES[setting]}" if setting in FLAGS.given else None


def load_settings() -> Settings:
    """The settings: global flags, then SCOREMESH_* variables, then the dev stack's file."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from services.common.settings import ConfigError, Settings

    try:
        return Settings(**FLAGS.given)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        key = str(first["loc"][0]) if first["loc"] else ""
        name = FLAG_NAMES.get(key) if key in FLAGS.given else None
        name = name or ("SCOREMESH_" + key.upper() if key else "settings")
        raise ConfigError(f"{name}: {first['msg']}") from None
    except SettingsError as exc:  # e.g. a policy variable that is not valid JSON
        raise ConfigError(
            f"{exc}; complex settings take JSON, e.g. "
            """SCOREMESH_RETRAIN_POLICY='{"min_new_labels": 200}'"""
        ) from None


def complete_topic(incomplete: str) -> list[str]:
    """Shell completion: the catalog's topics."""
    from scoremesh.contract.catalog import catalog

    return [name for name in catalog() if name.startswith(incomplete)]


def run_async(coroutine: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run``, imported when a command needs it (not for ``--help``)."""
    import asyncio

    return asyncio.run(coroutine)


def positive(value: int | None) -> int | None:
    """An option's callback: a whole number above zero (or not given)."""
    if value is not None and value <= 0:
        raise typer.BadParameter(f"must be positive, got {value}")
    return value


def examples(*lines: str) -> str:
    """A command's epilog: its examples, one a line."""
    return "Examples:\n" + "\n".join(f"  {line}" for line in lines)


# --- naming: a model is NAME, a version is NAME@VERSION -----------------------------------


@dataclass(frozen=True)
class Ref:
    """A model (``credit``) or one of its versions (``credit@1.1.0``)."""

    name: str
    version: str | None = None

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}" if self.version else self.name

    def __str__(self) -> str:
        return self.key


def check_model(name: str, where: str = "-m/--model") -> str:
    if not MODEL_NAME.match(name):
        raise UsageProblem(
            f"{where} {name!r}: a model name is lower-case letters, digits, '-' and '_' "
            "(at most 64, starting with a letter or digit), e.g. credit"
        )
    return name


def parse_ref(text: str, *, version: bool | None = None, where: str = "argument") -> Ref:
    """``NAME`` or ``NAME@VERSION``. ``version``: True requires one, False forbids one,
    None allows both."""
    name, at, number = text.partition("@")
    check_model(name, f"{where} {text!r}:" if at else where)
    if at and not SEMVER.match(number):
        raise UsageProblem(
            f"{where} {text!r}: the version after '@' is MAJOR.MINOR.PATCH, e.g. {name}@1.1.0"
        )
    if version is True and not at:
        raise UsageProblem(
            f"{where} {text!r} names a model, not a version: use NAME@VERSION, e.g. {text}@1.1.0"
        )
    if version is False and at:
        raise UsageProblem(f"{where} {text!r}: name a model here, without @{number}")
    return Ref(name, number or None)


def resolve(
    target: str | None,
    model: str | None,
    settings: Settings,
    *,
    version: bool | None = None,
    where: str = "argument",
) -> Ref:
    """The model (and version) a command is about, one rule for every command:
    ``NAME@VERSION`` names both; a bare ``VERSION`` (``1.1.0``) or no argument takes the
    model from ``-m/--model``, else the configured default model; a bare ``NAME`` is a
    model. ``version`` as for ``parse_ref``. ``-m`` and a ``NAME@`` that disagree are a
    usage error."""
    named = check_model(model) if model else None
    if target and SEMVER.match(target):
        ref = Ref(named or settings.model_name, target)
    elif target:
        ref = parse_ref(target, version=version, where=where)
        if named and named != ref.name:
            raise UsageProblem(
                f"{where} {target!r} is a version of {ref.name!r}, not of -m {named!r}"
            )
        return ref
    else:
        ref = Ref(named or settings.model_name)
    if version is True and ref.version is None:
        raise UsageProblem(
            f"{where}: name a version, e.g. {ref.name}@1.1.0 (or 1.1.0 with -m {ref.name})"
        )
    if version is False and ref.version is not None:
        raise UsageProblem(f"{where} {target!r}: name a model here, not a version")
    return ref


def model_or_default(name: str | None, settings: Settings) -> str:
    """The model a command is about: the one named, else the configured default model."""
    return check_model(name) if name else settings.model_name


# Options shared by many commands.
ModelOption = Annotated[
    str | None,
    typer.Option(
        "-m",
        "--model",
        help="The model (default: the configured default model, SCOREMESH_MODEL_NAME).",
        show_default=False,
    ),
]
