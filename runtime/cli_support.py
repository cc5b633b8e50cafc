"""What both CLIs share: output streams, progress bars, and turning ECARErrors into exit codes."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from runtime.errors import ECARError

F = TypeVar("F", bound=Callable[..., Any])

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def debug_enabled() -> bool:
    return os.environ.get("ECAR_DEBUG", "") not in ("", "0") or "--debug" in sys.argv


def console() -> Console:
    """Messages for people go to stderr; stdout stays clean for data (--json, paths). Text, not markup."""
    return Console(stderr=True, highlight=False, soft_wrap=True, markup=False)


def stdout_console() -> Console:
    """Results for people on stdout: fitted to a terminal; piped or redirected, whole values (no 80-column cut)."""
    piped = not sys.stdout.isatty()
    return Console(highlight=False, width=1_000 if piped else None, soft_wrap=piped)


def progress_bar() -> Progress:
    """A rich progress bar on stderr, silent when stderr is not a terminal (piped, CI)."""
    err = console()
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        disable=not err.is_terminal,
        transient=False,
    )


def show_warnings_as_lines() -> None:
    """Print every :class:`ECARWarning` as one ``warning: ...`` line on stderr (no file:line, no source)."""
    import warnings

    from runtime.errors import ECARWarning

    if getattr(warnings.showwarning, "ecar_lines", False):
        return
    default = warnings.showwarning

    def show(
        message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None, line: Any = None
    ) -> None:
        if issubclass(category, ECARWarning):
            console().print(f"warning: {message}")
        else:
            default(message, category, filename, lineno, file, line)

    show.ecar_lines = True  # type: ignore[attr-defined]
    warnings.showwarning = show


def fail_on_ecar_errors(func: F) -> F:
    """Run a CLI command; an ECARError becomes a one-paragraph message and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        show_warnings_as_lines()
        try:
            return func(*args, **kwargs)
        except ECARError as exc:
            if debug_enabled():
                raise
            # the message is text, not markup: "[serve]" or a path with brackets must print as written
            console().print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, highlight=False)
            raise SystemExit(EXIT_USER_ERROR) from None
        except KeyboardInterrupt:
            console().print("interrupted")
            raise SystemExit(EXIT_INTERRUPTED) from None

    return wrapper  # type: ignore[return-value]


def parse_labels(labels: str | None, per_class: int | None, num_classes: int) -> list[int]:
    """``--labels 3,1,4`` or ``--per-class N`` (default: every class once) -> a label list."""
    from runtime.errors import InvalidRequestError

    if labels is not None and per_class is not None:
        raise InvalidRequestError("--labels and --per-class exclude each other; give one of them")
    if labels is not None:
        parts = [part.strip() for part in labels.split(",")]
        if not labels.strip() or any(not part for part in parts):
            raise InvalidRequestError(f"--labels {labels!r}: give comma-separated class numbers, e.g. --labels 3,1,4")
        values = []
        for part in parts:
            try:
                value = int(part)
            except ValueError:
                raise InvalidRequestError(f"--labels: '{part}' is not an integer class label") from None
            if not 0 <= value < num_classes:
                raise InvalidRequestError(
                    f"--labels: class {value} is out of range; this model knows 0..{num_classes - 1}"
                )
            values.append(value)
        return values
    count = 1 if per_class is None else per_class
    if count < 1:
        raise InvalidRequestError(f"--per-class must be at least 1, got {count}")
    from runtime.pipeline import MAX_SAMPLES

    if count * num_classes > MAX_SAMPLES:
        raise InvalidRequestError(
            f"--per-class {count:,} asks for {count * num_classes:,} samples; one run makes at most {MAX_SAMPLES:,} "
            f"(--per-class {MAX_SAMPLES // num_classes:,} for this model's {num_classes} classes): run it several "
            "times with different --seed values"
        )
    return [c for c in range(num_classes) for _ in range(count)]
