"""The server folder and the ``flower-superlink`` it runs.

``keystay server init`` writes a server folder::

    DIR/server.toml        where the SuperLink listens, TLS material, options
    DIR/superlink.db       the SuperLink's SQLite state
    DIR/ledger.v1.sqlite   the server ledger (enrolled devices, privacy reports)
    DIR/runs/NAME/         per run: settings, rounds.jsonl, checkpoints
    DIR/flwr/config.toml   the flwr CLI's connection (FLWR_HOME), for `flwr run`
    DIR/logs/              superlink.log

``keystay server start`` runs the SuperLink from that folder.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

CONFIG_FILE = "server.toml"
FEDERATION_NAME = "keystay"


class ServerConfigError(ValueError):
    """server.toml is missing a key or holds a value keystay cannot use."""


@dataclass(frozen=True)
class ServerConfig:
    """What ``server.toml`` holds.

    Attributes
    ----------
    fleet_address : str
        Where devices connect (Fleet API, gRPC), ``HOST:PORT``.
    control_host, control_port : str, int
        The Control API (HTTP) that ``keystay round start`` submits runs to.
        Keep it on loopback or firewalled: whoever reaches it can start runs.
    insecure : bool
        Plain-text transport. Only for loopback demos and tests.
    ssl_certfile, ssl_keyfile, ssl_ca_certfile : str
        TLS material (paths relative to the server folder).
    supernode_auth : bool
        Only enrolled SuperNodes may connect.
    """

    fleet_address: str = "127.0.0.1:9092"
    control_host: str = "127.0.0.1"
    control_port: int = 8000
    insecure: bool = False
    ssl_certfile: str = "tls/server.pem"
    ssl_keyfile: str = "tls/server.key"
    ssl_ca_certfile: str = "tls/ca.pem"
    supernode_auth: bool = False

    @classmethod
    def load(cls, server_dir: Path) -> ServerConfig:
        path = server_dir / CONFIG_FILE
        if not path.exists():
            raise ServerConfigError(
                f"{path} not found; create the server folder with "
                f"'keystay server init --dir {server_dir}'"
            )
        data = tomllib.loads(path.read_text()).get("server", {})
        allowed = set(asdict(cls()))
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ServerConfigError(
                f"{path}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
            )
        config = cls(**data)
        host, _, port = config.fleet_address.rpartition(":")
        if not host or not port.isdigit():
            raise ServerConfigError(
                f"{path}: fleet_address = {config.fleet_address!r}; expected HOST:PORT"
            )
        return config

    def save(self, server_dir: Path) -> Path:
        lines = ["# keystay server folder configuration (written by `keystay server init`)",
                 "[server]"]
        for key, value in asdict(self).items():
            if isinstance(value, bool):
                lines.append(f"{key} = {'true' if value else 'false'}")
            elif isinstance(value, int):
                lines.append(f"{key} = {value}")
            else:
                lines.append(f'{key} = "{value}"')
        path = server_dir / CONFIG_FILE
        path.write_text("\n".join(lines) + "\n")
        return path

    @property
    def control_address(self) -> str:
        return f"{self.control_host}:{self.control_port}"

    def superlink_command(self, server_dir: Path) -> list[str]:
        cmd = [
            executable("flower-superlink"),
            "--database",
            str(server_dir / "superlink.db"),
            "--fleet-api-address",
            self.fleet_address,
            "--host",
            self.control_host,
            "--port",
            str(self.control_port),
            # Otherwise SuperExec runs `uv sync` on the app's dependencies and
            # pulls a CUDA torch; keystay's app runs in this environment.
            "--disable-runtime-dependency-installation",
            "--log-file",
            str(server_dir / "logs" / "superlink.log"),
        ]
        if self.insecure:
            cmd.append("--insecure")
        else:
            cmd += [
                "--ssl-certfile", str(server_dir / self.ssl_certfile),
                "--ssl-keyfile", str(server_dir / self.ssl_keyfile),
                "--ssl-ca-certfile", str(server_dir / self.ssl_ca_certfile),
            ]
        if self.supernode_auth:
            cmd.append("--enable-supernode-auth")
        return cmd

    def write_flwr_home(self, server_dir: Path) -> Path:
        """Write the flwr CLI connection (``FLWR_HOME/config.toml``) for this server."""
        home = server_dir / "flwr"
        home.mkdir(parents=True, exist_ok=True)
        lines = [
            "[superlink]",
            f'default = "{FEDERATION_NAME}"',
            f"[superlink.{FEDERATION_NAME}]",
            f'address = "{self.control_address}"',
        ]
        if self.insecure:
            lines.append("insecure = true")
        else:
            lines.append(f'root-certificates = "{server_dir / self.ssl_ca_certfile}"')
        (home / "config.toml").write_text("\n".join(lines) + "\n")
        return home


def executable(name: str) -> str:
    """A Flower/keystay executable beside this interpreter (the venv's ``bin``)."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else name


def flower_env(flwr_home: Path | None = None) -> dict[str, str]:
    """Environment for Flower processes: no telemetry, the venv's bin on PATH."""
    env = dict(os.environ)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def wait_for_port(address: str, timeout: float, alive: object = None) -> bool:
    """Wait until something accepts TCP connections on ``HOST:PORT``.

    ``alive`` is an optional zero-argument callable; when it returns False the
    wait ends early (the process that should listen has died).
    """
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(alive) and not alive():
            return False
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1):
                return True
        except OSError:
            time.sleep(0.2)
    return False


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
