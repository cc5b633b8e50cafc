"""Versioned file formats: the one guard every reader of a versioned document uses.

Three files carry a ``format`` name and a ``format_version``: the engine directory's
``manifest.json`` (:mod:`runtime.manifest`), a calibration set's ``calibration.json``
(:mod:`calibration.dataset`) and an ECAR checkpoint's safetensors metadata
(:mod:`ecar_export.checkpoint`). Each declares a :class:`Format`; its reader goes through
:meth:`Format.read_json` (or :meth:`Format.check` on metadata it read itself) and
:meth:`Format.parse`, so that a damaged, foreign, older or newer file — and a file that is
well-formed but absurd (a 5,000-digit number, nesting too deep to parse) — is always the
format's own one-paragraph error that says what to do, never a traceback.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from runtime.errors import ECARError, shown
from runtime.fileio import sha256_file

T = TypeVar("T")
# What a parser of well-formed JSON can raise on absurd values: int() past Python's digit limit
# (ValueError), floats or ints beyond what numpy or a computation takes (OverflowError), deep nesting.
MALFORMED = (ValueError, TypeError, OverflowError, KeyError, IndexError, RecursionError, AttributeError)


@dataclass(frozen=True)
class Format:
    """A versioned document: its ``format`` name and version, its error class and what to do about a bad one."""

    name: str
    version: int | str
    noun: str  # "manifest"
    what: str  # "an ECAR engine manifest"
    error: type[ECARError]
    redo: str  # "rebuild the engines"
    reader: str = "this toolchain"

    def read_json(self, path: Path) -> dict[str, Any]:
        """The JSON object in ``path``; the format's error where it is unreadable, not JSON or not an object."""
        try:
            data = json.loads(path.read_bytes())
        except (OSError, *MALFORMED) as exc:  # JSONDecodeError and the int digit limit are ValueErrors
            why = shown(exc)
            if isinstance(exc, ValueError) and "integer string conversion" in str(exc):
                why = f"it holds an integer of more than {sys.get_int_max_str_digits():,} digits"
            raise self.error(f"'{path}' is not valid JSON ({why}); {self.redo}") from None
        if not isinstance(data, dict):
            raise self.error(f"{path}: the document must be a JSON object")
        return data

    def check_name(self, data: Mapping[str, Any], where: str) -> None:
        if data.get("format") != self.name:
            raise self.error(f"{where}: not {self.what} (format {shown(data.get('format'))}, expected '{self.name}')")

    def check_version(self, data: Mapping[str, Any], where: str, older: str = "") -> None:
        """Refuse another version; ``older`` explains a version below this one."""
        version = data.get("format_version")
        if version == self.version:
            return
        is_older = (
            isinstance(version, type(self.version))
            and not isinstance(version, bool)
            and str(version).isdigit()
            and int(version) < int(self.version)
        )
        why = f" ({older})" if older and is_older else ""
        raise self.error(
            f"{where}: {self.noun} format version {shown(version)}, {self.reader} reads {self.version}{why}; "
            f"{self.redo}"
        )

    def check(self, data: Mapping[str, Any], where: str) -> None:
        self.check_name(data, where)
        self.check_version(data, where)

    def verify_file(self, path: Path, expected: str, where: str) -> None:
        """``path`` exists and its sha256 is ``expected`` (as the document recorded it), or the format's error."""
        if not path.is_file():
            raise self.error(f"{where}: file '{path}' is missing; {self.redo}")
        try:
            actual = sha256_file(path)
        except OSError as exc:
            raise self.error(f"{where}: cannot read '{path}': {exc}") from None
        if actual != expected:
            raise self.error(
                f"{where}: '{path}' does not match its sha256 in the {self.noun} (corrupt or replaced); {self.redo}"
            )

    def parse(self, where: str, parse: Callable[[], T]) -> T:
        """Run ``parse``; anything it raises that is not this format's error becomes one, naming ``where``."""
        try:
            return parse()
        except self.error:
            raise
        except ECARError as exc:
            raise self.error(f"{where}: {exc}") from None
        except MALFORMED as exc:
            raise self.error(f"{where}: malformed ({type(exc).__name__}: {shown(exc)}); {self.redo}") from None
