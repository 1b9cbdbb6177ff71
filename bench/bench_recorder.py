"""How much does always-on capture cost the employee's machine, and does it lose keys?

Starts a private Xvfb, runs the recorder (PynputBackend + Recorder + EventStore,
exactly as the daemon wires them) alone in a child process, drives it with
xdotool (XTEST: the server sees device input, as from a real keyboard and
mouse) at several event rates for a fixed time each, and prints per rate:

- CPU % of one core used by the recorder process (``/proc/PID/stat`` utime +
  stime over the interval, until everything sent was recorded),
- RSS MiB (``VmRSS`` now, ``VmHWM`` peak),
- X events sent; "X merged": pointer motions the X server merged before
  delivering them (under load it collapses consecutive motions it has not
  processed yet, as it would for a real mouse; never keys), so no recorder
  could have seen them; "seen": events the recorder saw; "lost": events
  delivered to the recorder but not seen (a loss inside keystay); key events
  sent and recorded (read back from the store: key presses and their
  release/dwell tokens), key events lost.

Rates mix keys and pointer motion: 125 ev/s is keys only (press and release
each count as an event: 62.5 keys/s); higher rates add pointer motion on top
of 125 key ev/s. xdotool reads commands from a pipe and executes them as they
arrive, so the pacing is the parent's (a 5 ms schedule).

Then it times each stage alone (submit, tokenize, store append), so a missed
goal can be traced to what costs what.

Goals (printed beside the figures, not asserted; the machine is shared):
<= 1 % of one core at 125 ev/s, <= 40 MiB RSS, zero key events lost.

Usage::

    .venv/bin/python bench/bench_recorder.py [--duration 10] [--rates 125,1000,5000]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

GOAL_CPU_125 = 1.0
GOAL_RSS_MIB = 40.0
KEY_RATE = 125  # key events per second mixed into every rate
SLOT_S = 0.005
CLK_TCK = os.sysconf("SC_CLK_TCK")
THREAD_ROLES = {
    "keystay-input": "input listener",
    "keystay-recorder": "writer",
    "keystay-focus": "focus watcher",
}


# -- the measured process ------------------------------------------------------------


def child(data_dir: str) -> None:
    """Run the recorder; answer "stats" and "stop" on stdin with one JSON line each."""
    from keystay.client.capture.pynput_backend import PynputBackend
    from keystay.client.capture.recorder import Recorder
    from keystay.client.store import EventStore
    from keystay.common.tokens import Tokenizer, token_name

    store = EventStore.open(data_dir)
    recorder = Recorder(store, Tokenizer())
    backend = PynputBackend(recorder.submit)
    recorder.start()
    backend.start()

    def stats() -> dict[str, Any]:
        s = recorder.stats
        return {
            "events_received": backend.events_received,
            "events_seen": s.events_seen,
            "queue_depth": s.queue_depth,
            "tokens_written": s.tokens_written,
            "batches_written": s.batches_written,
            "last_error": s.last_error,
        }

    names = {str(t.native_id): t.name for t in threading.enumerate()}
    names = {tid: THREAD_ROLES.get(n, n) for tid, n in names.items()}
    names[str(os.getpid())] = "main"
    # The recorder must not pull in numpy (~14 MiB): say if anything did.
    print(json.dumps({"ready": os.getpid(), "numpy_loaded": "numpy" in sys.modules,
                      "threads": names,
                      **stats()}), flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "stats":
            print(json.dumps(stats()), flush=True)
        elif command == "stop":
            break
    received = backend.events_received
    backend.stop()
    recorder.stop()
    counts: dict[str, int] = {}
    for info in store.blocks():
        for rec in store.read_block(info.block):
            name = token_name(rec.token)
            kind = name.rsplit(":", 1)[0] if name.startswith("timing:") else name
            counts[kind] = counts.get(kind, 0) + 1
    store.close()
    print(json.dumps({"final": {**stats(), "events_received": received}, "tokens": counts}),
          flush=True)


# -- the driver --------------------------------------------------------------------------


def proc_cpu_s(pid: int, tid: int | None = None) -> float:
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    with open(path) as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def threads_cpu_s(pid: int) -> dict[str, float]:
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):  # the thread ended meanwhile
            out[tid] = proc_cpu_s(pid, int(tid))
    return out


def proc_mem_mib(pid: int) -> tuple[float, float]:
    values = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


class Child:
    def __init__(self, server: Any, data_dir: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--child", data_dir],
            env=server.env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        first = self._read()
        self.pid = int(first["ready"])
        self.seen_at_start = int(first["events_seen"])
        self.numpy_loaded = bool(first["numpy_loaded"])
        self.threads: dict[str, str] = first["threads"]

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"recorder child exited (code {self.proc.wait()})")
        result: dict[str, Any] = json.loads(line)
        return result

    def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def plan(rate: int, duration: float) -> tuple[list[list[str]], int, int]:
    """xdotool lines per 5 ms slot; returns (slots, key events, motion events)."""
    slots: list[list[str]] = []
    key_rate = min(KEY_RATE, rate)
    move_rate = rate - key_rate
    n_slots = round(duration / SLOT_S)
    keys = moves = 0
    for i in range(n_slots):
        lines: list[str] = []
        while keys < round((i + 1) * SLOT_S * key_rate):
            letter = chr(ord("a") + (keys // 2) % 26)
            lines.append(f"{'keydown' if keys % 2 == 0 else 'keyup'} --delay 0 {letter}")
            keys += 1
        while moves < round((i + 1) * SLOT_S * move_rate):
            # A closed loop over distinct points: every command really moves.
            x = 200 + (moves % 400)
            y = 200 + (moves // 400) % 2 * 5
            lines.append(f"mousemove {x} {y}")
            moves += 1
        slots.append(lines)
    if keys % 2:
        # Never leave a key held: the server would autorepeat it into the next phase.
        slots[-1].append(f"keyup --delay 0 {chr(ord('a') + (keys // 2) % 26)}")
        keys += 1
    return slots, keys, moves


def drive(server: Any, slots: list[list[str]]) -> float:
    """Feed the slots to one ``xdotool -`` on schedule; return the time it took."""
    xdo = subprocess.Popen(
        ["xdotool", "-"], env=server.env(), stdin=subprocess.PIPE, text=True
    )
    assert xdo.stdin is not None
    start = time.monotonic()
    try:
        for i, lines in enumerate(slots):
            delay = start + i * SLOT_S - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if lines:
                xdo.stdin.write("\n".join(lines) + "\n")
                xdo.stdin.flush()
        xdo.stdin.close()
        xdo.wait(timeout=60)
    finally:
        if xdo.poll() is None:
            xdo.kill()
            xdo.wait()
    return time.monotonic() - start


def run_rate(server: Any, rate: int, duration: float, idle_s: float) -> dict[str, Any]:
    slots, sent_keys, sent_moves = plan(rate, duration)
    with tempfile.TemporaryDirectory(prefix="keystay-bench-") as data_dir:
        child_proc = Child(server, data_dir)
        try:
            pid = child_proc.pid
            time.sleep(0.5)  # let imports and first allocations settle
            c0, w0 = proc_cpu_s(pid), time.monotonic()
            time.sleep(idle_s)
            idle_cpu = (proc_cpu_s(pid) - c0) / (time.monotonic() - w0) * 100
            c0, w0, t0 = proc_cpu_s(pid), time.monotonic(), threads_cpu_s(pid)
            took = drive(server, slots)
            # Wait until everything sent was seen and queued work is written.
            expected = child_proc.seen_at_start + sent_keys + sent_moves
            deadline = time.monotonic() + 10
            settled = 0
            last_received = -1
            while True:
                s = child_proc.ask("stats")
                # Done when all was seen, or when the X server stopped delivering
                # (it may have merged pointer motions) and the queue is empty.
                settled = settled + 1 if s["events_received"] == last_received else 0
                last_received = s["events_received"]
                done = s["queue_depth"] == 0 and (s["events_seen"] >= expected or settled >= 4)
                if done or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            c1, w1, t1 = proc_cpu_s(pid), time.monotonic(), threads_cpu_s(pid)
            rss, hwm = proc_mem_mib(pid)
            per_thread: dict[str, float] = {}
            for tid, cpu in t1.items():
                role = child_proc.threads.get(tid, "other")
                per_thread[role] = per_thread.get(role, 0.0) + (
                    (cpu - t0.get(tid, 0.0)) / (w1 - w0) * 100
                )
            final = child_proc.ask("stop")
            child_proc.proc.wait(timeout=30)
        finally:
            child_proc.kill()
    tokens = final["tokens"]
    key_presses = tokens.get("key:letter", 0)
    key_releases = tokens.get("timing:dwell", 0)
    seen = final["final"]["events_seen"] - child_proc.seen_at_start
    received = final["final"]["events_received"]
    return {
        "rate": rate,
        "achieved": (sent_keys + sent_moves) / took,
        "cpu": (c1 - c0) / (w1 - w0) * 100,
        "idle_cpu": idle_cpu,
        "rss": rss,
        "hwm": hwm,
        "sent": sent_keys + sent_moves,
        "sent_keys": sent_keys,
        "seen": seen,
        "keys_recorded": key_presses + key_releases,
        "received": received,
        "merged": sent_keys + sent_moves - received,
        "lost": received - seen,
        "keys_lost": sent_keys - (key_presses + key_releases),
        "tokens": final["final"]["tokens_written"],
        "batches": final["final"]["batches_written"],
        "error": final["final"]["last_error"],
        "numpy_loaded": child_proc.numpy_loaded,
        "threads": per_thread,
    }


# -- each stage alone ---------------------------------------------------------------------


def stage_costs() -> list[tuple[str, float, str]]:
    """Microseconds per call of each stage, in this process (no X needed)."""
    from keystay.client.capture.recorder import Recorder
    from keystay.client.store import EventStore
    from keystay.common.events import KeyEvent, MouseMove
    from keystay.common.tokens import Tokenizer

    def per_call(fn: Any, n: int) -> float:
        start = time.perf_counter()
        fn(n)
        return (time.perf_counter() - start) / n * 1e6

    out: list[tuple[str, float, str]] = []
    letters = "abcdefghijklmnopqrst"
    keys = [KeyEvent(i * 0.05, i % 2 == 0, 38 + (i // 2) % 20, letters[(i // 2) % 20])
            for i in range(20000)]
    moves = [MouseMove(i * 0.001, 200 + i % 400, 200) for i in range(20000)]

    def feed(events: list[Any]) -> Any:
        def run(n: int) -> None:
            tok = Tokenizer()
            f = tok.feed
            for e in events[:n]:
                f(e)
        return run

    out.append(("Tokenizer.feed, key events", per_call(feed(keys), 20000), "per event"))
    out.append(("Tokenizer.feed, pointer motion", per_call(feed(moves), 20000), "per event"))
    with tempfile.TemporaryDirectory(prefix="keystay-bench-") as d:
        store = EventStore.open(d)
        tok = Tokenizer()
        records = [r for e in keys[:2000] for r in tok.feed(e)]
        for size in (64, 512):
            batch = records[:size]
            n = 200

            def append(k: int, batch: Any = batch) -> None:
                for _ in range(k):
                    store.append("2024-01-01", batch)

            out.append((f"EventStore.append, {size} records", per_call(append, n), "per batch"))
        recorder = Recorder(store, Tokenizer())  # not started: measures the door only
        recorder._accepting = True

        def submit(k: int) -> None:
            s = recorder.submit
            for e in moves[:k]:
                s(e)

        out.append(("Recorder.submit (enqueue)", per_call(submit, 20000), "per event"))
        store.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per rate")
    parser.add_argument("--rates", default="125,1000,5000", help="events/s, comma-separated")
    parser.add_argument("--idle", type=float, default=3.0, help="seconds of idle measured first")
    parser.add_argument("--child", metavar="DATA_DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return

    import xserver

    missing = xserver.missing_tools()
    if missing:
        sys.exit(missing)
    server = xserver.start_xvfb()
    window = None
    try:
        window = xserver.start_window(server, "Bench", "bench")
        server.xdotool("windowfocus", "--sync", str(window.window))
        results = [
            run_rate(server, int(r), args.duration, args.idle) for r in args.rates.split(",")
        ]
    finally:
        if window is not None:
            window.stop()
        server.stop()

    print(f"recorder alone (PynputBackend + Recorder + EventStore), {args.duration:.0f} s per "
          f"rate, {os.cpu_count()} cores, Xvfb + xdotool (XTEST)")
    header = (f"{'rate ev/s':>9} {'achieved':>8} {'CPU %':>6} {'idle %':>6} {'RSS MiB':>7} "
              f"{'HWM MiB':>7} {'sent':>7} {'X merged':>8} {'seen':>7} {'lost':>5} "
              f"{'keys sent':>9} {'keys rec':>8} {'keys lost':>9} {'tokens':>6} {'batches':>7}")
    print(header)
    for r in results:
        print(f"{r['rate']:>9} {r['achieved']:>8.0f} {r['cpu']:>6.2f} {r['idle_cpu']:>6.2f} "
              f"{r['rss']:>7.1f} {r['hwm']:>7.1f} {r['sent']:>7} {r['merged']:>8} "
              f"{r['seen']:>7} {r['lost']:>5} {r['sent_keys']:>9} {r['keys_recorded']:>8} "
              f"{r['keys_lost']:>9} {r['tokens']:>6} {r['batches']:>7}")
        print("          by thread: " + ", ".join(
            f"{role} {cpu:.2f} %" for role, cpu in sorted(r["threads"].items())))
        if r["error"]:
            print(f"          last error: {r['error']}")
    print()
    r125 = next((r for r in results if r["rate"] == 125), None)
    if r125 is not None:
        ok = "met" if r125["cpu"] <= GOAL_CPU_125 else "MISSED"
        print(f"goal  CPU <= {GOAL_CPU_125:.0f} % at 125 ev/s: {r125['cpu']:.2f} % ({ok})")
    worst_hwm = max(r["hwm"] for r in results)
    ok = "met" if worst_hwm <= GOAL_RSS_MIB else "MISSED"
    numpy_loaded = any(r["numpy_loaded"] for r in results)
    print(f"goal  RSS <= {GOAL_RSS_MIB:.0f} MiB: peak {worst_hwm:.1f} MiB ({ok}); numpy "
          f"{'LOADED in the recorder' if numpy_loaded else 'not loaded'}")
    lost = sum(r["keys_lost"] for r in results)
    print(f"goal  zero key events lost: {lost} lost ({'met' if lost == 0 else 'MISSED'})")
    print()
    print("each stage alone, in one process:")
    for name, us, unit in stage_costs():
        print(f"  {name:<36} {us:>8.1f} us {unit}")


if __name__ == "__main__":
    main()
