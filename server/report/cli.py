"""``keystay budget``: the privacy-budget commands a security reviewer runs.

The lead wires :data:`budget` into the root ``keystay`` command group.
"""

from __future__ import annotations

from pathlib import Path

import click

from keystay.common.exitcodes import ExitCode
from keystay.server.ledger.ledger import LedgerNotFoundError, ServerLedger, ServerLedgerError
from keystay.server.report.budget import build_report, check
from keystay.server.report.render import render_json, render_plot, render_table

_EXIT_CODES_HELP = (
    "\b\nExit codes:\n"
    f"  {ExitCode.OK}  clean: no violations\n"
    f"  {ExitCode.BUDGET_LEDGER_UNREADABLE}  the ledger exists but cannot be read "
    "(corrupt or newer format)\n"
    f"  {ExitCode.USAGE}  usage error: bad option, or no ledger in --server-dir\n"
    f"  {ExitCode.BUDGET_VIOLATIONS}  violations found (listed on stdout)"
)

_SERVER_DIR = click.option(
    "--server-dir",
    required=True,
    type=click.Path(file_okay=False, dir_okay=True, path_type=Path),
    help="The server folder of the federation (the one given to 'keystay round start'); "
    "it holds ledger.v1.sqlite. Nothing in it is changed.",
)
_MAX_CENTRAL = click.option(
    "--max-central-epsilon",
    type=click.FloatRange(min=0.0, min_open=True),
    default=None,
    help="Treat a run whose central-DP epsilon exceeds this as a violation. "
    "Without it, central epsilon is reported but only an unbounded one is a violation.",
)


def _open(server_dir: Path) -> ServerLedger:
    try:
        return ServerLedger.open(server_dir, create=False)
    except LedgerNotFoundError as error:
        raise click.UsageError(str(error)) from error
    except ServerLedgerError as error:
        click.echo(f"error: {error}", err=True)
        raise SystemExit(ExitCode.BUDGET_LEDGER_UNREADABLE) from error


@click.group(
    help=(
        "Privacy budgets, as the devices signed them.\n\n"
        "Every device enforces its own budgets and sends, with each model update, a "
        "privacy report signed with its enrolled Ed25519 key. Employee-day rounds "
        "(the default) give each day two epsilons, each per employee-day and each with "
        "its own budget: against an honest-but-curious server (it sees only the sum of "
        "several devices' updates) and against a server that breaks secure aggregation "
        "(it sees this device's update alone). Record-level rounds give one epsilon per "
        "record (33 consecutive input events, each event in exactly one record). "
        "The server ledger stores each report with its exact bytes and "
        "signature and a verdict. These commands read that ledger: they never change "
        "it and never contact a device.\n\n"
        "Figures are only counted from reports that verify under the device's "
        "enrolled key; everything else is listed as a violation, first."
    )
)
def budget() -> None:
    """The ``keystay budget`` group."""


