"""SecAgg+ inside the daemon: the device's side of Flower's protocol, behind the socket.

Flower's SecAgg+ (1.39) runs its device side in ``secaggplus_mod``, inside the
ClientApp: server-shipped code that would then hold the masking keys, the key
shares of its neighbours and the update before it is masked. Here the daemon
runs every stage itself; the ClientApp relays each stage's ConfigRecord
(``Federation.SecAggStage``) and sends back what the daemon answers. What
crosses the federation socket is what Flower would send the server anyway:
public keys, shares encrypted to neighbours, the masked vector, and the key
shares the unmasking needs.

One :class:`SecAggStages` holds a Flower ``SecAggPlusState`` per
(run id, round, SuperNode node id), in memory only: the keys never touch the
disk (a daemon restarted mid-round has forgotten them and refuses the rest
of that round, which Flower treats as a dropout). Sessions expire after
:data:`SESSION_TTL_S` and at most :data:`MAX_SESSIONS` are kept.

Reused from Flower, pinned to 1.39 by ``pyproject.toml`` (a unit test runs
the stages against Flower's unchanged ``SecAggPlusWorkflow``): the state
class, ``check_configs`` and the private stage functions ``_setup``,
``_share_keys`` and ``_unmask`` of ``flwr.client.mod.secure_aggregation.
secaggplus_mod``. The masking stage is this module's own: Flower's
``_collect_masked_vectors`` quantises with ``np.random`` (the process-global
generator) and clips every coordinate, which the employee-day mechanism must
not do. :class:`Masking` takes the integer vector the mechanism encoded
(:func:`keystay.client.employee_day.mechanism.encode`, noise included) and
adds Flower's weight factor, the private mask and the pairwise masks exactly
as Flower does, so the server's unchanged workflow decodes the mean:

* weight 1 and ``max_weight`` 1, so the factor is ``q = target_range`` and
  the server divides the decoded sum by the number of devices summed;
* the encoded value is ``round(γ (U + c)) + noise`` with ``γ = R / (2c)``
  (``R`` the quantisation range, ``c`` the clipping range), which Flower's
  ``dequantize`` and its offset ``-(n - 1) c`` turn back into ``Σ U + noise/γ``.

What the daemon refuses, before anything is charged (``Refusal``; the
federation gets only the code, the refusal log the sentence):

* **setup** whose ``sample_num``, ``share_num`` or ``threshold`` is below the
  policy's ``min_summed_devices`` t, whose threshold is not above half of
  ``share_num`` (then a server could collect both of a device's secrets),
  with fewer than 3 shares, or with a weight other than 1;
* **masking** with key shares from fewer than t − 1 neighbours (the sum
  could then be unmasked with fewer than t devices in it);
* **unmask** with fewer than t devices reported alive, a device reported both
  alive and dropped, this device reported dropped (it sent its vector), or a
  device that is not a neighbour;
* any stage **out of order**: every session runs setup, share keys, masking,
  unmask once each; a second setup after the masked vector left is refused
  (it would ask for a second masking of the same round).

What this does not stop: a server (or a ClientApp posing as one) that plays
every neighbour itself, with keys it made, can unmask this device's vector:
Flower's SecAgg+ has no authenticated neighbour keys and no consistency
round. The vector it would unmask carries the device's own discrete Gaussian
noise, ``σC/√t``: that is the ε the ledger charges "against a server that
breaks secure aggregation", and it holds here too.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import numpy as np
from flwr.app import ConfigRecord
from flwr.app.typing import ConfigRecordValues
from flwr.client.mod.secure_aggregation.secaggplus_mod import (
    SecAggPlusState,
    _setup,
    _share_keys,
    _unmask,
    check_configs,
)
from flwr.common import ndarray_to_bytes
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    decrypt,
    generate_shared_key,
)
from flwr.common.secure_aggregation.ndarrays_arithmetic import factor_combine
from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import (
    pseudo_rand_gen,
    share_keys_plaintext_separate,
)
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from keystay.client.policy import Refusal

__all__ = [
    "MAX_SESSIONS",
    "MIN_SHARES",
    "SESSION_TTL_S",
    "Masking",
    "SecAggStages",
    "SessionKey",
]

#: Fewest key shares the device accepts; Flower itself needs more than 2.
MIN_SHARES = 3
#: Seconds a session is kept after its last stage (a round's four stages come
#: within a few round timeouts of each other).
SESSION_TTL_S = 3 * 3600.0
#: Most sessions held at once: a hostile caller opening setups cannot grow
#: the daemon's memory without bound (the oldest is forgotten first).
MAX_SESSIONS = 32

#: The stage each stage must follow (setup follows none, or a finished round).
_AFTER = {
    Stage.SHARE_KEYS: Stage.SETUP,
    Stage.COLLECT_MASKED_VECTORS: Stage.SHARE_KEYS,
    Stage.UNMASK: Stage.COLLECT_MASKED_VECTORS,
}


@dataclass(frozen=True)
class SessionKey:
    """One device's part in one round: the SuperNode's node id in a run's round."""

    run_id: str
    server_round: int
    node_id: int


