"""Server-side enrollment: request verification, and enroll/revoke bookkeeping.

Requests are made by the real device code (``keystay.client.enroll``) so the
two sides' canonical forms and fingerprints are checked against each other.
The SuperLink is replaced by a stand-in for ``FlwrControl`` here; the e2e
tests (tests/e2e/test_transport.py) use the real one.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, ClassVar

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from keystay.client import enroll as ce
from keystay.client.identity import DeviceIdentity
from keystay.server.deploy import enrollment as se
from keystay.server.deploy.superlink import ServerConfig
from keystay.server.ledger.ledger import ServerLedger


def make_request(folder: Path) -> dict[str, Any]:
    identity = DeviceIdentity.open(folder)
    key = ce.load_or_create_supernode_key(folder)
    request, _ = ce.build_request(identity, key)
    return request


@pytest.fixture
def request_dict(tmp_path: Path) -> dict[str, Any]:
    return make_request(tmp_path / "device")


def test_both_sides_agree_on_the_fingerprint(tmp_path: Path) -> None:
    identity = DeviceIdentity.open(tmp_path)
    key = ce.load_or_create_supernode_key(tmp_path)
    request, device_fp = ce.build_request(identity, key)
    parsed = se.EnrollmentRequest.parse(json.loads(json.dumps(request)))
    assert parsed.fingerprint == device_fp
    assert parsed.device_id == identity.device_id
    assert parsed.supernode_public_key == ce.supernode_public_openssh(key)


def _tampered(request: dict[str, Any], how: str, tmp_path: Path) -> dict[str, Any]:
    bad = copy.deepcopy(request)
    other = make_request(tmp_path / "other")
    if how == "device_id":
        bad["device_id"] = other["device_id"]
    elif how == "signing_key":  # someone else's signing key + matching id, our proofs
        bad["signing_public_key_pem"] = other["signing_public_key_pem"]
        bad["device_id"] = other["device_id"]
    elif how == "supernode_key":  # swap in an attacker's SuperNode key
        bad["supernode_public_key"] = other["supernode_public_key"]
    elif how == "created":
        bad["created"] = "2020-01-01T00:00:00Z"
    elif how == "proof_missing":
        del bad["proof"]
    elif how == "proof_swapped":
        bad["proof"] = other["proof"]
    elif how == "extra_field":
        bad["hostname"] = "x"
    elif how == "format":
        bad["format"] = "keystay-enrollment/9"
    return bad


@pytest.mark.parametrize("how", ["device_id", "signing_key", "supernode_key", "created",
                                 "proof_missing", "proof_swapped", "extra_field", "format"])
def test_any_change_to_a_request_is_refused(request_dict: dict[str, Any], how: str,
                                            tmp_path: Path) -> None:
    se.EnrollmentRequest.parse(request_dict)  # the untouched one is fine
    with pytest.raises(se.EnrollmentError):
        se.EnrollmentRequest.parse(_tampered(request_dict, how, tmp_path))


def test_a_non_nist_supernode_key_is_refused() -> None:
    ssh_ed25519 = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    with pytest.raises(se.EnrollmentError, match="NIST"):
        se.load_supernode_public_key(ssh_ed25519)
    ssh_rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    with pytest.raises(se.EnrollmentError, match="NIST"):
        se.load_supernode_public_key(ssh_rsa.public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode())
    with pytest.raises(se.EnrollmentError, match="not an OpenSSH public key"):
        se.load_supernode_public_key("ecdsa-sha2-nistp384 AAAAnotbase64")
    p256 = ec.generate_private_key(ec.SECP256R1()).public_key()
    se.load_supernode_public_key(p256.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode())


def test_v1_request_parses_without_supernode_key(tmp_path: Path) -> None:
    identity = DeviceIdentity.open(tmp_path)
    parsed = se.EnrollmentRequest.parse({"format": se.FORMAT_V1,
                                         "device_id": identity.device_id,
                                         "signing_public_key_pem": identity.public_key_pem()})
    assert parsed.supernode_public_key is None


# --------------------------------------------------------------------------- enroll / revoke


class FakeControl:
    """Stands in for the SuperLink's Control API (the e2e tests use the real one)."""

    nodes_by_id: ClassVar[dict[int, dict[str, Any]]] = {}
    calls: ClassVar[list[tuple[str, Any]]] = []
    down = False

    def __init__(self, server_dir: Path, config: ServerConfig, timeout: float = 0) -> None:
        pass

    def _check(self) -> None:
        if FakeControl.down:
            raise se.SuperLinkUnavailableError("SuperLink down (test)")

    def register(self, public_key_file: Path, name: str) -> int:
        self._check()
        node_id = 1000 + len(FakeControl.nodes_by_id)
        FakeControl.nodes_by_id[node_id] = {"status": "registered",
                                            "key": public_key_file.read_text()}
        FakeControl.calls.append(("register", name))
        return node_id

    def unregister(self, node_id: int) -> None:
        self._check()
        FakeControl.nodes_by_id[node_id]["status"] = "unregistered"
        FakeControl.calls.append(("unregister", node_id))

    def nodes(self) -> dict[int, dict[str, Any]]:
        self._check()
        return FakeControl.nodes_by_id


