"""Looking for a canary in bytes: search patterns, a recording TCP proxy, HTTP/2 unframing.

Helpers for ``test_canary.py`` (the test that proves nothing raw leaves the
device). Three parts:

- **Patterns.** :func:`text_patterns` turns a canary string into the byte
  strings it would become on the way out (UTF-8, UTF-16, lower/upper case,
  base64 at every alignment, hex); :func:`token_patterns` does the same for a
  token-id sequence (uint8, protobuf varints, uint16/int32/int64 and
  float32/float64 little-endian, as numpy or a serializer would write them,
  and as JSON/text lists). Training windows are 33 tokens cut at every
  position, so a leaked window holds only a *part* of the canary's span: the
  span is also searched in aligned 16-token tiles, and any 31 or more
  consecutive tokens of the span contain a whole tile.
- **Search.** :func:`search_tree` reads every file under a folder and reports
  each pattern found (place, file, offset), with the coverage: files and bytes
  searched.
- **Transport.** :class:`RecordingProxy` forwards TCP between SuperNodes and the
  SuperLink's Fleet API and keeps every byte of both directions;
  :func:`decode_h2` undoes HTTP/2 framing (a string cut by a frame boundary
  would escape a search of the raw stream) and gRPC message framing, and
  decompresses gRPC-compressed messages. HPACK header blocks are searched as
  captured and, when the ``hpack`` package is importable, decoded
  (:func:`decode_headers`): a string sent in a Huffman-coded header is found
  only then.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import socket
import struct
import threading
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

TILE = 16
"""Tokens per tile: any run of >= 2 * TILE - 1 span tokens (a 33-token window) holds a tile."""


# --------------------------------------------------------------------------- patterns


@dataclass(frozen=True, slots=True)
class Pattern:
    """One byte string to look for, and what it stands for (printed with a hit)."""

    label: str
    data: bytes
    kind: str  # "text" (the canary string) or "tokens" (its token encoding)


def _base64_cores(raw: bytes) -> list[tuple[str, bytes]]:
    """The base64 characters that depend on ``raw`` alone, at each of the 3 alignments.

    Encoding ``k`` unknown bytes and then ``raw``: the first output group mixes
    the unknown bytes in (dropped when ``k > 0``) and the last one the bytes
    after (always dropped), so what remains appears in any base64 text that
    carries ``raw`` at that alignment.
    """
    out = []
    for k in range(3):
        for name, encode in (("base64", base64.b64encode), ("base64url", base64.urlsafe_b64encode)):
            enc = encode(b"\0" * k + raw)
            core = enc[4 if k else 0 : -4]
            if len(core) >= 12:
                out.append((f"{name}@{k}", core))
    return out


def text_patterns(canary: str) -> list[Pattern]:
    """Every form of the canary string searched for (see the module docstring)."""
    variants = {
        "ascii": canary,
        "lowercase": canary.lower(),
        "uppercase": canary.upper(),
        "random part": canary[len("KSCANARY"):] if canary.startswith("KSCANARY") else canary,
    }
    patterns: dict[bytes, Pattern] = {}

    def add(label: str, data: bytes) -> None:
        patterns.setdefault(data, Pattern(f"canary {label}", data, "text"))

    for name, text in variants.items():
        add(f"{name} utf-8", text.encode())
        add(f"{name} utf-16-le", text.encode("utf-16-le"))
        add(f"{name} utf-16-be", text.encode("utf-16-be"))
    add("hex", canary.encode().hex().encode())
    add("HEX", canary.encode().hex().upper().encode())
    for name, core in _base64_cores(canary.encode()):
        add(name, core)
    return list(patterns.values())


def _varints(ids: Sequence[int]) -> bytes:
    out = bytearray()
    for value in ids:
        while True:
            byte = value & 0x7F
            value >>= 7
            out.append(byte | (0x80 if value else 0))
            if not value:
                break
    return bytes(out)


def _encodings(ids: Sequence[int]) -> list[tuple[str, bytes]]:
    n = len(ids)
    out = [
        ("varint", _varints(ids)),
        ("uint16-le", struct.pack(f"<{n}H", *ids)),
        ("int32-le", struct.pack(f"<{n}i", *ids)),
        ("int64-le", struct.pack(f"<{n}q", *ids)),
        ("float32-le", struct.pack(f"<{n}f", *ids)),
        ("float64-le", struct.pack(f"<{n}d", *ids)),
        ("uint16-be", struct.pack(f">{n}H", *ids)),
        ("json list", ", ".join(map(str, ids)).encode()),
        ("compact list", ",".join(map(str, ids)).encode()),
        ("space list", " ".join(map(str, ids)).encode()),
    ]
    if max(ids) < 256:
        out.insert(0, ("uint8", bytes(ids)))
    return out


def tiles(ids: Sequence[int], size: int = TILE) -> list[tuple[int, list[int]]]:
    """``(start, ids)`` of aligned tiles covering ``ids``; the last one ends at the end."""
    if len(ids) <= size:
        return [(0, list(ids))]
    starts = list(range(0, len(ids) - size + 1, size))
    if starts[-1] + size < len(ids):
        starts.append(len(ids) - size)
    return [(s, list(ids[s : s + size])) for s in starts]


def token_patterns(ids: Sequence[int]) -> list[Pattern]:
    """The canary's token span, whole and in tiles, in every encoding (module docstring)."""
    if not ids:
        raise ValueError("the canary's token span is empty: nothing to search for")
    pieces = [("span", list(ids))]
    if len(ids) > TILE:
        pieces += [(f"tile@{start}", tile) for start, tile in tiles(ids)]
    patterns: dict[bytes, Pattern] = {}
    for name, piece in pieces:
        for encoding, data in _encodings(piece):
            patterns.setdefault(data, Pattern(f"tokens {name} {encoding}", data, "tokens"))
    return list(patterns.values())