@dataclass
class _Session:
    state: SecAggPlusState
    touched: float
    masked: bool = False
    neighbours: list[int] = field(default_factory=list)


def _protocol(reason: str) -> Refusal:
    return Refusal("secagg-protocol", reason)


def _below(reason: str) -> Refusal:
    return Refusal("secagg-below-threshold", reason)


class Masking:
    """The masking stage, opened: the encoding to use and the masks to add.

    Returned by :meth:`SecAggStages.open_masking` once the neighbours' key
    shares are decrypted and counted, before anything is charged. The daemon
    core encodes the round (:attr:`clipping_range`, :attr:`quantization_range`,
    :attr:`min_summed`) and calls :meth:`mask` once.
    """

    def __init__(self, session: _Session, min_summed: int) -> None:
        self._session = session
        self.min_summed = min_summed

    @property
    def clipping_range(self) -> float:
        """``c``: the encoded value is offset by ``c`` (Flower's dequantisation)."""
        return float(self._session.state.clipping_range)

    @property
    def quantization_range(self) -> int:
        """``R``: Flower's ``target_range``; the scale is ``γ = R / (2c)``."""
        return int(self._session.state.target_range)

    @property
    def devices(self) -> int:
        """How many devices the setup sampled (the most whose noise can be summed)."""
        return int(self._session.state.sample_num)

    def mask(self, encoded: list[np.ndarray]) -> list[np.ndarray]:
        """Add Flower's weight factor, the private mask and the pairwise masks.

        Parameters
        ----------
        encoded : list of numpy.ndarray
            Integer arrays, the value before masks
            (``round(γ (U + c)) + noise``).

        Returns
        -------
        list of numpy.ndarray
            The masked vector mod ``mod_range`` (int64), factor first, as
            Flower's server workflow sums it.

        Raises
        ------
        Refusal
            ``secagg-protocol`` when called twice for one session.
        """
        session = self._session
        if session.masked:
            raise _protocol("refused: this round's masked vector was already sent")
        state = session.state
        vector: list[np.ndarray] = factor_combine(
            state.target_range,  # q_ratio for weight 1 / max_weight 1
            [np.asarray(a, dtype=np.int64) for a in encoded],
        )
        vector = [np.asarray(a, dtype=np.int64) for a in vector]
        shapes = [a.shape for a in vector]
        for i, m in enumerate(pseudo_rand_gen(state.rd_seed, state.mod_range, shapes)):
            vector[i] = vector[i] + m
        for node in session.neighbours:
            shared = generate_shared_key(
                bytes_to_private_key(state.sk1),
                bytes_to_public_key(state.public_keys_dict[node][0]),
            )
            masks = pseudo_rand_gen(shared, state.mod_range, shapes)
            sign = 1 if state.nid > node else -1
            for i, m in enumerate(masks):
                vector[i] = vector[i] + sign * m
        session.masked = True
        return [np.mod(a, state.mod_range).astype(np.int64) for a in vector]


