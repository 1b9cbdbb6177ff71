"""A hostile local client against a real daemon's two sockets.

The threat: code the server ships (the Flower ClientApp) runs as the
SuperNode's user, which can reach ``federation.sock``. It must not be able to
export the employee's data, delete days, resume a paused recorder, or poll
status; and nobody but the employee's uid may use ``control.sock``, even if a
mistaken ``chmod`` lets them reach it.

One real ``keystay device run`` (simulated employee) serves the whole module.
Hostile calls are raw gRPC calls by method path (the hostile client is not
our client): every Control method, under the ``Control``, ``Federation`` and
old ``Device`` service names, with requests that would do harm if served.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path

import grpc
import hpack
import pytest

from keystay.server.deploy.superlink import executable, flower_env
from keystay.v1 import device_pb2
from tests.e2e.running_daemon import simulated_daemon

pytestmark = pytest.mark.e2e

YESTERDAY = (date.today() - timedelta(days=1)).isoformat()
NOBODY = 65534

#: Every Control method with a request that would hurt the employee if served.
HARMFUL: dict[str, bytes] = {
    "Status": device_pb2.StatusRequest().SerializeToString(),
    "Pause": device_pb2.PauseRequest(seconds=0).SerializeToString(),
    "Resume": device_pb2.ResumeRequest().SerializeToString(),
    "Show": device_pb2.ShowRequest().SerializeToString(),
    "Forget": device_pb2.ForgetRequest(all=True).SerializeToString(),
    "Export": device_pb2.ExportRequest(day=YESTERDAY).SerializeToString(),
    "Policy": device_pb2.PolicyRequest().SerializeToString(),
    "Evaluate": device_pb2.EvaluateRequest().SerializeToString(),
}


def test_harmful_list_covers_the_whole_control_service() -> None:
    methods = device_pb2.DESCRIPTOR.services_by_name["Control"].methods_by_name
    assert set(HARMFUL) == set(methods)
    # Train (record-level rounds) and SecAggStage (employee-day rounds) only.
    federation = device_pb2.DESCRIPTOR.services_by_name["Federation"].methods_by_name
    assert set(federation) == {"Train", "SecAggStage"}


def keystay(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([executable("keystay"), *args], capture_output=True, text=True,
                          env=flower_env(), check=True, timeout=120)


def raw_call(sock: Path, path: str, body: bytes, timeout: float = 10.0) -> grpc.StatusCode:
    """Call ``path`` with raw bytes, as a hostile client would; the status it ended with."""
    with grpc.insecure_channel(f"unix://{sock}") as channel:
        call = channel.unary_unary(path)  # no (de)serializers: bytes in, bytes out
        try:
            call(body, timeout=timeout)
        except grpc.RpcError as error:
            return error.code()
    return grpc.StatusCode.OK


@pytest.fixture(scope="module")
def daemon() -> Iterator[Path]:
    # A short folder of our own under /tmp (not pytest's 0700 tree), so a test
    # can open the path to another uid and leave only the peer-uid check.
    root = Path(tempfile.mkdtemp(prefix="keystay-adv-"))
    data = root / "device"
    try:
        with simulated_daemon(data, root / "daemon.log", seed=11):
            yield data
    finally:
        shutil.rmtree(root, ignore_errors=True)


def snapshot(data: Path) -> dict[str, object]:
    """What a hostile call could change: past days, their events, the key, pause state."""
    status = json.loads(keystay("device", "status", "--data", str(data), "--json").stdout)
    past = {b["block"]: int(b.get("events", 0)) for b in status["blocks"]
            if b["block"] != date.today().isoformat()}
    return {"past": past, "recording": status["recording"],
            "paused_until": status.get("pausedUntil", ""),
            "key": (data / "store.key").read_bytes()}


def test_federation_socket_refuses_every_control_call(daemon: Path) -> None:
    before = snapshot(daemon)
    assert YESTERDAY in before["past"] and before["recording"] is True  # type: ignore[operator]
    for method, body in HARMFUL.items():
        for service in ("Control", "Federation", "Device"):
            code = raw_call(daemon / "federation.sock", f"/keystay.v1.{service}/{method}", body)
            assert code == grpc.StatusCode.UNIMPLEMENTED, (service, method, code)
    assert snapshot(daemon) == before


def test_federation_socket_cannot_resume_a_paused_recorder(daemon: Path) -> None:
    keystay("device", "pause", "--data", str(daemon))
    try:
        paused = snapshot(daemon)
        assert paused["recording"] is False
        body = HARMFUL["Resume"]
        for service in ("Control", "Federation", "Device"):
            code = raw_call(daemon / "federation.sock", f"/keystay.v1.{service}/Resume", body)
            assert code == grpc.StatusCode.UNIMPLEMENTED
        assert snapshot(daemon)["recording"] is False
    finally:
        keystay("device", "resume", "--data", str(daemon))


# -- a hostile process as another uid -----------------------------------------
#
# The child is forked and drops to nobody with os.setgid/os.setuid; it cannot
# exec this interpreter (it lives under /root), and gRPC must not be used
# across fork, so it speaks just enough HTTP/2 by hand: preface, SETTINGS, one
# request, then reads until the server closes. A served connection always
# gets the server's SETTINGS frame first, so zero bytes means cut off unread.

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") \
        + payload


def raw_h2_call(sock: Path, path: str, body: bytes) -> dict[str, object]:
    """One gRPC call by hand; what came back (bytes, grpc-status) or why it failed."""
    headers = hpack.Encoder().encode([
        (":method", "POST"), (":scheme", "http"), (":path", path),
        (":authority", "localhost"), ("content-type", "application/grpc"), ("te", "trailers"),
    ])
    message = b"\x00" + len(body).to_bytes(4, "big") + body
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(10)
    try:
        conn.connect(str(sock))
    except OSError as error:
        return {"connect": type(error).__name__, "received": 0}
    received = b""
    status = None
    decoder = hpack.Decoder()
    try:
        conn.sendall(_PREFACE + _frame(4, 0, 0, b"") + _frame(1, 0x4, 1, headers)
                     + _frame(0, 0x1, 1, message))
        buffer = b""
        while status is None:
            chunk = conn.recv(65536)
            if not chunk:
                break
            received += chunk
            buffer += chunk
            while len(buffer) >= 9 and len(buffer) >= 9 + int.from_bytes(buffer[:3], "big"):
                size = int.from_bytes(buffer[:3], "big")
                kind, flags, payload = buffer[3], buffer[4], buffer[9:9 + size]
                buffer = buffer[9 + size:]
                if kind == 4 and not flags & 0x1:  # the server's SETTINGS: acknowledge
                    conn.sendall(_frame(4, 0x1, 0, b""))
                elif kind == 1:
                    for name, value in decoder.decode(payload):
                        if name == "grpc-status":
                            status = int(value)
    except OSError as error:
        return {"error": type(error).__name__, "received": len(received), "status": status}
    finally:
        conn.close()
    return {"received": len(received), "status": status}


def as_uid(uid: int, sock: Path, method: str) -> dict[str, object]:
    """Fork, drop to ``uid`` (and its gid), make the raw call, report back through a pipe."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            os.close(read_end)
            if uid != os.geteuid():
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            result = raw_h2_call(sock, f"/keystay.v1.Control/{method}", HARMFUL[method])
            os.write(write_end, json.dumps(result).encode())
        except BaseException as error:  # reported to the parent
            os.write(write_end, json.dumps({"child_error": repr(error)}).encode())
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        report = json.loads(pipe.read() or b"{}")
    os.waitpid(pid, 0)
    assert "child_error" not in report, report
    return report


