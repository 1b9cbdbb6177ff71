"""Auditing a server ledger at rest: does every stored report still check out?

Design
------
A report is verified once, on arrival. Someone who can write the ledger file
later could still edit a figure, a run or a block row. :func:`audit_reports`
re-checks every report marked verified against the device's enrolled key and
its own signed payload; the signed payload is authoritative, so any row that
differs from it was edited at rest. It is a pure function of what the ledger
holds (:meth:`keystay.server.ledger.ledger.ServerLedger.audit` passes it in).
"""

from __future__ import annotations

from collections.abc import Iterable

from keystay.server.ledger.records import AuditFinding, BlockEpsilon, Device, StoredReport
from keystay.server.ledger.verify import ReportVerificationError, verified_report


def audit_reports(
    devices: Iterable[Device],
    reports: Iterable[StoredReport],
    block_epsilons: Iterable[BlockEpsilon],
) -> list[AuditFinding]:
    """Every stored report marked verified that no longer verifies, or whose rows differ.

    Returns
    -------
    list of AuditFinding
        Empty when the ledger is intact.
    """

    keys = {d.device_id: d.signing_public_key_pem for d in devices}
    stored: dict[int, list[BlockEpsilon]] = {}
    for row in block_epsilons:
        stored.setdefault(row.report_id, []).append(row)
    out: list[AuditFinding] = []
    verified_ids = set()
    for report in reports:
        if not report.verified:
            continue
        verified_ids.add(report.id)
        pem = keys.get(report.device_id)
        if pem is None:
            out.append(AuditFinding(report.id, report.device_id,
                                    "marked verified but its device is no longer enrolled"))
            continue
        try:
            fields = verified_report(report.payload_json.encode("utf-8"), report.signature, pem)
        except (ReportVerificationError, ValueError) as error:
            out.append(AuditFinding(
                report.id, report.device_id,
                f"marked verified on receipt but no longer verifies ({error}); the stored "
                "payload, signature or enrolled key was altered at rest",
            ))
            continue
        if fields.get("run_id") != report.run_id or fields.get(
            "server_round"
        ) != report.server_round:
            out.append(AuditFinding(
                report.id, report.device_id,
                "stored run/round differ from the signed payload; the reports table was "
                "edited at rest",
            ))
        signed = sorted(
            (b["block"], float(b["epsilon"]), float(b["budget"]), bool(b["retired"]))
            for b in fields.get("blocks", [])
        )
        kept = sorted(
            (b.block, b.epsilon, b.budget, b.retired) for b in stored.get(report.id, [])
        )
        if signed != kept:
            out.append(AuditFinding(
                report.id, report.device_id,
                "block_epsilons rows differ from the signed payload; the table was edited "
                "at rest (the signed payload is authoritative)",
            ))
    for report_id, rows in stored.items():
        if report_id not in verified_ids:
            out.append(AuditFinding(
                report_id, rows[0].device_id,
                "block_epsilons rows belong to no verified report; the table was edited "
                "at rest",
            ))
    return out
