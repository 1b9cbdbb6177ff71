"""The canary: a secret typed on an employee's machine must never reach the server side.

One device records real X11 input (``keystay device run --source pynput``
against a private Xvfb); xdotool types a unique random canary string into an
X client between filler typing and mouse moves. The device's own export proves
the canary is really on the device (its tokens, and with ``raw_text = true``
its characters), so its absence on the server side means something. A second,
simulated device makes the rounds federated (two devices per round). Then two
real DP-SGD rounds run over a real SuperLink, with the pynput device training
on today's block (``min_block_age_days = 0``), the one holding the canary.

Every byte that reached the server side is then searched for the canary, as
text (UTF-8, UTF-16, case variants, base64, hex) and as its token encoding
(the exact token ids the device recorded for it, whole and in tiles, as
uint8/varint/uint16/int32/int64/float and as text lists; see leakcheck.py):

- the bytes on the wire: the Fleet API traffic of both SuperNodes goes through
  a recording TCP proxy written here. The federation is INSECURE (plain-text
  gRPC, no node authentication) for this test only, so that the payloads are
  readable; TLS would only hide them further. The capture is searched raw and
  after undoing HTTP/2 and gRPC framing;
- the server folder (server.toml, superlink.db + -wal/-shm, the server ledger,
  enrollments, runs/ with checkpoints, rounds.jsonl and the flwr run log,
  logs/ with the SuperLink's and SuperExec's output, the flwr CLI home);
- the FLWR_HOME and TMPDIR the SuperLink, SuperExec and ServerApp ran with
  (pointed into this test's folder, so nothing of theirs lands elsewhere).

Searched twice: while the processes run (WAL files present) and after they
stopped. Positive controls: the search finds every pattern in a file written
with them; the run's name is found in the captured server-to-device gRPC
messages and the device's id in the device-to-server ones (the capture really
holds readable payloads); and the device's own data folder holds no plaintext
canary either (the store is encrypted at rest). The coverage (places, files,
bytes) is printed and written to ``canary-coverage.json`` in the test folder.

How the device side is started: ``LocalFederation`` starts only the
SuperLink here. It has no hook for per-device options (``--source pynput``, a
DISPLAY, a Fleet address other than the SuperLink's), so the two daemons are
started by this module as ``local.py`` starts them, with ``--superlink``
pointing at the proxy, and enrolled with ``keystay server enroll`` as
``local.py`` does for insecure federations.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import string
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import leakcheck
import xserver
from leakcheck import Hit, Pattern, PlaceCoverage

from keystay.common.tokens import token_id
from keystay.common.windows import WINDOW, make_windows
from keystay.server.deploy.local import LEGACY_REQUEST_FILE, LocalFederation
from keystay.server.deploy.superlink import executable, flower_env, free_port
from keystay.server.rounds import start_run
from keystay.server.settings import RECORD_NOISE_MULTIPLIER, RunSettings

pytestmark = pytest.mark.e2e

MISSING = xserver.missing_tools()
needs_x = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")

STARTUP_S = 120.0
TOKENS_S = 30.0
MODIFIERS = ("shift", "ctrl", "alt", "super", "altgr")
PRE_TEXT = "the quick brown fox jumps over the lazy dog "
POST_TEXT = " pack my box with five dozen liquor jugs now"
MIN_PROXY_BYTES = 10_000


def make_canary() -> str:
    alphabet = string.ascii_letters + string.digits
    return "KSCANARY" + "".join(secrets.choice(alphabet) for _ in range(16))


def key_class(char: str) -> str:
    """The token class xdotool's typing of ``char`` records (tokens.KEY_CLASSES)."""
    if char.isdigit():
        return "key:digit"
    return "key:upper" if char.isupper() else "key:letter"


# --------------------------------------------------------------------------- devices


@dataclass
class Device:
    name: str
    data_dir: Path
    process: subprocess.Popen[bytes]
    env: dict[str, str]

    @property
    def log(self) -> Path:
        return self.data_dir / "logs" / "daemon.out"