class SecAggStages:
    """The daemon's SecAgg+ sessions and their stages (see the module docstring).

    Parameters
    ----------
    min_summed : int
        The policy's ``min_summed_devices`` t: no sum of fewer devices may be
        unmaskable.
    clock : callable
        Monotonic seconds (tests pass a fake).
    """

    def __init__(self, min_summed: int, clock: Callable[[], float] = time.monotonic) -> None:
        if min_summed < 1:
            raise ValueError(f"min_summed must be at least 1, got {min_summed}")
        self.min_summed = min_summed
        self._clock = clock
        self._sessions: dict[SessionKey, _Session] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sessions)

    # -- the stages -------------------------------------------------------------

    def stage_of(self, configs: ConfigRecord) -> str:
        """The stage ``configs`` asks for; ``secagg-protocol`` if none or unknown."""
        stage = configs.get(Key.STAGE)
        if stage not in Stage.all():
            raise _protocol(f"refused: unknown SecAgg+ stage {stage!r}")
        return str(stage)

    def setup(self, key: SessionKey, configs: ConfigRecord) -> dict[str, ConfigRecordValues]:
        """Stage 0: check the parameters against the policy, make two key pairs."""
        body = self._body(configs, Stage.SETUP)
        self._check_setup(body)
        with self._lock:
            self._expire()
            old = self._sessions.get(key)
            if old is not None and old.masked:
                raise _protocol(
                    "refused: SecAgg+ setup for a round whose masked vector was already sent"
                )
            state = SecAggPlusState()
            state.nid = key.node_id
            result = _setup(state, body)
            state.current_stage = Stage.SETUP
            self._sessions[key] = _Session(state=state, touched=self._clock())
            while len(self._sessions) > MAX_SESSIONS:
                oldest = min(self._sessions, key=lambda k: self._sessions[k].touched)
                del self._sessions[oldest]
            return result

    def share_keys(
        self, key: SessionKey, configs: ConfigRecord
    ) -> dict[str, ConfigRecordValues]:
        """Stage 1: split the mask seed and key into shares for the neighbours."""
        body = self._body(configs, Stage.SHARE_KEYS)
        with self._lock:
            session = self._next(key, Stage.SHARE_KEYS)
            if len(body) < self.min_summed:
                raise _below(
                    f"refused: SecAgg+ names {len(body)} neighbours (this device included); "
                    f"the policy's min_summed_devices is {self.min_summed}"
                )
            try:
                result = _share_keys(session.state, body)
            except (ValueError, KeyError) as error:
                raise _protocol(f"refused: SecAgg+ share-keys stage: {error}") from None
            session.state.current_stage = Stage.SHARE_KEYS
            return result

    def open_masking(self, key: SessionKey, configs: ConfigRecord) -> Masking:
        """Stage 2, first half: decrypt and count the neighbours' key shares.

        Nothing is charged yet; the core charges, trains and encodes, then
        calls :meth:`Masking.mask`.
        """
        body = self._body(configs, Stage.COLLECT_MASKED_VECTORS)
        with self._lock:
            session = self._next(key, Stage.COLLECT_MASKED_VECTORS)
            state = session.state
            sources = cast(list[int], body[Key.SOURCE_LIST])
            ciphertexts = cast(list[bytes], body[Key.CIPHERTEXT_LIST])
            if len(sources) != len(ciphertexts):
                raise _protocol("refused: SecAgg+ masking stage with unmatched share lists")
            if len(set(sources)) != len(sources) or state.nid in sources:
                raise _protocol("refused: SecAgg+ masking stage repeats a neighbour")
            # The setup's threshold is at least t (checked there).
            need = max(self.min_summed, state.threshold)
            if len(sources) + 1 < need:
                raise _below(
                    f"refused: SecAgg+ masking with key shares from {len(sources)} "
                    f"neighbour(s); with min_summed_devices {self.min_summed} and threshold "
                    f"{state.threshold} it needs at least {need - 1}"
                )
            rd_shares: dict[int, bytes] = {}
            sk_shares: dict[int, bytes] = {}
            for src, ciphertext in zip(sources, ciphertexts, strict=True):
                if src not in state.ss2_dict:
                    raise _protocol(f"refused: SecAgg+ share from {src}, not a neighbour")
                try:
                    plaintext = decrypt(state.ss2_dict[src], ciphertext)
                except Exception:
                    raise _protocol(
                        f"refused: SecAgg+ share from {src} does not decrypt"
                    ) from None
                actual, dst, rd_share, sk_share = share_keys_plaintext_separate(plaintext)
                if actual != src or dst != state.nid:
                    raise _protocol(f"refused: SecAgg+ share from {src} is addressed wrongly")
                rd_shares[src], sk_shares[src] = rd_share, sk_share
            state.rd_seed_share_dict.update(rd_shares)
            state.sk1_share_dict.update(sk_shares)
            state.current_stage = Stage.COLLECT_MASKED_VECTORS
            session.neighbours = list(sources)
            return Masking(session, self.min_summed)

    def masked_result(self, vector: list[np.ndarray]) -> dict[str, ConfigRecordValues]:
        """The masking stage's ConfigRecord content for the masked ``vector``."""
        return {Key.MASKED_PARAMETERS: [ndarray_to_bytes(a) for a in vector]}

    def unmask(self, key: SessionKey, configs: ConfigRecord) -> dict[str, ConfigRecordValues]:
        """Stage 3: hand over the key shares that remove the masks from the sum only."""
        body = self._body(configs, Stage.UNMASK)
        with self._lock:
            session = self._next(key, Stage.UNMASK)
            if not session.masked:
                raise _protocol("refused: SecAgg+ unmask before this device sent its vector")
            state = session.state
            active = cast(list[int], body[Key.ACTIVE_NODE_ID_LIST])
            dead = cast(list[int], body[Key.DEAD_NODE_ID_LIST])
            both = set(active) & set(dead)
            if both or len(set(active)) != len(active) or len(set(dead)) != len(dead):
                raise _protocol(
                    f"refused: SecAgg+ unmask names devices twice or both alive and dropped "
                    f"({sorted(both)}); answering would reveal both of their secrets"
                )
            if state.nid in dead or state.nid not in active:
                raise _protocol(
                    "refused: SecAgg+ unmask reports this device as dropped although it sent "
                    "its masked vector"
                )
            known = set(state.public_keys_dict)
            if not set(active) | set(dead) <= known:
                raise _protocol("refused: SecAgg+ unmask names a device that is not a neighbour")
            if len(active) < self.min_summed:
                raise _below(
                    f"refused: SecAgg+ unmask with {len(active)} device(s) alive; the "
                    f"policy's min_summed_devices is {self.min_summed}, so a sum of fewer "
                    "is never unmasked"
                )
            try:
                result = _unmask(state, body)
            except (KeyError, ValueError) as error:
                # e.g. a device reported alive whose shares never reached this one
                raise _protocol(f"refused: SecAgg+ unmask: {error!r}") from None
            # Done: the secrets are of no further use, and must not be asked again.
            del self._sessions[key]
            return result

    # -- sessions kept elsewhere (the simulation) --------------------------------

    def export_session(self, key: SessionKey) -> _Session | None:
        """The session for ``key`` (None if none), removed from this object.

        For :mod:`keystay.sim.federation.device` only: a virtual node's four
        stages may run in different Ray actors, so its session travels in the
        node's Flower context between stages, as Flower's own SecAgg+ mod keeps
        its state. The daemon never calls this: its sessions stay in its memory.
        """
        with self._lock:
            return self._sessions.pop(key, None)

    def import_session(self, key: SessionKey, session: _Session) -> None:
        """Hold ``session`` for ``key`` again (see :meth:`export_session`)."""
        with self._lock:
            session.touched = self._clock()  # another process's monotonic clock
            self._sessions[key] = session

    # -- helpers ----------------------------------------------------------------

    def _body(self, configs: ConfigRecord, stage: str) -> ConfigRecord:
        """``configs`` without its stage key, type-checked as Flower checks it."""
        if configs.get(Key.STAGE) != stage:
            raise _protocol(f"refused: expected a SecAgg+ {stage} message")
        body = ConfigRecord({k: v for k, v in configs.items() if k != Key.STAGE})
        try:
            check_configs(stage, body)
        except (KeyError, TypeError, ValueError) as error:
            raise _protocol(f"refused: malformed SecAgg+ {stage} message: {error}") from None
        return body

    def _check_setup(self, body: ConfigRecord) -> None:
        t = self.min_summed
        sample = cast(int, body[Key.SAMPLE_NUMBER])
        shares = cast(int, body[Key.SHARE_NUMBER])
        threshold = cast(int, body[Key.THRESHOLD])
        if min(sample, shares, threshold) < t:
            raise _below(
                f"refused: SecAgg+ setup with {sample} devices sampled, {shares} shares and "
                f"threshold {threshold}; the policy's min_summed_devices is {t}, and each "
                "must be at least that (set secagg-reconstruction-threshold accordingly)"
            )
        if shares < MIN_SHARES or 2 * threshold <= shares:
            raise _below(
                f"refused: SecAgg+ with {shares} shares and threshold {threshold} would let "
                f"the server rebuild both of a device's secrets; this device needs at least "
                f"{MIN_SHARES} shares and a threshold above half of them"
            )
        if body.get(Key.MAX_WEIGHT) != 1.0:
            raise _protocol(
                f"refused: SecAgg+ max_weight {body.get(Key.MAX_WEIGHT)!r}; this device "
                "sends weight 1 and needs max_weight 1"
            )
        clipping = cast(float, body[Key.CLIPPING_RANGE])
        target = cast(int, body[Key.TARGET_RANGE])
        modulus = cast(int, body[Key.MOD_RANGE])
        if not (clipping > 0 and 0 < target < modulus and modulus.bit_count() == 1
                and modulus <= 2**62):
            raise _protocol(
                f"refused: SecAgg+ ranges clipping {clipping}, quantisation {target}, "
                f"modulus {modulus}: need clipping > 0, 0 < quantisation < modulus, and a "
                "modulus that is a power of 2 up to 2**62"
            )

    def _next(self, key: SessionKey, stage: str) -> _Session:
        """The session for ``key``, which must have just finished the stage before."""
        self._expire()
        session = self._sessions.get(key)
        if session is None:
            raise _protocol(
                f"refused: SecAgg+ {stage} stage without a setup for this round on this device"
            )
        if session.state.current_stage != _AFTER[stage]:
            raise _protocol(
                f"refused: SecAgg+ {stage} stage after {session.state.current_stage}; "
                "stages run once each, in order"
            )
        session.touched = self._clock()
        return session

    def _expire(self) -> None:
        now = self._clock()
        for key in [k for k, s in self._sessions.items() if now - s.touched > SESSION_TTL_S]:
            del self._sessions[key]
