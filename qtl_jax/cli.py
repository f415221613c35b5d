"""One clear line instead of a traceback when a command line entry point gets bad input.

Every CLI runs its ``main`` through :func:`run_absl` (absl ``app.run`` mains) or :func:`run` (argparse
mains). A *user error* — something the person at the terminal can fix — is printed as one line on stderr,
``<prog>: <ErrorType>: <message>``, and the process exits with a documented code:

=====  ==========================================================================================
code   meaning
=====  ==========================================================================================
0      success
1      ``EXIT_ERROR``: bad input, a missing file, a corrupt checkpoint, a stopped run (the line says what)
2      ``EXIT_USAGE``: a bad flag or argument (an unknown flag, a value of the wrong type, a missing one)
130    ``EXIT_INTERRUPTED``: Ctrl-C (128 + SIGINT)
=====  ==========================================================================================

User errors are: ``OSError`` (a missing or unreadable file, a full disk, a refused connection: the
message names the path or address), ``ValueError`` (config validation and bad values, JSON that does not
parse), ``FloatingPointError`` (a non-finite loss), and any exception class defined in this package or
in ``configs`` (our own errors, raised with a message written for the user). Anything
else is a bug and keeps its traceback. ``QTL_JAX_TRACEBACK=1`` in the environment, or ``--verbosity=1``
(``-v 1``) for an absl CLI, prints the traceback of user errors too.

Use in an entry point::

    if __name__ == "__main__":      # absl: flags are module-level DEFINE_*s, main(argv)
        cli.run_absl(main)

    if __name__ == "__main__":      # argparse: main() parses sys.argv itself
        cli.run(main, prog="python -m qtl_jax.chat")

This module imports nothing heavy (no JAX), so it costs nothing before a CLI fails on its flags.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
TRACEBACK_ENV = "QTL_JAX_TRACEBACK"

USER_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, FloatingPointError)
_OWN_PACKAGES = ("qtl_jax", "configs")
_MAX_LINE = 2000


class UsageError(Exception):
    """A bad command line (flag or argument); printed as one line, exit code ``EXIT_USAGE``."""


def is_user_error(e: BaseException) -> bool:
    """Whether ``e`` is an error the user can fix from its message (see the module docstring)."""
    return isinstance(e, USER_ERRORS) or type(e).__module__.split(".")[0] in _OWN_PACKAGES


def one_line(text: str) -> str:
    """``text`` with its line breaks and runs of spaces folded into single spaces (and a length cap).

    A message that embeds a formatted traceback (ml_collections does, for an error in a config file)
    keeps the text before it and the traceback's last line, the error itself.
    """
    marker = "Traceback (most recent call last):"
    if marker in text:
        head, _, tail = text.partition(marker)
        last = [line for line in tail.splitlines() if line.strip()][-1:]
        text = " ".join([head, *last])
    text = " ".join(text.split())
    return text if len(text) <= _MAX_LINE else text[: _MAX_LINE - 3] + "..."


def describe(e: BaseException) -> str:
    """``'<ErrorType>: <message>'`` on one line."""
    message = one_line(str(e))
    if isinstance(e, KeyError) and len(e.args) == 1:
        message = one_line(str(e.args[0]))  # str(KeyError) adds quotes around the message
    return f"{type(e).__name__}: {message}" if message else type(e).__name__


def traceback_wanted() -> bool:
    """``QTL_JAX_TRACEBACK`` is set (to anything but ''/'0'), or absl's ``--verbosity`` is 1 or more."""
    if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
        return True
    absl_flags = sys.modules.get("absl.flags")
    if absl_flags is not None:
        flag_values = absl_flags.FLAGS
        with contextlib.suppress(Exception):  # flags not defined or not parsed yet
            return flag_values.is_parsed() and int(flag_values["verbosity"].value) >= 1
    return False