def as_nobody(sock: Path, method: str) -> dict[str, object]:
    return as_uid(NOBODY, sock, method)


def refused(report: dict[str, object]) -> bool:
    """Could not connect, or was disconnected without a byte of HTTP/2 from the daemon."""
    return "connect" in report or report["received"] == 0


needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="switching to another uid (nobody) needs root"
)


@needs_root
def test_other_uid_is_refused_on_control_socket(daemon: Path) -> None:
    before = snapshot(daemon)
    for method in ("Pause", "Export", "Forget", "Status"):
        report = as_nobody(daemon / "control.sock", method)
        assert refused(report), (method, report)
    assert snapshot(daemon) == before


@needs_root
def test_peer_uid_check_holds_when_file_modes_do_not(daemon: Path) -> None:
    """Open the folders and the socket to everyone: SO_PEERCRED still refuses."""
    log = daemon / "logs" / "daemon.log"
    refusals = log.read_text().count(f"refused a connection from uid {NOBODY}")
    opened = [(daemon.parent, 0o711), (daemon, 0o711), (daemon / "control.sock", 0o666)]
    saved = [(path, path.stat().st_mode & 0o777) for path, _ in opened]
    before = snapshot(daemon)
    try:
        for path, mode in opened:
            os.chmod(path, mode)
        for method in ("Pause", "Forget", "Export"):
            report = as_nobody(daemon / "control.sock", method)
            # It got through the file modes (connected) and was cut off unread.
            assert "connect" not in report and report["received"] == 0, (method, report)
    finally:
        for path, mode in saved:
            os.chmod(path, mode)
    assert snapshot(daemon) == before
    # The daemon saw each attempt, and cut it off itself (not the file mode).
    deadline = time.monotonic() + 5
    while log.read_text().count(f"refused a connection from uid {NOBODY}") < refusals + 3:
        assert time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.1)