@budget.command(
    "report",
    epilog=(
        "\b\nExit codes:\n"
        f"  {ExitCode.OK}  report printed (even with violations: use 'check' to gate)\n"
        f"  {ExitCode.BUDGET_LEDGER_UNREADABLE}  the ledger exists but cannot be read\n"
        f"  {ExitCode.USAGE}  usage error: bad option, no ledger in --server-dir, or --plot / "
        "--html not writable"
    ),
)
@_SERVER_DIR
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print JSON (schema keystay.budget-report/v2, documented in "
    "keystay.server.report.budget) instead of the table.",
)
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    default=None,
    help="Also write a PNG: each device's most-spent block epsilon in report order, "
    "against the budget line; red crosses mark flagged reports. With employee-day "
    "reports, a second panel shows the epsilon against a server that breaks secure "
    "aggregation, against its own budget.",
)
@click.option(
    "--html",
    "html_file",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    default=None,
    help="Also write the report as one self-contained HTML file (inline CSS and SVG, no "
    "script, nothing fetched): status first, bars per device and day, ε over time, the "
    "ledger's SHA-256. Opens offline in any browser; its figures are --json's.",
)
@_MAX_CENTRAL
def report_command(
    server_dir: Path,
    as_json: bool,
    plot: Path | None,
    html_file: Path | None,
    max_central_epsilon: float | None,
) -> None:
    """Show what every device has spent, per block, and everything that needs a look.

    \b
    Sections, in order:
      VIOLATIONS            over-budget blocks, tampered ledger rows, contradictions
                            (a device's epsilon went down, a retired block was charged
                            again, two reports for one round), unverifiable reports,
                            central-DP problems
      UNVERIFIABLE REPORTS  unknown or revoked device, bad signature, replayed or
                            malformed report: their figures are not counted
      DEVICES AND BLOCKS    per pseudonymous device id and record-level block:
                            epsilon spent, budget, remaining, retired, runs
      DEVICES AND DAYS      per device and employee-day: epsilon against an
                            honest-but-curious server and against a server that
                            breaks secure aggregation, each of its own budget
      CENTRAL DP PER RUN    server-side user-level DP: noise, clip, sampling, epsilon
      REFUSALS              rounds a device declined, in the device's words

    Every signature is re-checked against the enrolled keys each time this runs, so
    an edit to the ledger file after the fact shows up as 'tampered'.
    """
    with _open(server_dir) as ledger:
        report = build_report(ledger, max_central_epsilon=max_central_epsilon)
    click.echo(render_json(report) if as_json else render_table(report), nl=False)
    if plot is not None:
        try:
            render_plot(report, plot)
        except ImportError as error:  # a device install, without the server extra
            raise click.BadParameter(
                "matplotlib is not installed: it comes with keystay's server extra "
                "(pip install 'keystay[server]')", param_hint="--plot"
            ) from error
        except OSError as error:
            raise click.BadParameter(
                f"cannot write {plot}: {error}", param_hint="--plot"
            ) from error
        click.echo(f"plot written to {plot}", err=True)
    if html_file is not None:
        from keystay.server.report.html import write_html

        try:
            write_html(report, html_file)
        except OSError as error:
            raise click.BadParameter(
                f"cannot write {html_file}: {error}", param_hint="--html"
            ) from error
        click.echo(f"HTML report written to {html_file}", err=True)


@budget.command("check", epilog=_EXIT_CODES_HELP)
@_SERVER_DIR
@_MAX_CENTRAL
def check_command(server_dir: Path, max_central_epsilon: float | None) -> None:
    """Exit non-zero if any device or run is over policy, or any report is suspect.

    \b
    A violation is any of:
      - a device reported a block over its budget (over-budget)
      - a verified report no longer checks out as stored (tampered)
      - a device's figures contradict its earlier signed reports (contradiction)
      - a report that does not verify under the enrolled key (unverifiable)
      - a run whose central-DP epsilon is unbounded, decreasing, or above
        --max-central-epsilon

    Prints one line per violation. Use it in a cron job or CI gate; run
    'keystay budget report' for the full picture.
    """
    with _open(server_dir) as ledger:
        violations = check(ledger, max_central_epsilon=max_central_epsilon)
    if not violations:
        click.echo("budget check: clean (no violations)")
        raise SystemExit(ExitCode.OK)
    click.echo(f"budget check: {len(violations)} violation(s)")
    for v in violations:
        where = " ".join(
            part
            for part in (
                f"device={v.device_id}" if v.device_id else "",
                f"run={v.run_id}" if v.run_id else "",
                f"round={v.server_round}" if v.server_round is not None else "",
                f"block={v.block}" if v.block else "",
                f"report=#{v.report_id}" if v.report_id is not None else "",
            )
            if part
        )
        click.echo(f"  {v.kind}: {where}: {v.detail}")
    raise SystemExit(ExitCode.BUDGET_VIOLATIONS)
