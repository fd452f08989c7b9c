"""The project's own error types: the command line turns these (and only these) into one-line exits."""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterator

__all__ = [
    "ConfigMismatchError",
    "InputError",
    "LeaseLostError",
    "LnstdError",
    "LnstdWarning",
    "ModelError",
    "OptionError",
    "OutputError",
    "OutputLockedError",
    "ResourceError",
    "UnknownOptionError",
    "UsageError",
    "one_line",
    "one_line_warnings",
]


class LnstdError(Exception):
    """Base of the errors a user can act on; the message says what to do in one line."""


class UsageError(LnstdError, ValueError):
    """A wrong or missing flag or argument (the message names it)."""


class OptionError(LnstdError, ValueError):
    """A setting of the explainer that cannot be used. ``option`` names it as the library spells it
    (``"capture"``, ``"precision"``, or a method option such as ``"std"``), so that the command line
    names the flag the user typed (:attr:`flag`)."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(message)
        self.option = option

    @property
    def flag(self) -> str:
        """The command-line flag that sets this option."""
        return {"capture": "--capture", "precision": "--precision"}.get(self.option, "--option")


class UnknownOptionError(OptionError, TypeError):
    """An option no requested method takes (a TypeError, as for an unexpected keyword argument)."""


class InputError(LnstdError, ValueError):
    """The input cannot be used as given (missing folder, bad manifest, duplicate ids, ...)."""


class OutputError(LnstdError, OSError):
    """The output cannot be written or read (a file where a folder should be, no permission, ...)."""


class ConfigMismatchError(OutputError):
    """The output already holds a run with a different configuration."""


class OutputLockedError(OutputError):
    """Another run holds the output's lease."""


class LeaseLostError(OutputError):
    """This run no longer holds the output's lease: another run took it over; stop committing."""


class ModelError(LnstdError, ValueError):
    """The model cannot be built or loaded (unknown name, missing or mismatched checkpoint)."""


class ResourceError(LnstdError, RuntimeError):
    """The cluster cannot place what the job asks for (CPUs, GPUs)."""


class LnstdWarning(UserWarning):
    """Something a user should know that does not stop the work (e.g. random weights)."""


@contextlib.contextmanager
def one_line_warnings() -> Iterator[None]:
    """Within: the project's warnings are shown as ``lnstd: warning: <message>`` on stderr (one line,
    no source line), each once; other warnings as Python shows them."""
    with warnings.catch_warnings():
        shown = warnings.showwarning
        warnings.simplefilter("default", LnstdWarning)  # once per message and place

        def show(message, category, filename, lineno, file=None, line=None):  # type: ignore[no-untyped-def]
            if issubclass(category, LnstdWarning):
                print(f"lnstd: warning: {one_line(message, 10_000)}", file=sys.stderr, flush=True)
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


def one_line(exc: BaseException | str, limit: int = 200) -> str:
    """An error's message on one line (whitespace runs collapsed), at most ``limit`` characters."""
    return " ".join(str(exc).split())[:limit]
