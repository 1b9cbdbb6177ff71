"""A real ``keystay device run`` with a simulated employee, for end-to-end tests.

The tests that drive the employee's controls, the page and the hostile socket
clients all need the same thing: a daemon recording a simulated employee, up
(its federation socket, bound last, exists), and stopped by its PID when the
test is done (SIGTERM, then SIGKILL of its group if it hangs).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from keystay.server.deploy.superlink import executable, flower_env


@contextlib.contextmanager
def simulated_daemon(data: Path, log_path: Path, seed: int) -> Iterator[subprocess.Popen[bytes]]:
    """Run a daemon on ``data`` (2 simulated days of 1,500 events); yields its process."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [executable("keystay"), "device", "run", "--data", str(data), "--source",
             "simulated", "--simulate-days", "2", "--events-per-day", "1500",
             "--employee-seed", str(seed)],
            stdout=log, stderr=subprocess.STDOUT, env=flower_env(), start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 120
            while not (data / "federation.sock").exists():
                assert process.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, "daemon did not come up"
                time.sleep(0.2)
            yield process
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(5)