@pytest.fixture
def srv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    server_dir = tmp_path / "srv"
    server_dir.mkdir()
    ServerConfig().save(server_dir)
    FakeControl.nodes_by_id = {}
    FakeControl.calls = []
    FakeControl.down = False
    monkeypatch.setattr(se, "FlwrControl", FakeControl)
    return server_dir


def _ledger_device(server_dir: Path, device_id: str) -> Any:
    with ServerLedger.open(server_dir) as ledger:
        return ledger.device(device_id)


def test_enroll_registers_the_node_and_trusts_the_signing_key(srv: Path, tmp_path: Path) -> None:
    request = se.EnrollmentRequest.parse(make_request(tmp_path / "d"))
    outcome = se.enroll(srv, request, name="laptop-1", expect_fingerprint=request.fingerprint)
    assert not outcome.already
    assert outcome.entry.node_id in FakeControl.nodes_by_id
    assert FakeControl.nodes_by_id[outcome.entry.node_id]["key"].strip() \
        == request.supernode_public_key
    device = _ledger_device(srv, request.device_id)
    assert device is not None and device.name == "laptop-1"
    # Again: nothing new is registered.
    again = se.enroll(srv, request, name="laptop-1")
    assert again.already
    assert [c for c in FakeControl.calls if c[0] == "register"] == [("register", "laptop-1")]


def test_fingerprint_mismatch_enrolls_nothing(srv: Path, tmp_path: Path) -> None:
    request = se.EnrollmentRequest.parse(make_request(tmp_path / "d"))
    with pytest.raises(se.EnrollmentError, match="fingerprint mismatch"):
        se.enroll(srv, request, expect_fingerprint="0000-0000-0000-0000-0000")
    assert not FakeControl.calls
    assert _ledger_device(srv, request.device_id) is None
    assert se.Registry.open(srv).all() == []


def test_v1_request_is_refused_by_a_server_that_authenticates_nodes(srv: Path,
                                                                    tmp_path: Path) -> None:
    identity = DeviceIdentity.open(tmp_path / "d")
    request = se.EnrollmentRequest.parse({"format": se.FORMAT_V1,
                                          "device_id": identity.device_id,
                                          "signing_public_key_pem": identity.public_key_pem()})
    with pytest.raises(se.EnrollmentError, match="no SuperNode key"):
        se.enroll(srv, request)
    assert _ledger_device(srv, identity.device_id) is None


def test_v1_request_is_recorded_by_an_insecure_server(srv: Path, tmp_path: Path) -> None:
    ServerConfig(insecure=True, supernode_auth=False).save(srv)
    identity = DeviceIdentity.open(tmp_path / "d")
    request = se.EnrollmentRequest.parse({"format": se.FORMAT_V1,
                                          "device_id": identity.device_id,
                                          "signing_public_key_pem": identity.public_key_pem()})
    outcome = se.enroll(srv, request)
    assert outcome.entry.node_id is None
    assert _ledger_device(srv, identity.device_id) is not None


