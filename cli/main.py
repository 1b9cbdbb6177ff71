"""The ``keystay`` command: one entry point, one command group per audience.

- ``keystay device ...``  the employee's daemon and controls (runs on the laptop)
- ``keystay server ...``  the ML team's SuperLink and enrolled devices
- ``keystay round ...``   starting federated rounds
- ``keystay budget ...``  privacy budget reports for security
- ``keystay demo``        a whole federation on this machine, on simulated employees
- ``keystay sim``         N simulated employees on Flower's Simulation Engine (Ray)

Groups are imported only when used, so ``keystay device run`` never loads the
server side (or torch).

:func:`run` is the console entry point. Each command maps the errors it
expects to its own documented exit code; ``run`` is the net under all of
them, so that no command ends in a Python traceback: a
:class:`~keystay.common.errors.KeystayError` that escapes a command is its
sentence on stderr and its class's exit code
(:mod:`keystay.common.exitcodes`); anything else is unexpected, one sentence
and exit code 1 (``KEYSTAY_DEBUG=1`` shows the traceback, for a bug report).
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import click

from keystay.common import __version__
from keystay.common.errors import KeystayError
from keystay.common.exitcodes import ExitCode

# name -> (module, attribute, one-line help shown in `keystay --help`)
_GROUPS: dict[str, tuple[str, str, str]] = {
    "device": ("keystay.client.device_cli", "device",
               "Run and control the device daemon (employees)."),
    "server": ("keystay.server.cli", "server",
               "Set up and run the federation server (ML team)."),
    "round": ("keystay.server.cli", "round_", "Start federated training rounds (ML team)."),
    "budget": ("keystay.server.report.cli", "budget",
               "Privacy budget reports and checks (security)."),
    "demo": ("keystay.server.demo", "demo",
             "Run a whole federation here on simulated employees."),
    "sim": ("keystay.sim.federation.cli", "sim",
            "Simulate a federation of N employees on Flower's Simulation Engine (ML team)."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(_GROUPS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in _GROUPS:
            return None
        module, attribute, _ = _GROUPS[name]
        command: click.Command = getattr(importlib.import_module(module), attribute)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Help for the top level comes from the table, so listing commands
        # does not import every group (and torch with it).
        with formatter.section("Commands"):
            formatter.write_dl([(name, info[2]) for name, info in _GROUPS.items()])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="keystay")
def main(**_: Any) -> None:
    """keystay: learn how people use computers without their data leaving their machines.

    Employees run the device daemon; it records input as tokens into an
    encrypted local store and trains the shared model locally with DP-SGD under
    the employee's own policy. Only clipped, noised updates and signed privacy
    reports reach the server.

    Start with `keystay demo` to see a whole federation on this machine, or
    `keystay device --help` if you are an employee.

    Each command's --help lists its exit codes; 1 means an unexpected error
    (a bug: rerun with KEYSTAY_DEBUG=1 and report the traceback).
    """


#: Exit code for an error no command expected (a bug): see :func:`run`.


def run() -> None:
    """The ``keystay`` console script: :func:`main`, with no traceback reaching a user."""
    try:
        main.main(prog_name="keystay")
    except KeystayError as error:
        # An expected kind of error a command did not catch: its sentence and
        # its own documented code, never a traceback.
        if os.environ.get("KEYSTAY_DEBUG"):
            raise
        click.echo(f"keystay: {error}", err=True)
        sys.exit(int(error.exit_code))
    except Exception as error:  # the last net: every expected error has its own code
        if os.environ.get("KEYSTAY_DEBUG"):
            raise
        click.echo(
            f"keystay: unexpected error, nothing more was done: {type(error).__name__}: "
            f"{error}\nThis is a bug in keystay. Rerun with KEYSTAY_DEBUG=1 to see where it "
            "happened, and report that.",
            err=True,
        )
        sys.exit(ExitCode.UNEXPECTED)