def fail(prog: str, line: str, code: int, error: BaseException | None = None) -> NoReturn:
    """Prints ``<prog>: <line>`` (after the traceback of ``error`` if it is wanted) and exits with ``code``."""
    if error is not None and traceback_wanted():
        traceback.print_exception(error)
    sys.stdout.flush()
    print(f"{prog}: {line}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def print_error(error: BaseException) -> None:
    """``error: <message>`` on one line of stderr (after the traceback when it is wanted).

    For mains that sort out their own input errors and choose their exit status (the data builders
    and ``level_selection`` exit 2 on bad input); under :func:`run` they get the same traceback opt-in.
    """
    if traceback_wanted():
        traceback.print_exception(error)
    sys.stdout.flush()
    print(f"error: {one_line(str(error))}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _handled(prog: str) -> Iterator[None]:
    try:
        yield
    except UsageError as e:
        fail(prog, f"usage error: {one_line(str(e))} (--help lists the flags)", EXIT_USAGE, e)
    except KeyboardInterrupt as e:
        fail(prog, "interrupted", EXIT_INTERRUPTED, e)
    except Exception as e:  # noqa: BLE001 - sorted into user errors (one line) and bugs (re-raised)
        if not is_user_error(e):
            raise
        fail(prog, describe(e), EXIT_ERROR, e)


@contextlib.contextmanager
def _argparse_errors_as_usage_errors() -> Iterator[None]:
    # argparse prints its usage block and exits from ArgumentParser.error; as a UsageError the message is
    # printed as the one line (the usage stays one --help away). Only this CLI process is affected.
    def error(self: argparse.ArgumentParser, message: str) -> NoReturn:
        raise UsageError(message)

    original = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = error
    try:
        yield
    finally:
        argparse.ArgumentParser.error = original


def run(main: Callable[[], Any], prog: str | None = None) -> NoReturn:
    """Runs an argparse-style ``main()`` (it parses ``sys.argv``) and exits 0, or with one line and a code.

    A ``main`` that returns an exit status (an ``int``, e.g. 2 after :func:`print_error`) exits with it;
    any other return value means success.
    """
    prog = prog or os.path.basename(sys.argv[0])
    with _handled(prog), _argparse_errors_as_usage_errors():
        status = main()
    raise SystemExit(status if isinstance(status, int) and not isinstance(status, bool) else 0)


def _flag_error_line(e: BaseException) -> str:
    if isinstance(e, (AttributeError, KeyError)):
        # ml_collections' config flag: an override of a field the config does not have. Its message (the
        # field, perhaps a "Did you mean" hint) is a KeyError's argument, wrapped in an AttributeError.
        while e.args and isinstance(e.args[0], (AttributeError, KeyError)):
            e = e.args[0]
        return f"no such config field {one_line(str(e.args[0]) if e.args else str(e))}; check the --config.* overrides"
    return one_line(str(e))


def _config_load_error(flag_values: Any) -> BaseException | None:
    """The error of a config flag whose file failed to load (ml_collections defers it to first use)."""
    for name in flag_values:
        value = flag_values[name].value
        if type(value).__module__.startswith("ml_collections"):
            try:
                getattr(value, "keys", None)
            except OSError as e:
                return e
    return None


def run_absl(main: Callable[[list[str]], Any], prog: str | None = None) -> NoReturn:
    """Runs an absl ``main(argv)`` with ``app.run``; flag errors and user errors become one line."""
    from absl import app, flags

    prog = prog or os.path.basename(sys.argv[0])

    def parse(argv: list[str]) -> list[str]:
        try:
            rest = flags.FLAGS(argv)
            error = _config_load_error(flags.FLAGS)
        except (flags.Error, OSError, AttributeError, KeyError, ValueError) as e:
            # Errors while parsing are errors in the flags, whatever raised them (config files load here).
            rest, error = None, e
        if error is not None:
            fail(prog, f"usage error: {_flag_error_line(error)} (--helpfull lists the flags)", EXIT_USAGE, error)
        return rest

    def guarded(argv: list[str]) -> Any:
        try:
            return main(argv)
        except app.UsageError as e:  # absl would print the whole module docstring
            raise UsageError(str(e)) from e

    with _handled(prog):
        app.run(guarded, flags_parser=parse)
    raise SystemExit(0)
