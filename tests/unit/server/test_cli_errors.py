"""Server commands end a bad ledger with their exit code and a sentence, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from keystay.common.exitcodes import ExitCode
from keystay.server.deploy.enrollment import Enrollment, Registry
from keystay.server.ledger.ledger import LEDGER_FILE


def _keystay(*args: str) -> subprocess.CompletedProcess[str]:
    # The console script's own entry point, as a user runs it.
    return subprocess.run(
        [sys.executable, "-c", "from keystay.cli.main import run; run()", *args],
        capture_output=True, text=True, timeout=120,
    )


def test_revoke_on_an_unreadable_ledger_exits_24_without_a_traceback(tmp_path: Path) -> None:
    server_dir = tmp_path / "srv"
    init = _keystay("server", "init", "--dir", str(server_dir))
    assert init.returncode == 0, init.stderr
    registry = Registry.open(server_dir)
    registry.put(Enrollment(
        device_id="dev-1", name="laptop", node_id=None, supernode_public_key=None,
        signing_public_key_pem="-", fingerprint="-", enrolled_at="2026-12-01T00:00:00Z",
        revoked_at=None,
    ))
    ledger = server_dir / LEDGER_FILE
    ledger.write_bytes(b"this is not an SQLite database" * 100)

    done = _keystay("server", "revoke", "--dir", str(server_dir), "dev-1")

    assert done.returncode == ExitCode.SERVER_LEDGER, done.stderr
    assert "Traceback" not in done.stderr
    assert "nothing revoked" in done.stderr
    assert ledger.read_bytes() == b"this is not an SQLite database" * 100
    entry = registry.get("dev-1")
    assert entry is not None and not entry.revoked, "a failed revoke changed the registry"
