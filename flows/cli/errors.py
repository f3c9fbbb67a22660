"""Every failure of the command line is one ``error:`` line and a non-zero exit, never a traceback.

Expected failures (missing data, bad paths, bad values) exit 1, Ctrl-C exits
130; a traceback then always means a bug. Usage errors (Typer's own) are
turned into the same one line by `OneLineUsageErrors`, stage errors by the
`one_line_errors` decorator every command wears.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from typer.core import TyperGroup

# ImportError: an optional package missing where a command needs it (matplotlib for pictures in the serve image)
EXPECTED_ERRORS = (FileNotFoundError, ValueError, OSError, FloatingPointError, ImportError)
Command = TypeVar("Command", bound=Callable[..., Any])


def fail(message: str, code: int = 1) -> typer.Exit:
    """One ``error:`` line on stderr (never wrapped, never read as markup) and a non-zero exit."""
    one_line = " ".join(message.split()) or "failed"
    Console(stderr=True, highlight=False, soft_wrap=True).print(f"error: {one_line}", markup=False)
    return typer.Exit(code=code)


class OneLineUsageErrors(TyperGroup):
    """Usage errors (a missing argument, an unknown option, a bad value) as one ``error:`` line and exit 1.

    Typer draws them as a framed panel with exit 2; every failure of this
    command line is one line, so scripts and people read them alike.
    """

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except typer.Abort:
            fail("interrupted", code=130)
            sys.exit(130)
        except typer.TyperException as error:  # Typer's (vendored) click usage errors
            context = getattr(error, "ctx", None)
            if type(error).__name__ == "NoArgsIsHelpError" and context is not None:  # a bare group: its help
                help_text = context.get_help()  # Typer's rich help prints itself and returns ""
                if help_text:
                    typer.echo(help_text)
                sys.exit(0)
            command = context.command_path if context is not None else "mocoplus"
            fail(f"{error.format_message()} (see: {command} --help)")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def one_line_errors(command: Command | None = None, *, interrupted: str = "interrupted") -> Any:
    """Expected failures of a command → one ``error:`` line and exit 1; Ctrl-C → ``interrupted`` and exit 130.

    Used bare (``@one_line_errors``) or with the message that tells how to
    continue after Ctrl-C.
    """

    def decorate(function: Command) -> Command:
        @functools.wraps(function)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return function(*args, **kwargs)
            except EXPECTED_ERRORS as error:
                raise fail(str(error) or type(error).__name__) from None
            except KeyboardInterrupt:
                raise fail(interrupted, code=130) from None

        return run  # type: ignore[return-value]

    return decorate(command) if command is not None else decorate
