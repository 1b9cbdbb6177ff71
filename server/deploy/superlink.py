"""The server folder and the ``flower-superlink`` it runs.

``keystay server init`` writes a server folder::

    DIR/server.toml        where the SuperLink listens, TLS material, options
    DIR/tls/               CA (ca.key 0600, ca.pem) and server certificate (see pki.py)
    DIR/superlink.db       the SuperLink's SQLite state (registered SuperNode keys)
    DIR/ledger.v1.sqlite   the server ledger (enrolled devices, privacy reports)
    DIR/enrollments.v1.sqlite  device id -> SuperLink node id (see enrollment.py)
    DIR/enrolled/          the SuperNode public keys registered with the SuperLink
    DIR/runs/NAME/         per run: settings, rounds.jsonl, checkpoints
    DIR/flwr/config.toml   the flwr CLI's connection (FLWR_HOME), for `flwr run`
    DIR/logs/              superlink.log

``keystay server start`` runs the SuperLink from that folder: TLS on the Fleet
API and on the Control/ServerAppIo HTTP API (same certificate), and
``--enable-supernode-auth`` so only SuperNode keys registered through the
Control API (``keystay server enroll``) may connect.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

import tomli_w

from keystay.common.errors import KeystayError
from keystay.common.exitcodes import ExitCode

CONFIG_FILE = "server.toml"
FEDERATION_NAME = "keystay"


class ServerConfigError(KeystayError, ValueError):
    """server.toml is missing a key or holds a value keystay cannot use."""

    exit_code = ExitCode.SERVER_CONFIG


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
        Only enrolled SuperNodes may connect (``--enable-supernode-auth``).
        On by default with TLS; Flower cannot authenticate nodes without TLS.
    tls_hosts : tuple[str, ...]
        The DNS names and IP addresses in the server certificate (``--host``),
        kept so ``keystay server init`` can re-issue the certificate with them.
    """

    fleet_address: str = "127.0.0.1:9092"
    control_host: str = "127.0.0.1"
    control_port: int = 8000
    insecure: bool = False
    ssl_certfile: str = "tls/server.pem"
    ssl_keyfile: str = "tls/server.key"
    ssl_ca_certfile: str = "tls/ca.pem"
    supernode_auth: bool = True
    tls_hosts: tuple[str, ...] = ()

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
                f"{path}: unknown key(s) {', '.join(unknown)}; "
                f"allowed: {', '.join(sorted(allowed))}"
            )
        if "tls_hosts" in data:
            data["tls_hosts"] = tuple(str(h) for h in data["tls_hosts"])
        config = cls(**data)
        if config.insecure and config.supernode_auth:
            raise ServerConfigError(
                f"{path}: insecure = true with supernode_auth = true; Flower authenticates "
                "SuperNodes only over TLS. Set insecure = false (recommended) or "
                "supernode_auth = false"
            )
        host, _, port = config.fleet_address.rpartition(":")
        if not host or not port.isdigit():
            raise ServerConfigError(
                f"{path}: fleet_address = {config.fleet_address!r}; expected HOST:PORT"
            )
        return config

    def save(self, server_dir: Path) -> Path:
        table = {
            key: value if isinstance(value, bool | int | tuple) else str(value)
            for key, value in asdict(self).items()
        }
        path = server_dir / CONFIG_FILE
        path.write_text(
            "# keystay server folder configuration (written by `keystay server init`)\n"
            + tomli_w.dumps({"server": table})
        )
        return path

    @property
    def control_address(self) -> str:
        """Where a local client dials the Control API (loopback when bound to all addresses).

        The flwr CLI checks the server certificate against this host, and
        ``127.0.0.1`` is always among its names.
        """
        host = self.control_host.strip("[]")
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        return f"[{host}]:{self.control_port}" if ":" in host else f"{host}:{self.control_port}"

    def superlink_command(self, server_dir: Path) -> list[str]:
        cmd = [
            # Through keystay's launcher: a busy SQLite state is answered with
            # "retry", not a dropped call (keystay.server.deploy.superlink_launch).
            sys.executable, "-m", "keystay.server.deploy.superlink_launch",
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
        if self.supernode_auth and not self.insecure:
            cmd.append("--enable-supernode-auth")
        return cmd

    def tls_paths(self, server_dir: Path) -> tuple[Path, Path, Path]:
        """``(certfile, keyfile, ca_certfile)`` as absolute paths."""
        return (server_dir / self.ssl_certfile, server_dir / self.ssl_keyfile,
                server_dir / self.ssl_ca_certfile)

    def tls_problems(self, server_dir: Path) -> tuple[list[str], list[str]]:
        """Check the TLS material before starting: ``(errors, warnings)``.

        Errors stop ``keystay server start`` (a SuperLink that devices would
        refuse, or a key others can read); warnings are printed (expiry soon,
        a listen address missing from the certificate's names).
        """
        from keystay.server.deploy.pki import (
            RENEW_WARNING_DAYS,
            PKIError,
            cert_info,
            host_of,
            parse_host,
            verify_chain,
        )

        errors: list[str] = []
        warnings: list[str] = []
        if self.insecure:
            return errors, warnings
        cert, key, ca = self.tls_paths(server_dir)
        missing = [p for p in (cert, key, ca) if not p.exists()]
        if missing:
            errors.append(f"missing TLS file(s) {', '.join(map(str, missing))}; run "
                          f"'keystay server init --dir {server_dir}' to create them")
            return errors, warnings
        mode = key.stat().st_mode & 0o777
        if mode & 0o077:
            errors.append(f"{key} has mode {mode:04o}; the TLS key must be readable by its "
                          f"owner only: chmod 600 {key}")
        try:
            verify_chain(cert, ca)
        except PKIError as error:
            errors.append(str(error))
            return errors, warnings
        info = cert_info(cert)
        left = info.days_left()
        if left < RENEW_WARNING_DAYS:
            warnings.append(f"{cert} expires in {left:.0f} days ({info.not_after:%Y-%m-%d}); "
                            f"renew it with 'keystay server init --dir {server_dir}'")
        names = set(info.dns_names) | set(info.ip_addresses)
        for listen in (self.fleet_address, f"{self.control_host}:{self.control_port}"):
            host = host_of(listen)
            if host is None:
                continue
            san = parse_host(host)
            if str(san.value) not in names:
                warnings.append(f"{cert} does not name {host} (listening on {listen}); clients "
                                f"dialling it will refuse the certificate. Add it with "
                                f"'keystay server init --dir {server_dir} --host {host}'")
        return errors, warnings

    def write_flwr_home(self, server_dir: Path) -> Path:
        """Write the flwr CLI connection (``FLWR_HOME/config.toml``) for this server."""
        home = server_dir / "flwr"
        home.mkdir(parents=True, exist_ok=True)
        connection: dict[str, object] = {"address": self.control_address}
        if self.insecure:
            connection["insecure"] = True
        else:
            connection["root-certificates"] = str(server_dir / self.ssl_ca_certfile)
        document = {"superlink": {"default": FEDERATION_NAME, FEDERATION_NAME: connection}}
        (home / "config.toml").write_text(tomli_w.dumps(document))
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
