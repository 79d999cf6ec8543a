"""One node setting declared once: its flag, POLTERGUST_* variable, default, help, parsing and check.

`settings.Settings` declares each of its fields as
`field(default=..., metadata=option(FLAG, help=..., ...))`: the field's default
is the option's too. Everything else is generated from those declarations:
the argparse flags (`add_options`), the values a deploy hands over as text
(`Option.convert`), and the README's table of flags (`markdown_table`). Help
texts may hold `code` spans: the README shows them as code, `--help` without
the backticks.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from poltergust.errors import PoltergustError

Check = Callable[[Any], "str | None"]
"""A value's problem (said after the flag, e.g. "must be 10 to 600 seconds (got 5)"), or None when it is fine."""


class SettingError(PoltergustError, ValueError):
    """A bad setting, with the flag it came from: the node says the flag, the deploy check the metadata key."""

    def __init__(self, flag: str, problem: str, message: str | None = None) -> None:
        self.flag = flag
        self.problem = problem
        super().__init__(message or f"--{flag}: {problem}")


@dataclass(frozen=True)
class Option:
    """How one setting is given and shown; `default` (its field's) is the value without flag and variable."""

    flag: str
    help: str
    default: Any = None
    parse: Callable[[str], Any] = str
    metavar: str | None = None
    choices: tuple[str, ...] = ()
    repeatable: bool = False
    """Flags repeat; the variable holds the values separated by spaces."""
    switch: bool = False
    """true or false, and the bare flag means true."""
    shown_default: str | None = None
    """The default as help and README say it, when the value does not say it well (a host name, a path)."""
    fallback: Callable[[Mapping[str, str]], Any] | None = None
    """The default looked up where the node starts (such as the host name), from its environment."""
    check: Check | None = None

    @property
    def variable(self) -> str:
        return "POLTERGUST_" + self.flag.upper().replace("-", "_")

    @property
    def dest(self) -> str:
        return self.flag.replace("-", "_")

    def initial(self, environ: Mapping[str, str]) -> Any:
        """The value before flags: from the variable (as text, for argparse to parse), else the default."""
        if self.repeatable:
            return environ.get(self.variable, "").split()
        if self.variable in environ:
            return environ[self.variable]
        return self.fallback(environ) if self.fallback else self.default

    def convert(self, text: str) -> Any:
        """The value of one flag given as text, as argparse would parse it; SettingError for bad text."""
        try:
            value = self.parse(text)
        except (ValueError, argparse.ArgumentTypeError) as exc:
            # As argparse says it for int and float; a parser of this package's own says what it expects.
            builtin = self.parse in (int, float, str)
            raise SettingError(self.flag, f"invalid {self.parse.__name__} value: {text!r}" if builtin
                               else str(exc)) from None
        if self.choices and value not in self.choices:
            raise SettingError(self.flag, f"invalid choice {text!r} (choose from {', '.join(self.choices)})")
        return value

    def problem(self, value: Any) -> SettingError | None:
        problem = self.check(value) if self.check else None
        return SettingError(self.flag, problem) if problem else None

    def shown(self, value: Any = None) -> str:
        """The default (or `value`) as help and the README say it; empty when there is none to say."""
        if value is None:
            if self.shown_default is not None:
                return self.shown_default
            value = self.default
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, float):
            return f"{value:g}"
        return "" if value in (None, "", []) else str(value)

    def usage(self) -> str:
        """The flag as a user writes it, e.g. `--max-concurrent N`."""
        if self.switch:
            return f"--{self.flag} [{self.metavar or 'BOOL'}]"
        return f"--{self.flag} {self.metavar or self.dest.upper()}"


def option(flag: str, **how: Any) -> dict[str, Option]:
    """A dataclass field's metadata declaring its option (its default is the field's: see `options_of`)."""
    return {"option": Option(flag, **how)}


def options_of(cls: Any) -> list[Option]:
    """The options declared on a dataclass's fields, in declaration order, each with its field's default."""
    options = []
    for field in dataclasses.fields(cls):
        if "option" not in field.metadata:
            continue
        default = field.default
        if default is dataclasses.MISSING:
            default = None if field.default_factory is dataclasses.MISSING else field.default_factory()
        options.append(dataclasses.replace(field.metadata["option"], default=default))
    return options


def boolean(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def plain(text: str) -> str:
    """Help text for a terminal: the README's `code` spans without backticks."""
    return text.replace("`", "")


def add_options(parser: argparse.ArgumentParser, options: Iterable[Option], environ: Mapping[str, str]) -> None:
    """One flag per option; each default comes from its variable in `environ`, and `--help` shows both."""
    for option in options:
        kwargs: dict[str, Any] = {"metavar": option.metavar}
        if option.repeatable:
            # Filled from the variable after parsing (Option.initial), so that flags replace it.
            kwargs.update(action="append", default=None)
            shown = ""
        else:
            default = option.initial(environ)
            kwargs.update(default=default, type=option.parse)
            # What this node would use, when it comes from its environment, else the declared default.
            shown = (option.shown(default) if option.variable in environ or option.fallback else "") or option.shown()
        if option.switch:
            kwargs.update(nargs="?", const="true", metavar=option.metavar or "BOOL")
        if option.choices:
            kwargs["choices"] = option.choices
        shown = f" (default: {plain(shown)})" if shown else ""
        parser.add_argument(f"--{option.flag}", help=f"{plain(option.help)}{shown} [{option.variable}]", **kwargs)


def markdown_table(options: Iterable[Option]) -> str:
    """The README's table of flags: flag, variable, meaning (with the default)."""
    lines = ["| flag | variable | meaning |", "| --- | --- | --- |"]
    for option in options:
        shown = option.shown()
        meaning = option.help + (f" (default: {shown})" if shown else "")
        lines.append(f"| `{option.usage()}` | `{option.variable}` | {meaning} |")
    return "\n".join(lines) + "\n"