# --------------------------------------------------------------------------- search


@dataclass(frozen=True, slots=True)
class Hit:
    place: str
    where: str  # a file path, or a capture stream's name
    pattern: str
    offset: int
    context: str  # a few bytes around the hit, repr'd

    def __str__(self) -> str:
        return f"{self.place}: {self.pattern} in {self.where} at byte {self.offset}: {self.context}"


@dataclass
class PlaceCoverage:
    """What one place contributed to the search."""

    place: str
    files: int = 0
    bytes: int = 0
    detail: dict[str, int] = field(default_factory=dict)  # e.g. per file or per sub-folder

    def as_dict(self) -> dict[str, object]:
        return {"files": self.files, "bytes": self.bytes, "detail": dict(self.detail)}


def search_bytes(data: bytes, patterns: Iterable[Pattern], *, place: str,
                 where: str) -> list[Hit]:
    """Every occurrence of every pattern in ``data``."""
    hits = []
    for pattern in patterns:
        start = data.find(pattern.data)
        while start >= 0:
            lo, hi = max(0, start - 16), start + len(pattern.data) + 16
            hits.append(Hit(place, where, pattern.label, start, repr(data[lo:hi])))
            start = data.find(pattern.data, start + 1)
    return hits


def search_tree(root: Path, patterns: Sequence[Pattern], *, place: str,
                exclude: Sequence[Path] = ()) -> tuple[list[Hit], PlaceCoverage]:
    """Search every regular file under ``root`` (not following links).

    Files that vanish while the tree is walked (a SQLite ``-shm`` removed at
    close) are skipped; everything read is counted in the coverage, per
    top-level entry of ``root`` in ``detail``.
    """
    coverage = PlaceCoverage(place)
    hits: list[Hit] = []
    excluded = [p.resolve() for p in exclude]
    if not root.exists():
        return hits, coverage
    paths = [root] if root.is_file() else sorted(root.rglob("*"))
    for path in paths:
        if path.is_symlink() or not path.is_file():
            continue
        if any(path.resolve().is_relative_to(e) for e in excluded):
            continue
        try:
            data = path.read_bytes()
        except (FileNotFoundError, PermissionError):
            continue
        coverage.files += 1
        coverage.bytes += len(data)
        rel = path.relative_to(root) if path != root else Path(path.name)
        top = rel.parts[0]
        coverage.detail[top] = coverage.detail.get(top, 0) + len(data)
        hits += search_bytes(data, patterns, place=place, where=str(path))
    return hits, coverage


# --------------------------------------------------------------------------- transport


@dataclass
class Connection:
    """One proxied TCP connection: every byte each way, in order."""

    number: int
    up: bytearray = field(default_factory=bytearray)  # SuperNode -> SuperLink
    down: bytearray = field(default_factory=bytearray)  # SuperLink -> SuperNode


