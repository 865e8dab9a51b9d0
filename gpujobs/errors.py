"""Errors a user can cause or meet. Each message is one line that says what is wrong;
the CLI prints it as `error: <message>` and exits non-zero, without a traceback."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class GpujobsError(Exception):
    """Base of every error gpujobs reports to a user."""

    exit_code = 1


class UsageError(GpujobsError):
    """A command's option or argument is wrong (`ls --state bogus`); exit 2, as for Click's own
    usage errors and for a bad spec."""

    exit_code = 2


class InvalidSpec(GpujobsError, ValueError):
    """A job's input or parameters are wrong; nothing was queued."""

    exit_code = 2

    @classmethod
    def from_validation(cls, exc: ValidationError) -> InvalidSpec:
        """The first of pydantic's errors as one line: `field: what is wrong, got X`."""
        error = exc.errors()[0]
        field = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] in _SHOW_INPUT:
            message = f"{message}, got {error['input']!r}"
        return cls(f"{field}: {message}" if field else message)


# Pydantic error types whose message does not say what the user gave.
_SHOW_INPUT = (
    "literal_error",
    "less_than",
    "less_than_equal",
    "greater_than",
    "greater_than_equal",
)


class BrokerUnreachable(GpujobsError):
    """The configured (or local) broker does not answer."""

    exit_code = 3


class JobNotFound(GpujobsError, KeyError):
    """No record for this job id (never submitted, or expired)."""

    exit_code = 4

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "job not found"


class JobFailed(GpujobsError):
    """`Job.result()` on a job that failed or was cancelled."""

    exit_code = 5


class LocalStackError(GpujobsError):
    """The embedded local stack could not be started or stopped."""

    exit_code = 6
