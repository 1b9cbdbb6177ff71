"""Every exit code a keystay command can end with, and what it means.

Design
------
One registry, as Flower's ``ExitCode``: an :class:`~enum.IntEnum` whose
names say which command (``DEVICE_``, ``ENROLL_``, ``SERVER_``, ``PAGE_``,
``BUDGET_``) and a help line per code in :data:`EXIT_CODE_HELP`, which each
command's ``--help`` quotes and a test holds complete. Codes are grouped by
tens per command, so a code read in a log names its command. The numbers are
the ones the commands documented before there was a registry, unchanged.

Codes 0, 1 and 2 are shared: success, an unexpected error (a bug; see
:func:`keystay.cli.main.run`) and a usage error (click's own code). ``keystay
budget`` documented 1 for an unreadable ledger before the registry existed;
:attr:`ExitCode.BUDGET_LEDGER_UNREADABLE` keeps that number as an alias of
:attr:`ExitCode.UNEXPECTED` rather than change what scripts check.

>>> int(ExitCode.SERVER_LEDGER), exit_help(ExitCode.SERVER_LEDGER).split(":")[0]
(24, 'keystay server')
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """The exit codes of every ``keystay`` command."""

    OK = 0
    UNEXPECTED = 1
    BUDGET_LEDGER_UNREADABLE = 1  # alias of UNEXPECTED: the number budget documented
    USAGE = 2
    BUDGET_VIOLATIONS = 3

    DEVICE_POLICY = 10
    DEVICE_STORE = 11
    DEVICE_NO_DISPLAY = 12
    DEVICE_TRAINER = 13
    DEVICE_SOCKET = 14
    DEVICE_SERVER_CODE_ACCESS = 15
    DEVICE_LEDGER = 16

    SERVER_CONFIG = 20
    SERVER_SUPERLINK_DOWN = 21
    SERVER_RUN_FAILED = 22
    SERVER_ENROLL_REFUSED = 23
    SERVER_LEDGER = 24
    SERVER_DISK_FULL = 25
    SERVER_SUPERLINK_STATE = 26

    ENROLL_SERVER_UNREACHABLE = 30
    ENROLL_SERVER_UNTRUSTED = 31
    ENROLL_KEYS = 32

    PAGE_NO_DAEMON = 40
    PAGE_CANNOT_LISTEN = 41

    SIM_ENGINE = 50
    SIM_RUN_FAILED = 51

    REAPER_PARENT_GONE = 75


#: One line per code: which command, and what happened.
EXIT_CODE_HELP: dict[ExitCode, str] = {
    ExitCode.OK: "any command: done",
    ExitCode.UNEXPECTED: (
        "any command: an unexpected error, a bug (rerun with KEYSTAY_DEBUG=1 and report "
        "it); keystay budget: the ledger exists but cannot be read"
    ),
    ExitCode.USAGE: "any command: usage error (a bad option, a missing file it names)",
    ExitCode.BUDGET_VIOLATIONS: "keystay budget check: violations found (listed on stdout)",
    ExitCode.DEVICE_POLICY: "keystay device run: the policy file is invalid",
    ExitCode.DEVICE_STORE: "keystay device run: the encrypted store cannot be opened",
    ExitCode.DEVICE_NO_DISPLAY: "keystay device run: no display to capture input from",
    ExitCode.DEVICE_TRAINER: "keystay device run: the trainer process cannot start",
    ExitCode.DEVICE_SOCKET: "keystay device run: a daemon socket cannot be served",
    ExitCode.DEVICE_SERVER_CODE_ACCESS: (
        "keystay device run: --superlink in single-user mode without "
        "--accept-server-code-access"
    ),
    ExitCode.DEVICE_LEDGER: (
        "keystay device run: the privacy ledger cannot be read, or was changed behind the "
        "daemon's back (it fails its integrity chain, or its key is missing); nothing was "
        "charged; restore it from a backup, never delete it"
    ),
    ExitCode.SERVER_CONFIG: "keystay server/round: the server folder or settings are invalid",
    ExitCode.SERVER_SUPERLINK_DOWN: "keystay server/round: the SuperLink cannot be reached",
    ExitCode.SERVER_RUN_FAILED: "keystay round start: the run failed",
    ExitCode.SERVER_ENROLL_REFUSED: "keystay server enroll/revoke: the request was refused",
    ExitCode.SERVER_LEDGER: (
        "keystay server: the server ledger cannot be opened or read; nothing was changed"
    ),
    ExitCode.SERVER_DISK_FULL: (
        "keystay round start: the server's disk is full, so the run stopped; nothing "
        "half-written was kept; free space, then start a new run"
    ),
    ExitCode.SERVER_SUPERLINK_STATE: (
        "keystay server start: the SuperLink's state file (DIR/superlink.db) is damaged or "
        "does not match keystay's registry of enrolled devices, so the SuperLink was not "
        "started; it holds no privacy record: move it aside and start again"
    ),
    ExitCode.ENROLL_SERVER_UNREACHABLE: "keystay device enroll: the server cannot be reached",
    ExitCode.ENROLL_SERVER_UNTRUSTED: (
        "keystay device enroll: the server's certificate does not match the fingerprint"
    ),
    ExitCode.ENROLL_KEYS: "keystay device enroll: the device keys cannot be made or read",
    ExitCode.PAGE_NO_DAEMON: "keystay device ui: no daemon answers on the control socket",
    ExitCode.PAGE_CANNOT_LISTEN: "keystay device ui: the page's port cannot be opened",
    ExitCode.SIM_ENGINE: (
        "keystay sim: the simulation engine cannot start (Flower is not the 1.39 release "
        "keystay's extractor fix was written for, the 'sim' extra is not installed, or the "
        "Ray cluster named by --ray-address cannot be reached)"
    ),
    ExitCode.SIM_RUN_FAILED: "keystay sim: the run failed or completed fewer rounds than asked",
    ExitCode.REAPER_PARENT_GONE: (
        "the SuperNode's reaper: the daemon that started it is gone, so it stopped it"
    ),
}


def exit_help(code: ExitCode) -> str:
    """The help line of ``code`` (every code has one; a test holds that)."""
    return EXIT_CODE_HELP[code]