def device_env(tmp: Path, display_env: dict[str, str] | None = None) -> dict[str, str]:
    """A device's environment: its own TMPDIR, and none of the server's FLWR_HOME."""
    env = flower_env()
    env.pop("FLWR_HOME", None)  # the daemon gives its SuperNode DATA/flwr itself
    tmp.mkdir(parents=True, exist_ok=True)
    env["TMPDIR"] = str(tmp)
    if display_env is not None:
        for key in ("DISPLAY", "WAYLAND_DISPLAY", "XAUTHORITY"):
            env.pop(key, None)
        env["DISPLAY"] = display_env["DISPLAY"]
    return env


def start_device(name: str, data_dir: Path, env: dict[str, str], superlink: str,
                 *args: str) -> Device:
    """``keystay device run`` as local.py starts it, its own session, output to a log."""
    (data_dir / "logs").mkdir(parents=True, exist_ok=True)
    log = data_dir / "logs" / "daemon.out"
    with log.open("ab") as out:
        process = subprocess.Popen(
            [executable("keystay"), "device", "run", "--data", str(data_dir),
             "--superlink", superlink, "--accept-server-code-access", "--insecure",
             "--supernode-port", str(free_port()),
             *args],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True,
        )
    return Device(name, data_dir, process, env)


def stop_process(process: subprocess.Popen[Any], timeout: float = 20.0) -> None:
    """SIGTERM to the PID (daemons stop their own children), then SIGKILL its group."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    if process.poll() is None:
        process.wait(5)


def wait_ready(device: Device) -> None:
    """The daemon serves its socket and wrote its enrollment file (insecure mode)."""
    deadline = time.monotonic() + STARTUP_S
    ready = [device.data_dir / "federation.sock", device.data_dir / LEGACY_REQUEST_FILE]
    while not all(p.exists() for p in ready):
        if device.process.poll() is not None:
            pytest.fail(f"device {device.name} exited with {device.process.returncode}: "
                        f"{device.log.read_text(errors='replace')[-2000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"device {device.name} not ready after {STARTUP_S:.0f} s: "
                        f"{device.log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.2)


def keystay(*args: str, env: dict[str, str]) -> str:
    done = subprocess.run([executable("keystay"), *args], capture_output=True, text=True,
                          env=env, timeout=120, check=False)
    assert done.returncode == 0, f"keystay {' '.join(args)}: {done.stdout}{done.stderr}"
    return done.stdout


def export_today(device: Device, out: Path) -> list[dict[str, Any]]:
    """``keystay device export --day TODAY``; no events while today has no block yet."""
    done = subprocess.run(
        [executable("keystay"), "device", "export", "--data", str(device.data_dir), "--day",
         date.today().isoformat(), "--out", str(out)],
        capture_output=True, text=True, env=device.env, timeout=120, check=False,
    )
    if done.returncode != 0 and "no block" in done.stderr + done.stdout:
        return []
    assert done.returncode == 0, f"keystay device export: {done.stdout}{done.stderr}"
    events: list[dict[str, Any]] = json.loads(out.read_text())["events"]
    return events


def is_key(event: dict[str, Any]) -> bool:
    """A non-modifier key press (each one is followed by a dwell token on release)."""
    name = event["token"]
    return name.startswith("key:") and name[4:].split("_")[0] not in MODIFIERS


def wait_for_keys(device: Device, out: Path, keys: int, what: str) -> list[dict[str, Any]]:
    """Export until exactly ``keys`` key presses, each released, are in today's block."""
    deadline = time.monotonic() + TOKENS_S
    while True:
        events = export_today(device, out)
        pressed = sum(map(is_key, events))
        released = sum(e["token"].startswith("timing:dwell:") for e in events)
        if pressed == released == keys:
            return events
        if pressed > keys or time.monotonic() > deadline:
            pytest.fail(f"{what}: expected {keys} key presses in the device's export, "
                        f"found {pressed} pressed / {released} released; last tokens: "
                        f"{[e['token'] for e in events[-12:]]}")
        time.sleep(0.3)


# --------------------------------------------------------------------------- the search