def test_employee_uid_is_served_on_control_socket(daemon: Path, tmp_path: Path) -> None:
    sock = daemon / "control.sock"
    # The same hand-made client, forked but keeping the daemon's uid, is served:
    # so a refusal above is the daemon's doing, not a broken client.
    served = as_uid(os.geteuid(), sock, "Status")
    assert served["status"] == 0 and served["received"] > 0, served
    assert raw_call(sock, "/keystay.v1.Control/Status", HARMFUL["Status"]) == grpc.StatusCode.OK
    # The old single service name is gone from the control socket too.
    assert raw_call(sock, "/keystay.v1.Device/Status", HARMFUL["Status"]) == \
        grpc.StatusCode.UNIMPLEMENTED
    out = tmp_path / "mine.json"
    keystay("device", "export", "--data", str(daemon), "--day", YESTERDAY, "--out", str(out))
    assert len(json.loads(out.read_text())["events"]) == 1500
    policy = keystay("device", "policy", "--data", str(daemon)).stdout
    assert "running daemon" in policy


def test_employee_can_evaluate_a_model_locally(daemon: Path, tmp_path: Path) -> None:
    from keystay.common.model import ModelConfig, initial_weights, save_checkpoint

    model = save_checkpoint(tmp_path / "model.pt", initial_weights(), ModelConfig())
    out = keystay("device", "evaluate", "--data", str(daemon), "--model", str(model)).stdout
    assert "next-event accuracy" in out and "held-out windows" in out
    # ... while the federation socket has no Evaluate at all.
    body = device_pb2.EvaluateRequest().SerializeToString()
    assert raw_call(daemon / "federation.sock", "/keystay.v1.Federation/Evaluate", body) == \
        grpc.StatusCode.UNIMPLEMENTED


def test_second_daemon_is_refused_and_leaves_the_first_serving(daemon: Path) -> None:
    second = subprocess.run(
        [executable("keystay"), "device", "run", "--data", str(daemon), "--source", "none"],
        capture_output=True, text=True, env=flower_env(), timeout=180, check=False,
    )
    assert second.returncode == 14, second.stderr[-2000:]
    assert "already serving" in second.stderr and "Traceback" not in second.stderr
    # Its clean-up removed nothing of the first daemon's.
    for name in ("control.sock", "federation.sock", "control.d"):
        assert (daemon / name).exists(), name
    assert snapshot(daemon)["recording"] is True