def test_a_changed_supernode_key_needs_a_revocation_first(srv: Path, tmp_path: Path) -> None:
    folder = tmp_path / "d"
    se.enroll(srv, se.EnrollmentRequest.parse(make_request(folder)))
    ce.load_or_create_supernode_key(folder, new=True)
    with pytest.raises(se.EnrollmentError, match="revoke it first"):
        se.enroll(srv, se.EnrollmentRequest.parse(make_request(folder)))


def test_revoke_unregisters_and_is_never_undone(srv: Path, tmp_path: Path) -> None:
    folder = tmp_path / "d"
    request = se.EnrollmentRequest.parse(make_request(folder))
    node_id = se.enroll(srv, request, name="laptop-1").entry.node_id
    FakeControl.nodes_by_id[node_id]["status"] = "online"
    outcome = se.revoke(srv, "laptop-1")  # by name
    assert outcome.unregistered and outcome.entry.revoked
    assert FakeControl.nodes_by_id[node_id]["status"] == "unregistered"
    assert _ledger_device(srv, request.device_id).revoked
    # Revoking again changes nothing and asks the SuperLink nothing new.
    se.revoke(srv, request.device_id)
    assert [c for c in FakeControl.calls if c[0] == "unregister"] == [("unregister", node_id)]
    # The same device, even with a fresh SuperNode key, is not admitted again.
    ce.load_or_create_supernode_key(folder, new=True)
    with pytest.raises(se.EnrollmentError, match="never admitted again"):
        se.enroll(srv, se.EnrollmentRequest.parse(make_request(folder)))


def test_revoke_while_the_superlink_is_down_can_be_finished_later(srv: Path,
                                                                  tmp_path: Path) -> None:
    request = se.EnrollmentRequest.parse(make_request(tmp_path / "d"))
    node_id = se.enroll(srv, request).entry.node_id
    FakeControl.down = True
    with pytest.raises(se.SuperLinkUnavailableError):
        se.revoke(srv, request.device_id)
    # Reports stop counting at once even though the SuperLink was not told.
    assert _ledger_device(srv, request.device_id).revoked
    rows, problem = se.device_states(srv)
    assert problem and rows[0].status == "revoked"
    FakeControl.down = False
    rows, _ = se.device_states(srv)
    assert rows[0].status == "revoked-but-registered"  # loud: the SuperLink still admits it
    se.revoke(srv, request.device_id)
    assert FakeControl.nodes_by_id[node_id]["status"] == "unregistered"
    rows, _ = se.device_states(srv)
    assert rows[0].status == "revoked"


def test_enroll_with_the_superlink_down_admits_nothing(srv: Path, tmp_path: Path) -> None:
    request = se.EnrollmentRequest.parse(make_request(tmp_path / "d"))
    FakeControl.down = True
    with pytest.raises(se.SuperLinkUnavailableError):
        se.enroll(srv, request)
    assert se.Registry.open(srv).all() == []
    FakeControl.down = False
    assert not se.enroll(srv, request).already  # running it again finishes


def test_find_by_node_id_and_unknown(srv: Path, tmp_path: Path) -> None:
    entry = se.enroll(srv, se.EnrollmentRequest.parse(make_request(tmp_path / "d"))).entry
    registry = se.Registry.open(srv)
    assert se.find(registry, str(entry.node_id)).device_id == entry.device_id
    with pytest.raises(se.EnrollmentError, match="no enrolled device"):
        se.find(registry, "nobody")


def test_flwr_json_output_is_found_after_progress_lines() -> None:
    text = '📄 Listing all nodes...\n{\n  "success": true,\n  "nodes": []\n}\n'
    assert se._last_json(text) == {"success": True, "nodes": []}
    assert se._last_json("no json here") is None