@dataclass
class Search:
    """Everything searched, pass by pass: hits and coverage per place."""

    patterns: list[Pattern]
    hits: list[Hit]
    coverage: dict[str, dict[str, object]]

    def tree(self, key: str, root: Path, place: str, exclude: tuple[Path, ...] = ()) -> \
            PlaceCoverage:
        hits, cov = leakcheck.search_tree(root, self.patterns, place=place, exclude=exclude)
        self.hits += hits
        self.coverage[key] = {"path": str(root), **cov.as_dict()}
        return cov

    def capture(self, key: str, proxy: leakcheck.RecordingProxy) -> dict[str, Any]:
        """The proxy's bytes: raw per direction, then unframed (HTTP/2 DATA, gRPC)."""
        figures: dict[str, Any] = {"connections": 0, "headers_decoded": True}
        for direction in ("up", "down"):
            figures[direction] = {"raw_bytes": 0, "h2_frames": 0, "h2_parsed_bytes": 0,
                                  "data_bytes": 0, "header_block_bytes": 0,
                                  "grpc_messages": 0, "grpc_bytes": 0, "grpc_compressed": 0,
                                  "grpc_undecodable": 0}
        for number, up, down in proxy.snapshot():
            figures["connections"] += 1
            for direction, stream in (("up", up), ("down", down)):
                name = f"connection {number} {direction}"
                place = f"{key} ({'device->server' if direction == 'up' else 'server->device'})"
                self.hits += leakcheck.search_bytes(stream, self.patterns, place=place,
                                                    where=f"{name} raw")
                decoded = leakcheck.decode_h2(stream)
                f = figures[direction]
                f["raw_bytes"] += len(stream)
                f["h2_frames"] += decoded.frames
                f["h2_parsed_bytes"] += decoded.consumed
                f["header_block_bytes"] += sum(map(len, decoded.header_blocks))
                f["grpc_compressed"] += decoded.grpc_compressed
                f["grpc_undecodable"] += decoded.grpc_undecodable
                headers = leakcheck.decode_headers(decoded.header_blocks)
                if headers is None:
                    figures["headers_decoded"] = False  # hpack missing: searched as sent only
                else:
                    f["decoded_header_bytes"] = f.get("decoded_header_bytes", 0) + len(headers)
                    self.hits += leakcheck.search_bytes(headers, self.patterns, place=place,
                                                        where=f"{name} decoded headers")
                for sid, body in decoded.data.items():
                    f["data_bytes"] += len(body)
                    self.hits += leakcheck.search_bytes(body, self.patterns, place=place,
                                                        where=f"{name} stream {sid} DATA")
                for i, message in enumerate(decoded.grpc_messages):
                    f["grpc_messages"] += 1
                    f["grpc_bytes"] += len(message)
                    self.hits += leakcheck.search_bytes(message, self.patterns, place=place,
                                                        where=f"{name} gRPC message {i}")
        self.coverage[key] = figures
        return figures


def capture_contains(proxy: leakcheck.RecordingProxy, needle: bytes, direction: str) -> bool:
    """Whether ``needle`` is in a gRPC message of the given direction (a positive control)."""
    for _, up, down in proxy.snapshot():
        decoded = leakcheck.decode_h2(up if direction == "up" else down)
        if any(needle in m for m in decoded.grpc_messages):
            return True
    return False


def self_check(folder: Path, patterns: list[Pattern]) -> None:
    """The search finds every pattern, embedded in noise, in a file written here."""
    folder.mkdir(parents=True, exist_ok=True)
    planted = folder / "planted.bin"
    with planted.open("wb") as out:
        for pattern in patterns:
            out.write(os.urandom(37) + pattern.data + os.urandom(11))
    hits, coverage = leakcheck.search_tree(folder, patterns, place="self-check")
    found = {h.pattern for h in hits}
    missing = [p.label for p in patterns if p.label not in found]
    assert not missing, f"the search missed planted patterns: {missing}"
    assert coverage.files == 1 and coverage.bytes == planted.stat().st_size
    planted.unlink()


def windows_self_check(ids: list[int], patterns: list[Pattern]) -> None:
    """A leaked training window (33 tokens, int64, any position) would be found.

    The span is cut into windows exactly as the device cuts its blocks, with
    filler tokens around it; every window lying inside the span must hit.
    """
    filler = [token_id("timing:flight:2000ms+"), token_id("key:space")] * 40
    tokens = np.array(filler + ids + filler, dtype=np.int64)
    windows = make_windows(tokens, WINDOW)
    inside = windows[len(filler) : len(filler) + len(ids) - WINDOW]
    assert len(inside) > 0, f"the canary span ({len(ids)} tokens) is shorter than a window"
    for i, window in enumerate(inside):
        for packed in (window.tobytes(), window.astype(np.uint16).tobytes()):
            hits = leakcheck.search_bytes(packed, patterns, place="self-check", where="window")
            assert hits, f"window {i} inside the canary span would not be found"


