"""One exception hierarchy for the whole toolchain.

Every error a user can cause (a wrong path, a corrupt file, a bad argument) is an
:class:`ECARError`; the CLIs turn these into a one-paragraph message and a non-zero
exit code instead of a traceback. Errors in a caller's arguments are also
``ValueError``s so that plain Python callers can catch them the usual way.
"""

from __future__ import annotations


class ECARError(Exception):
    """Base class of every error the toolchain reports to its user."""


class ConfigError(ECARError, ValueError):
    """A model configuration field is invalid; the message names the field."""


class CheckpointError(ECARError):
    """A checkpoint file is missing, corrupt, unsafe or does not fit the model."""


class ManifestError(ECARError):
    """An engine directory's manifest is missing, malformed or does not match its files."""


class EngineError(ECARError):
    """A graph or engine file cannot be loaded or run."""


class BackendUnavailableError(ECARError):
    """The requested inference backend is not installed or has no usable device."""


class InvalidRequestError(ECARError, ValueError):
    """Arguments of a generate call (labels, seeds, cfg, batch size) are invalid."""


class OutputError(ECARError):
    """Results could not be written where the user asked."""


class ECARWarning(UserWarning):
    """Something the user should know that does not stop the work (a fallback, a discarded cache).

    Raised through :mod:`warnings`; both CLIs print each one as a single ``warning:`` line on stderr.
    """


def shown(value: object, limit: int = 120) -> str:
    """A value from a file or a caller as message text: ``repr``, cut short (a 5,000-digit number stays readable).

    ``repr`` of an int beyond Python's int-to-string limit raises ``ValueError``; this never does.
    """
    try:
        text = str(value) if isinstance(value, BaseException) else repr(value)
    except ValueError:  # an int with more digits than sys.get_int_max_str_digits()
        text = (
            f"<an integer of about {int(value.bit_length() * 0.30103) + 1:,} digits>" if isinstance(value, int) else "?"
        )
    return text if len(text) <= limit else text[: limit - 1] + "…"
