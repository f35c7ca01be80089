"""Reading a site's TOML config: typed access to its tables (``ConfigReader``), raising the
errors that name the file, the key and what was expected (``ConfigError``, the config
layer's root in ``qkdd.errors``), and the collection of several independent problems into
one report (``ConfigProblems``, raising ``ConfigErrors``)."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from qkdd.errors import ConfigError as ConfigError

T = TypeVar("T")

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")


class ConfigErrors(ConfigError):
    """Several independent problems in one config file: ``problems`` holds each, the first
    gives ``file``, ``key`` and ``expected``, and the message has one line per problem."""

    def __init__(self, problems: list[ConfigError]) -> None:
        first = problems[0]
        self.file, self.key, self.expected = first.file, first.key, first.expected
        self.problems = tuple(problems)
        Exception.__init__(self, "\n".join(str(problem) for problem in problems))


class ConfigReader:
    """Typed access to one TOML table, raising ConfigError with the full key path."""

    def __init__(self, file: Path, table: Mapping[str, Any], prefix: str = "") -> None:
        self.file = file
        self.table = table
        self.prefix = prefix

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def error(self, name: str, expected: str, got: object = None) -> ConfigError:
        return ConfigError(self.file, self.key(name), expected, got)

    def get(self, name: str, kind: type[T], expected: str, default: Any = ...) -> T:
        if name not in self.table:
            if default is ...:
                raise self.error(name, f"{expected} (the key is missing)")
            return default  # type: ignore[no-any-return]
        value = self.table[name]
        # bool is an int subclass; refuse it where a number is meant
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.error(name, expected, value)
        return value

    def identifier(self, name: str) -> str:
        value = self.get(name, str, "an identifier of 1-64 letters, digits, '.', '_', ':', '-'")
        if not ID_PATTERN.fullmatch(value):
            raise self.error(
                name, "an identifier of 1-64 letters, digits, '.', '_', ':', '-'", value
            )
        return value

    def integer(self, name: str, low: int, high: int, default: Any = ...) -> int:
        expected = f"an integer from {low} to {high}"
        value = self.get(name, int, expected, default)
        if not low <= value <= high:
            raise self.error(name, expected, value)
        return value

    def path(self, name: str, default: Any = ..., *, resolve: bool = True) -> Path:
        value = self.get(
            name, str, "a file system path (relative paths start at the config file)", default
        )
        if not value or "\x00" in value:
            raise self.error(name, "a non-empty path without NUL characters", value)
        if os.path.isabs(value):
            return Path(value)
        joined = self.file.parent / value
        # A device path is often a link that is re-pointed when the device comes back
        # (the emulator's ptys): it must be followed at each open, not once here.
        return joined.resolve() if resolve else Path(os.path.abspath(joined))

    def address(self, name: str) -> tuple[str, int]:
        expected = '"host:port" with a port from 1 to 65535'
        value = self.get(name, str, expected)
        host, sep, port = value.rpartition(":")
        host = host.strip("[]")
        if (
            not sep
            or not host
            or not (port.isascii() and port.isdigit())
            or not 1 <= int(port) <= 65535
        ):
            raise self.error(name, expected, value)
        return host, int(port)

    def table_list(self, name: str) -> list[ConfigReader]:
        items = self.get(name, list, "an array of tables", [])
        readers = []
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                raise ConfigError(self.file, f"{self.key(name)}[{index}]", "a table", item)
            readers.append(ConfigReader(self.file, item, f"{self.key(name)}[{index}]."))
        return readers

    def subtable(self, name: str) -> ConfigReader:
        value = self.get(name, dict, "a table")
        return ConfigReader(self.file, value, f"{self.key(name)}.")

    def reject_unknown(self, known: set[str]) -> None:
        for name in self.table:
            if name not in known:
                raise self.error(name, f"no such key here (known keys: {', '.join(sorted(known))})")


class ConfigProblems:
    """Collects the ConfigError of each independent part of a file, so one run reports them
    all; a part that depends on a failed one is skipped rather than reported twice."""

    def __init__(self) -> None:
        self.errors: list[ConfigError] = []

    def take(self, build: Callable[[], T], fallback: T) -> T:
        try:
            return build()
        except ConfigError as exc:
            self.errors.append(exc)
            return fallback

    def items(
        self, readers: Callable[[], list[ConfigReader]], parse: Callable[[ConfigReader], T]
    ) -> list[T]:
        """Each table of an array parsed on its own (a bad one does not hide the next)."""
        no_tables: list[ConfigReader] = []
        parsed: list[T] = []
        for reader in self.take(readers, no_tables):
            try:
                parsed.append(parse(reader))
            except ConfigError as exc:
                self.errors.append(exc)
        return parsed

    def check(self) -> None:
        if len(self.errors) == 1:
            raise self.errors[0]
        if self.errors:
            raise ConfigErrors(self.errors)