def h2_self_check(canary: str) -> None:
    """A canary cut by an HTTP/2 frame boundary is found after unframing, not before."""
    message = b"\x0a\x20" + canary.encode() + b"\x12\x00"
    grpc_body = b"\x00" + len(message).to_bytes(4, "big") + message
    cut = 12
    frames = b""
    for flags, part in ((0, grpc_body[:cut]), (1, grpc_body[cut:])):
        frames += len(part).to_bytes(3, "big") + bytes([0, flags]) + (5).to_bytes(4, "big") + part
    stream = leakcheck.H2_PREFACE + frames
    assert canary.encode() not in stream
    decoded = leakcheck.decode_h2(stream)
    assert decoded.consumed == len(stream) and decoded.frames == 2
    assert decoded.grpc_messages == [message]


# --------------------------------------------------------------------------- the test


@needs_x
@pytest.mark.parametrize("raw_text", [False, True], ids=["raw_text=false", "raw_text=true"])
def test_canary_never_leaves_the_device(raw_text: bool, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    canary = make_canary()
    text = leakcheck.text_patterns(canary)
    self_check(tmp_path / "self-check", text)
    h2_self_check(canary)

    server_home = tmp_path / "server-flwr-home"
    server_tmp = tmp_path / "server-tmp"
    server_home.mkdir()
    server_tmp.mkdir()
    exports = tmp_path / "exports"  # the employee's own copies: device side, not searched
    exports.mkdir()
    run_name = "canary-" + secrets.token_hex(6)
    federation = LocalFederation(tmp_path / "fed", devices=0, insecure=True,
                                 startup_timeout=STARTUP_S)
    devices: list[Device] = []
    proxy: leakcheck.RecordingProxy | None = None
    started: list[subprocess.Popen[Any]] = []
    coverage: dict[str, Any] = {"canary": canary, "raw_text": raw_text, "run": run_name}
    live: Search | None = None
    with contextlib.ExitStack() as stack:
        # Callbacks run newest first: devices, proxy, SuperLink, X client, Xvfb.
        xvfb = xserver.start_xvfb()
        stack.callback(xvfb.stop)
        window = xserver.start_window(xvfb, "Canarypad", "canary pad")
        stack.callback(window.stop)
        # Everything the SuperLink, SuperExec and ServerApp write outside the server
        # folder lands in these: they inherit `keystay server start`'s environment.
        # (Set after the X server started, so its files stay out of them.)
        monkeypatch.setenv("FLWR_HOME", str(server_home))
        monkeypatch.setenv("TMPDIR", str(server_tmp))
        stack.callback(federation.stop)
        federation.start_server()
        started += [p.process for p in federation.parts]
        proxy = leakcheck.RecordingProxy(federation.fleet)
        proxy.start()
        stack.callback(proxy.stop)

        x11_dir = tmp_path / "devices" / "employee-x11"
        x11_dir.mkdir(parents=True)
        (x11_dir / "policy.toml").write_text(
            "[policy]\n"
            # What the wire carries in clear is the question here: the record
            # unit's plain Train reply (the employee-day default answers only
            # with masked vectors, through SecAgg; tests/e2e/test_secagg.py).
            'privacy_unit = "record"\n'
            f"raw_text = {'true' if raw_text else 'false'}\n"
            "min_block_age_days = 0\n"
            # Records are non-overlapping 33-event windows: the canary's few
            # hundred typed events make only a handful of them.
            "min_block_windows = 1\n"
        )
        x11 = start_device("employee-x11", x11_dir,
                           device_env(tmp_path / "device-tmp" / "x11", xvfb.env()),
                           proxy.address, "--source", "pynput")
        devices.append(x11)
        stack.callback(stop_process, x11.process)
        sim_dir = tmp_path / "devices" / "employee-sim"
        sim_dir.mkdir(parents=True)
        (sim_dir / "policy.toml").write_text('[policy]\nprivacy_unit = "record"\n')
        sim = start_device("employee-sim", sim_dir, device_env(tmp_path / "device-tmp" / "sim"),
                           proxy.address, "--source", "none", "--simulate-days", "1",
                           "--events-per-day", "3000", "--employee-seed", "2")
        devices.append(sim)
        stack.callback(stop_process, sim.process)
        started += [x11.process, sim.process]
        for device in devices:
            wait_ready(device)
            keystay("server", "enroll", "--dir", str(federation.server_dir),
                    str(device.data_dir / LEGACY_REQUEST_FILE), "--name", device.name,
                    env=flower_env())

        # -- the employee types; the canary lands between filler --------------------
        x = xvfb.xdotool
        x("windowfocus", "--sync", str(window.window))
        for px, py in ((200, 200), (600, 300), (300, 700), (900, 500)):
            x("mousemove", str(px), str(py))
            time.sleep(0.3)  # > MOVE_GAP_S: each move becomes its own token
        x("type", PRE_TEXT)
        before = wait_for_keys(x11, exports / "before.json", len(PRE_TEXT), "filler")
        x("type", canary)
        with_canary = wait_for_keys(x11, exports / "canary.json", len(PRE_TEXT) + len(canary),
                                    "the canary")
        span = with_canary[len(before):]
        x("mousemove", "100", "100")
        x("type", POST_TEXT)
        final = wait_for_keys(x11, exports / "after.json",
                              len(PRE_TEXT) + len(canary) + len(POST_TEXT), "filler after")
        assert final[len(before) : len(with_canary)] == span, "the canary's tokens changed"

        # The canary is really on the device: its key classes, in order (and its
        # characters when raw text is allowed, never otherwise).
        keys = [e for e in span if is_key(e)]
        assert [e["token"] for e in keys] == [key_class(c) for c in canary]
        if raw_text:
            assert "".join(e.get("text", "") for e in keys) == canary
        else:
            assert not any("text" in e for e in final)
        ids = [token_id(e["token"]) for e in span]
        patterns = text + leakcheck.token_patterns(ids)
        self_check(tmp_path / "self-check", patterns)
        windows_self_check(ids, patterns)
        coverage["canary_tokens"] = {"count": len(ids), "ids": ids,
                                     "tokens_today": len(final),
                                     "patterns": len(patterns)}

        # -- two federated rounds, the canary's block among the training data -------
        settings = RunSettings(
            server_dir=federation.server_dir, run_name=run_name, num_server_rounds=2,
            min_devices=2, local_steps=5, sample_rate=0.1, round_timeout=300.0,
            privacy_unit="record", noise_multiplier=RECORD_NOISE_MULTIPLIER,
        )
        outcome = start_run(federation.server_dir, settings)
        assert outcome.returncode == 0, outcome.log_file.read_text()[-3000:]
        assert [r["round"] for r in outcome.rounds] == [1, 2]
        x11_status = json.loads(keystay("device", "status", "--data", str(x11_dir), "--json",
                                        env=x11.env))
        x11_id = x11_status["deviceId"]
        for row in outcome.rounds:
            assert row["devices_reported"] == 2 and not row["refusals"], row
            assert x11_id in row["devices"], row
        today = [b for b in x11_status["blocks"] if b["block"] == date.today().isoformat()]
        assert today and today[0].get("epsilon", 0.0) > 0, (
            f"the canary's block was not trained on: {x11_status['blocks']}")

        # Positive controls on the wire: payloads are readable in both directions.
        assert capture_contains(proxy, run_name.encode(), "down"), \
            "the run name is not in any server->device gRPC message: is the capture readable?"
        assert capture_contains(proxy, x11_id.encode(), "up"), \
            "the device id is not in any device->server gRPC message: is the capture readable?"

        live = Search(patterns, [], {})
        live.tree("server folder", federation.server_dir, "server folder (live)")
        live.tree("server FLWR_HOME", server_home, "server FLWR_HOME (live)")
        live.tree("server TMPDIR", server_tmp, "server TMPDIR (live)")
        # Leaving the stack stops every process, by PID, newest first.

    assert started and all(p.poll() is not None for p in started), "a process outlived the test"
    assert proxy is not None and live is not None

    # -- after every process stopped: what stays on disk, and the whole capture ---------
    done = Search(patterns, [], {})
    server_cov = done.tree("server folder", federation.server_dir, "server folder")
    done.tree("server FLWR_HOME", server_home, "server FLWR_HOME")
    done.tree("server TMPDIR", server_tmp, "server TMPDIR")
    db = [federation.server_dir / n for n in ("superlink.db", "superlink.db-wal",
                                              "superlink.db-shm")]
    done.tree("SuperLink database", federation.server_dir / "superlink.db", "SuperLink db")
    done.tree("server logs", federation.server_dir / "logs", "server logs")
    run_dir = federation.server_dir / "runs" / run_name
    run_cov = done.tree("server run folder", run_dir, "server run folder")
    wire = done.capture("Fleet API capture", proxy)
    proxy.save(tmp_path / "capture")  # outside every searched place

    # The device side, for the positive control: the canary is there (export above)
    # but not in plaintext in its data folder.
    device_side = Search(patterns, [], {})
    device_cov = device_side.tree("device data folder", x11_dir, "device data folder")
    device_side.tree("device TMPDIR", tmp_path / "device-tmp" / "x11", "device TMPDIR")

    checkpoints = sorted(p.name for p in run_dir.rglob("*.pt"))
    coverage["live"] = live.coverage
    coverage["after_stop"] = done.coverage
    coverage["device_side"] = device_side.coverage
    coverage["server_db_bytes_live"] = {p.name: (p.stat().st_size if p.exists() else 0)
                                        for p in db}
    coverage["checkpoints"] = checkpoints
    coverage["server_hits"] = [str(h) for h in live.hits + done.hits]
    coverage["device_hits"] = [str(h) for h in device_side.hits]
    report = tmp_path / "canary-coverage.json"
    report.write_text(json.dumps(coverage, indent=2, default=str))
    print_summary(coverage, report)

    # Nothing raw reached the server side.
    leaks = live.hits + done.hits
    assert not leaks, "the canary reached the server side:\n  " + "\n  ".join(
        map(str, leaks[:40]))
    # Nor is it in plaintext on the device (its store is encrypted).
    assert not device_side.hits, "the canary is in plaintext on the device:\n  " + \
        "\n  ".join(map(str, device_side.hits[:40]))

    # The search covered something real.
    for direction in ("up", "down"):
        figures = wire[direction]
        assert figures["raw_bytes"] > MIN_PROXY_BYTES, wire
        assert figures["h2_parsed_bytes"] >= 0.99 * figures["raw_bytes"], wire
        assert figures["grpc_messages"] > 0 and figures["grpc_undecodable"] == 0, wire
    assert done.coverage["SuperLink database"]["bytes"] > 0  # type: ignore[operator]
    assert {"round-001.pt", "round-002.pt", "final.pt"} <= set(checkpoints), checkpoints
    assert (run_dir / "rounds.jsonl").stat().st_size > 0
    assert run_cov.bytes > 0 and server_cov.files >= 5, done.coverage
    assert sum(v for k, v in device_cov.detail.items() if k.startswith("store")
               and k.endswith(".sqlite")) > 0, device_side.coverage


def print_summary(coverage: dict[str, Any], report: Path) -> None:
    lines = [f"canary {coverage['canary']} (raw_text={coverage['raw_text']}), "
             f"{coverage['canary_tokens']['count']} tokens, "
             f"{coverage['canary_tokens']['patterns']} patterns"]
    for phase in ("live", "after_stop", "device_side"):
        for place, cov in coverage[phase].items():
            if "files" in cov:
                lines.append(f"  {phase:<11} {place:<22} {cov['files']:>4} files "
                             f"{cov['bytes']:>11,} bytes")
            else:
                for direction in ("up", "down"):
                    f = cov[direction]
                    lines.append(f"  {phase:<11} {place} {direction:<4} {f['raw_bytes']:>11,} "
                                 f"bytes raw, {f['data_bytes']:,} DATA, {f['grpc_messages']} "
                                 f"gRPC messages ({f['grpc_bytes']:,} bytes), "
                                 f"{cov['connections']} connections, HPACK headers "
                                 + ("decoded" if cov["headers_decoded"] else
                                    "searched as sent (hpack not installed)"))
    lines.append(f"  checkpoints: {', '.join(coverage['checkpoints'])}")
    lines.append(f"  server-side hits: {len(coverage['server_hits'])}; device-side plaintext "
                 f"hits: {len(coverage['device_hits'])}")
    lines.append(f"  coverage written to {report}")
    print("\n".join(lines))

