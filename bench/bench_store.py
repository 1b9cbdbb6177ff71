"""Event store throughput: encrypted batched writes and verified reads.

Prints figures only (no assertions): events/s appended in batches, events/s read
back as records (``read_block``) and as a token array (``block_tokens``), bytes
per event on disk, and the tokenizer's raw events/s for comparison.

Usage::

    .venv/bin/python bench/bench_store.py [--events 200000] [--batch 1000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import date
from pathlib import Path

from keystay.client.store import EventStore
from keystay.common.tokens import Tokenizer
from keystay.sim.employees import SimulatedEmployee


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000, help="token records to write")
    parser.add_argument("--batch", type=int, default=1000, help="records per append")
    parser.add_argument("--blocks", type=int, default=4, help="daily blocks to spread over")
    parser.add_argument("--repeat", type=int, default=3, help="runs; the best is printed")
    args = parser.parse_args()

    employee = SimulatedEmployee(7)
    raw = []
    for event in employee.events(session_seed=7):
        raw.append(event)
        if len(raw) >= args.events:
            break
    tok = Tokenizer()
    t0 = time.perf_counter()
    records = []
    for event in raw:
        records.extend(tok.feed(event))
    tok_s = time.perf_counter() - t0
    print(f"tokenizer: {len(raw):,} raw events -> {len(records):,} tokens, "
          f"{len(raw) / tok_s:,.0f} raw events/s")

    # Same record count as asked, spread over blocks (records repeat if needed).
    while len(records) < args.events:
        records.extend(records[: args.events - len(records)])
    records = records[: args.events]
    per_block = len(records) // args.blocks
    blocks = [date(2024, 5, 1 + i).isoformat() for i in range(args.blocks)]

    best_write = best_read = best_tokens = float("inf")
    size = 0
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            store = EventStore.open(Path(tmp))
            t0 = time.perf_counter()
            for b, block in enumerate(blocks):
                chunk = records[b * per_block:(b + 1) * per_block]
                for lo in range(0, len(chunk), args.batch):
                    store.append(block, chunk[lo:lo + args.batch])
            best_write = min(best_write, time.perf_counter() - t0)
            store.close()
            store = EventStore.open(Path(tmp))
            size = store.size_bytes()
            t0 = time.perf_counter()
            n_read = sum(len(store.read_block(block)) for block in blocks)
            best_read = min(best_read, time.perf_counter() - t0)
            t0 = time.perf_counter()
            n_tokens = sum(len(store.block_tokens(block)) for block in blocks)
            best_tokens = min(best_tokens, time.perf_counter() - t0)
            store.close()
    n = per_block * len(blocks)
    if not n_read == n_tokens == n:  # correctness, not speed
        raise SystemExit(f"read back {n_read}/{n_tokens} events, wrote {n}")
    print(f"store write: {n:,} events in batches of {args.batch}: "
          f"{n / best_write:,.0f} events/s ({n / args.batch / best_write:,.0f} batches/s)")
    print(f"store read_block: {n / best_read:,.0f} events/s (all batches authenticated)")
    print(f"store block_tokens: {n / best_tokens:,.0f} events/s")
    print(f"on disk: {size:,} bytes, {size / n:.1f} bytes/event")


if __name__ == "__main__":
    main()
