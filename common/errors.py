"""keystay's one error language: every error a user can meet is a :class:`KeystayError`.

Design
------
Each part raises its own subclass (a store that cannot be opened, a policy
that does not parse, a SuperLink that is down), with a message written as a
sentence for the person who must act on it. Each class names the exit code a
command ends with when that error escapes it (:attr:`KeystayError.exit_code`,
from :mod:`keystay.common.exitcodes`); an instance may carry a more precise
one. Commands still catch what they expect and add context, but
:func:`keystay.cli.main.run` maps *any* KeystayError that escapes to its code
and one line on stderr, so no command ends in a traceback.

Subclasses keep their historical built-in bases too (``ValueError`` for bad
input, ``RuntimeError`` for a broken environment), so callers that catch
those keep working.

>>> class DiskFullError(KeystayError):
...     exit_code = ExitCode.DEVICE_STORE
>>> error = DiskFullError("the disk is full; free some space")
>>> int(error.exit_code), str(error)
(11, 'the disk is full; free some space')
"""

from __future__ import annotations

from keystay.common.exitcodes import ExitCode


class KeystayError(Exception):
    """Base of every keystay error; its message is a sentence a user can act on."""

    #: The exit code a command ends with when this error escapes it (a class
    #: default; an instance may set its own).
    exit_code: ExitCode = ExitCode.UNEXPECTED


__all__ = ["ExitCode", "KeystayError"]