class RecordingProxy:
    """A TCP forwarder on 127.0.0.1 that keeps a copy of everything it forwards.

    Parameters
    ----------
    upstream : str
        ``HOST:PORT`` to forward to (the SuperLink's Fleet API).
    """

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self._upstream = (host.strip("[]"), int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self.connections: list[Connection] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self.errors: list[str] = []

    def start(self) -> None:
        thread = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(self._upstream, timeout=10)
                server.settimeout(None)
            except OSError as error:
                self.errors.append(f"upstream connect failed: {error}")
                client.close()
                continue
            with self._lock:
                conn = Connection(len(self.connections))
                self.connections.append(conn)
                self._sockets += [client, server]
            for src, dst, buf, name in ((client, server, conn.up, "up"),
                                        (server, client, conn.down, "down")):
                pump = threading.Thread(target=self._pump, args=(src, dst, buf),
                                        name=f"proxy-{conn.number}-{name}", daemon=True)
                pump.start()
                self._threads.append(pump)

    def _pump(self, src: socket.socket, dst: socket.socket, buf: bytearray) -> None:
        # Record before forwarding: what the peer received was recorded.
        try:
            while True:
                chunk = src.recv(65536)
                if not chunk:
                    break
                with self._lock:
                    buf += chunk
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            # Half-close onward so the peer sees the end, as without a proxy.
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def totals(self) -> tuple[int, int]:
        """``(bytes up, bytes down)`` over every connection so far."""
        with self._lock:
            return (sum(len(c.up) for c in self.connections),
                    sum(len(c.down) for c in self.connections))

    def snapshot(self) -> list[tuple[int, bytes, bytes]]:
        with self._lock:
            return [(c.number, bytes(c.up), bytes(c.down)) for c in self.connections]

    def save(self, folder: Path) -> list[Path]:
        """Write the capture, one file per connection and direction, for a person to inspect."""
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        for number, up, down in self.snapshot():
            for direction, stream in (("up", up), ("down", down)):
                path = folder / f"connection-{number}-{direction}.bin"
                path.write_bytes(stream)
                written.append(path)
        return written

    def stop(self) -> None:
        self._stop.set()
        self._listener.close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(5)


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DATA, _HEADERS, _CONTINUATION = 0x0, 0x1, 0x9
_END_HEADERS, _PADDED, _PRIORITY = 0x4, 0x8, 0x20


@dataclass
class H2Decoded:
    """One direction of one HTTP/2 connection, unframed."""

    frames: int = 0
    consumed: int = 0  # bytes parsed as whole frames (plus the preface)
    total: int = 0
    data: dict[int, bytes] = field(default_factory=dict)  # stream id -> DATA payload
    header_blocks: list[bytes] = field(default_factory=list)  # whole HPACK blocks, in order
    grpc_messages: list[bytes] = field(default_factory=list)
    grpc_compressed: int = 0
    grpc_undecodable: int = 0


def decode_h2(stream: bytes) -> H2Decoded:
    """Unframe HTTP/2 (DATA per stream, header blocks) and then gRPC messages.

    Stops at the first incomplete frame (a connection cut at shutdown);
    ``consumed`` says how far parsing got, so a caller can check the framing
    was understood (``consumed == total`` on a clean capture).
    """
    out = H2Decoded(total=len(stream))
    pos = len(H2_PREFACE) if stream.startswith(H2_PREFACE) else 0
    data: dict[int, bytearray] = {}
    block = bytearray()
    while pos + 9 <= len(stream):
        length = int.from_bytes(stream[pos : pos + 3], "big")
        ftype, flags = stream[pos + 3], stream[pos + 4]
        sid = int.from_bytes(stream[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
        if pos + 9 + length > len(stream):
            break
        payload = stream[pos + 9 : pos + 9 + length]
        if ftype in (_DATA, _HEADERS) and flags & _PADDED and payload:
            pad = payload[0]
            payload = payload[1 : len(payload) - pad]
        if ftype == _DATA:
            data.setdefault(sid, bytearray()).extend(payload)
        elif ftype in (_HEADERS, _CONTINUATION):
            if ftype == _HEADERS:
                block = bytearray(payload[5:] if flags & _PRIORITY else payload)
            else:
                block += payload
            if flags & _END_HEADERS:
                out.header_blocks.append(bytes(block))
        out.frames += 1
        pos += 9 + length
    out.consumed = pos
    out.data = {sid: bytes(buf) for sid, buf in data.items()}
    for body in out.data.values():
        at = 0
        while at + 5 <= len(body):
            compressed, size = body[at], int.from_bytes(body[at + 1 : at + 5], "big")
            message = body[at + 5 : at + 5 + size]
            at += 5 + size
            if compressed:
                out.grpc_compressed += 1
                for inflate in (gzip.decompress, zlib.decompress,
                                lambda b: zlib.decompress(b, -15)):
                    try:
                        message = inflate(message)
                        break
                    except (OSError, zlib.error, EOFError):
                        continue
                else:
                    out.grpc_undecodable += 1
            out.grpc_messages.append(message)
    return out


def decode_headers(blocks: Sequence[bytes]) -> bytes | None:
    """One direction's HPACK blocks (in order) as ``name: value`` lines; None without hpack.

    ``hpack`` is not a keystay dependency; without it header blocks are only
    searched as sent, and a Huffman-coded value would go unseen.
    """
    try:
        import hpack  # type: ignore[import-not-found]
    except ImportError:
        return None
    decoder = hpack.Decoder()
    decoder.max_header_list_size = 1 << 30
    lines = []
    for block in blocks:
        for name, value in decoder.decode(block, raw=True):
            lines.append(bytes(name) + b": " + bytes(value))
    return b"\n".join(lines)
