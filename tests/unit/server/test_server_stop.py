"""``keystay server start`` leaves no process of its SuperLink's tree behind, in any session.

A real ``keystay server start`` process runs over a fake SuperLink of
Flower's shape (the only thing replaced is the command it starts): the fake
opens the Fleet and Control ports, starts a ``flower-superexec`` stand-in
with ``start_new_session=True`` as Flower does, and that one starts a
``flwr-serverapp`` stand-in in its session. A signal to the SuperLink's
process group reaches neither, which is how a run's ServerApp outlived a
stopped server during a 20-device benchmark.

Each stop path is a test: SIGTERM (systemd's stop), the SuperLink dying on its
own, and the SuperExec dying under a live SuperLink. In each, every stand-in
must be gone once ``keystay server start`` has exited, though the ServerApp
has lost its parent by then. (SIGKILL after the grace, and a reused pid left
alone: tests/unit/common/test_processes.py.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from keystay.common.exitcodes import ExitCode
from keystay.server.deploy.superlink import executable, flower_env, free_port

# The SuperLink stand-in: listens on both ports, starts the SuperExec in a
# new session (as Flower's SuperLink does), writes every pid, then waits.
SUPERLINK = textwrap.dedent("""
    import socket, subprocess, sys, time
    pids, superexec_code, serverapp_code = sys.argv[1:4]
    listeners = []
    for port in sys.argv[4:6]:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", int(port)))
        sock.listen()
        listeners.append(sock)
    superexec = subprocess.Popen(
        [sys.executable, "-c", superexec_code, pids, serverapp_code, "flower-superexec"],
        start_new_session=True)
    while True:
        time.sleep(1)
""")

# The SuperExec stand-in: starts the run's ServerApp in its own session, as
# Flower's SuperExec does, and lives until signalled.
SUPEREXEC = textwrap.dedent("""
    import subprocess, sys, time
    pids, serverapp_code = sys.argv[1:3]
    subprocess.Popen([sys.executable, "-c", serverapp_code, pids, "flwr-serverapp"])
    while True:
        time.sleep(1)
""")

# The ServerApp stand-in: writes its parent's pid and its own, and waits for
# a run that never ends.
SERVERAPP = textwrap.dedent("""
    import os, sys, time
    pids = sys.argv[1]
    with open(pids + ".tmp", "w") as out:
        out.write(f"{os.getppid()} {os.getpid()}")
    os.replace(pids + ".tmp", pids)
    while True:
        time.sleep(1)
""")

# `keystay server start` itself, with the SuperLink's command replaced.
START = textwrap.dedent("""
    import sys
    from keystay.server.deploy.superlink import ServerConfig
    from keystay.server.cli import server
    fake, pids, superexec, serverapp, server_dir = sys.argv[1:6]

    def superlink_command(self, server_dir):
        return [sys.executable, "-c", fake, pids, superexec, serverapp,
                self.fleet_address.rpartition(":")[2], str(self.control_port)]

    ServerConfig.superlink_command = superlink_command
    server(["start", "--dir", server_dir], prog_name="keystay server")
""")


@dataclass
class Server:
    start: subprocess.Popen[str]
    superexec: int
    serverapp: int


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie has exited: it only waits for its parent)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture(scope="module")
def server_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    server = tmp_path_factory.mktemp("stop") / "server"
    init = subprocess.run(
        [executable("keystay"), "server", "init", "--dir", str(server), "--fleet-address",
         f"127.0.0.1:{free_port()}", "--control-port", str(free_port()), "--insecure"],
        capture_output=True, text=True, env=flower_env(), timeout=120, check=False)
    assert init.returncode == 0, init.stderr
    return server


@pytest.fixture
def running(server_dir: Path, tmp_path: Path) -> Iterator[Server]:
    pids = tmp_path / "serverapp.pids"
    start = subprocess.Popen(
        [sys.executable, "-c", START, SUPERLINK, str(pids), SUPEREXEC, SERVERAPP,
         str(server_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=flower_env(),
        start_new_session=True)
    deadline = time.monotonic() + 60
    while not pids.exists():
        assert start.poll() is None, start.communicate()
        assert time.monotonic() < deadline, "the fake ServerApp never started"
        time.sleep(0.05)
    superexec, serverapp = map(int, pids.read_text().split())
    # The `ready` line: the command is in its watch loop.
    assert start.stdout is not None
    assert start.stdout.readline().startswith("ready:")
    server = Server(start, superexec, serverapp)
    yield server
    for pid in (server.superexec, server.serverapp, start.pid):
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    start.wait(10)


def _superlink(server: Server) -> int:
    """The SuperLink stand-in: the parent of the SuperExec stand-in."""
    return int(Path(f"/proc/{server.superexec}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_the_serverapp_is_in_another_session_than_the_superlink(running: Server) -> None:
    """The premise: the SuperLink's process group does not hold the SuperExec or ServerApp."""
    superlink = _superlink(running)
    assert os.getpgid(running.superexec) != os.getpgid(superlink)
    assert os.getsid(running.serverapp) != os.getsid(superlink)


def test_sigterm_stops_the_serverapp_of_another_session(running: Server) -> None:
    """systemd's stop: the command exits 0 and takes the SuperExec and ServerApp with it."""
    superlink = _superlink(running)
    running.start.send_signal(signal.SIGTERM)
    _, err = running.start.communicate(timeout=60)
    assert running.start.returncode == 0, err
    assert _gone(superlink, 1.0)
    assert _gone(running.superexec, 1.0), "the SuperExec outlived keystay server start"
    assert _gone(running.serverapp, 1.0), "the ServerApp outlived keystay server start"
    assert "Traceback" not in err


def test_a_dead_superlinks_serverapp_is_stopped_too(running: Server) -> None:
    """The SuperLink killed (the OOM killer): exit 21, and its orphaned tree goes with it."""
    os.kill(_superlink(running), signal.SIGKILL)
    _, err = running.start.communicate(timeout=60)
    assert running.start.returncode == ExitCode.SERVER_SUPERLINK_DOWN, err
    assert "the SuperLink exited" in err
    assert _gone(running.superexec, 1.0), "the SuperExec outlived keystay server start"
    assert _gone(running.serverapp, 1.0), "the ServerApp outlived keystay server start"


def test_a_serverapp_whose_superexec_died_is_stopped(running: Server) -> None:
    """The SuperExec dies under a live SuperLink: exit 21, and its orphaned ServerApp goes."""
    time.sleep(2.5)  # the command looks once a second; it misses only a SuperExec it saw
    os.kill(running.superexec, signal.SIGKILL)
    _, err = running.start.communicate(timeout=60)
    assert running.start.returncode == ExitCode.SERVER_SUPERLINK_DOWN, err
    assert "SuperExec exited" in err
    assert _gone(running.serverapp, 1.0), "the ServerApp outlived keystay server start"
