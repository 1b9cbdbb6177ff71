r"""User-level central DP for federated averaging (DP-FedAvg), and its accountant.

This is an *option on top of* the device-side DP-SGD: each device already
clips and noises its own training (record-level DP within an employee-day
block, enforced by the device). Central DP adds a second, user-level
guarantee for the released global model: what it reveals about whether any
one device took part in a round, whatever that device's data.

The mechanism (McMahan, Ramage, Talwar, Zhang 2018, "Learning Differentially
Private Recurrent Language Models", ICLR, Algorithm 1 with the fixed-denominator
estimator) for one round with global weights :math:`\theta` and replies
:math:`\theta_k` from the devices the round was sent to:

.. math::

    \Delta_k &= \theta_k - \theta
        \qquad\text{(the device's update)}\\
    \tilde\Delta_k &= \Delta_k \cdot \min\left(1, S / \lVert\Delta_k\rVert_2\right)
        \qquad\text{(clip to L2 norm } S\text{)}\\
    \theta' &= \theta + \frac{1}{n}\sum_k \tilde\Delta_k + \mathcal N(0, \sigma^2 I),
        \qquad \sigma = z S / n

where ``n`` is the number of devices the round was *sent to* (a fixed,
public number; a device that refused or failed contributes nothing but still
counts in the denominator), ``S`` the clip norm and ``z`` the noise
multiplier. Every device weighs 1, so adding or removing one device changes
the sum :math:`\sum_k \tilde\Delta_k` by exactly one clipped update, at most
``S`` in L2 norm: the sum plus :math:`\mathcal N(0, z^2S^2 I)` is the
Gaussian mechanism with noise multiplier ``z``; dividing by the public ``n``
is post-processing. Weighting by example counts (plain FedAvg) would let one
device's weight, and so its influence and the sensitivity, grow with its
data; and the server has no example counts to weight by (devices send the
public constant 1, since a real count is an unpaid statistic of their data).

Accounting. One round is one Gaussian mechanism: RDP
:math:`\varepsilon_\alpha = \alpha / (2 z^2)` (Mironov 2017, "Rényi
Differential Privacy", Prop. 7); ``T`` rounds compose additively. With
Poisson sampling of devices at rate ``q < 1`` the round is the sampled
Gaussian mechanism (Mironov, Talwar, Zhang 2019, "Rényi Differential Privacy
of the Sampled Gaussian Mechanism"); the RDP curve is turned into
:math:`(\varepsilon, \delta)` with Balle et al. 2020 ("Hypothesis Testing
Interpretations and Rényi Differential Privacy", Thm. 21). Both formulas come
from ``opacus.accountants.analysis.rdp`` (imported lazily: the ServerApp
process only pays for torch when central DP is on).

Sampling, honestly:

* keystay's ServerApp runs Flower's FedAvg with ``fraction_train=1.0``: every
  connected device gets every round. Then ``q = 1`` and there is **no
  amplification by sampling** (:data:`SAMPLING_ALL`).
* With ``fraction_train < 1`` Flower draws a *fixed-size* subset uniformly
  without replacement. That is not Poisson sampling, so the Poisson
  amplification bound does not apply to it; keystay accounts it as ``q = 1``
  (a valid, conservative bound: a device that is sampled gets exactly the
  Gaussian mechanism above, one that is not spends nothing)
  (:data:`SAMPLING_FIXED_SIZE`). Tighter bounds for sampling without
  replacement exist (Wang, Balle, Kasiviswanathan 2019, under the replace-one
  relation) but are not implemented here.

Why not Flower's ``DifferentialPrivacyServerSideFixedClipping``: it draws
noise from numpy's global generator (no generator can be passed in), divides
the noise by the configured number of clients while FedAvg divides the sum
by the replies actually aggregated, weighted by example counts unless its own
accountant is on; and keystay needs its own accountant. The maths here is
the same (clip the update to ``S``, noise std ``z S / n``), with the
denominator fixed and the generator explicit.

Limitations: noise comes from numpy's PCG64 generator seeded from OS entropy,
not a cryptographic source, and floating-point Gaussian sampling has known
precision attacks (Mironov 2012); treat the central ε as the mechanism's
guarantee under an idealised sampler. Never seed the noise generator from a
value others know (such as a run-config seed): whoever knows the seed can
regenerate the noise and subtract it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from keystay.common.errors import KeystayError
from keystay.common.exitcodes import ExitCode
from keystay.common.flatclip import clip_update

SAMPLING_ALL = "all"
SAMPLING_FIXED_SIZE = "fixed-size"

#: What the ledger and the security report say about each sampling mode.
SAMPLING_DESCRIPTIONS: dict[str, str] = {
    SAMPLING_ALL: "all devices every round, no amplification",
    SAMPLING_FIXED_SIZE: (
        "fixed-size uniform subset without replacement (not Poisson); "
        "accounted as q=1, no amplification"
    ),
}

#: RDP orders: opacus' defaults extended upwards, so that a large noise
#: multiplier over few rounds (optimal order > 63) still gets a tight bound.
RDP_ORDERS: tuple[float, ...] = (
    tuple(1 + x / 10.0 for x in range(1, 100))
    + tuple(float(a) for a in range(12, 64))
    + (64.0, 80.0, 96.0, 128.0, 192.0, 256.0, 512.0, 1024.0)
)


class CentralDPError(KeystayError, ValueError):
    """A central-DP parameter or input is outside what the mechanism supports."""

    exit_code = ExitCode.SERVER_CONFIG


def central_epsilon(
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    orders: Sequence[float] = RDP_ORDERS,
) -> float:
    r"""ε after ``steps`` rounds of the (sub)sampled Gaussian mechanism.

    Pure function: RDP of the sampled Gaussian mechanism composed over
    ``steps`` rounds (Mironov et al. 2019; for ``sample_rate == 1`` the plain
    Gaussian, :math:`T\alpha/(2z^2)`), converted to (ε, δ) with Balle et al.
    2020, Thm. 21, minimised over ``orders``.

    Parameters
    ----------
    noise_multiplier : float
        ``z``: noise std divided by the L2 sensitivity (the clip norm).
    sample_rate : float
        ``q`` in (0, 1]: the *Poisson* rate at which devices take part. Use
        1.0 for any other sampling (see the module docstring).
    steps : int
        Rounds released so far (>= 0).
    delta : float
        Target δ in (0, 1).
    orders : sequence of float
        RDP orders to minimise over.

    Returns
    -------
    float
        ε; ``0.0`` for no rounds, ``inf`` when ``noise_multiplier == 0``.

    Examples
    --------
    A single round at z = 1, q = 1, δ = 1e-5:

    >>> round(central_epsilon(noise_multiplier=1.0, sample_rate=1.0, steps=1, delta=1e-5), 3)
    4.729
    """
    _check_accounting(noise_multiplier, sample_rate, delta)
    if steps < 0:
        raise CentralDPError(f"steps must be >= 0, got {steps}")
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    # Lazy: opacus pulls in torch, which the ledger and report tools never need.
    from opacus.accountants.analysis import rdp as rdp_analysis

    rdp = rdp_analysis.compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=steps, orders=list(orders)
    )
    with warnings.catch_warnings():
        # opacus warns when the optimum sits at the edge of the order grid;
        # every order still gives a valid upper bound, so the value stands.
        warnings.simplefilter("ignore")
        epsilon, _ = rdp_analysis.get_privacy_spent(orders=list(orders), rdp=rdp, delta=delta)
    return float(epsilon)


def _check_accounting(noise_multiplier: float, sample_rate: float, delta: float) -> None:
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise CentralDPError(
            f"central noise multiplier must be a finite number >= 0, got {noise_multiplier!r}"
        )
    if not (0 < sample_rate <= 1):
        raise CentralDPError(
            f"central sample rate must be in (0, 1], got {sample_rate!r}; use 1.0 unless "
            "devices are Poisson-sampled"
        )
    if not (0 < delta < 1):
        raise CentralDPError(f"central delta must be in (0, 1), got {delta!r}")


class CentralDPAccountant:
    """Running ε of central DP over the rounds of one run (thin state over maths).

    Parameters
    ----------
    noise_multiplier : float
        ``z`` of every round (> 0 for a finite ε).
    sample_rate : float
        Poisson rate ``q`` at which devices take part. keystay samples all
        devices every round, so this is 1.0 (no amplification); fixed-size
        sampling without replacement is also accounted as 1.0.
    delta : float
        δ at which ε is reported. For user-level DP choose δ well below
        1 / number of devices.

    Examples
    --------
    >>> acc = CentralDPAccountant(noise_multiplier=1.0, sample_rate=1.0, delta=1e-5)
    >>> acc.step(); acc.step()
    >>> acc.steps
    2
    """

    def __init__(self, noise_multiplier: float, sample_rate: float = 1.0, delta: float = 1e-5):
        _check_accounting(noise_multiplier, sample_rate, delta)
        self.noise_multiplier = float(noise_multiplier)
        self.sample_rate = float(sample_rate)
        self.delta = float(delta)
        self.steps = 0

    def step(self, rounds: int = 1) -> None:
        """Record ``rounds`` released aggregates (call once per noised round)."""
        if rounds < 1:
            raise CentralDPError(f"rounds must be >= 1, got {rounds}")
        self.steps += rounds

    def epsilon(self, delta: float | None = None) -> float:
        """ε spent so far at ``delta`` (default: the accountant's δ)."""
        return central_epsilon(
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            steps=self.steps,
            delta=self.delta if delta is None else delta,
        )

    def state_dict(self) -> dict[str, float | int]:
        """What to persist to resume accounting after a restart."""
        return {
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "delta": self.delta,
            "steps": self.steps,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, float | int]) -> CentralDPAccountant:
        """Rebuild an accountant saved with :meth:`state_dict`."""
        acc = cls(
            noise_multiplier=float(state["noise_multiplier"]),
            sample_rate=float(state["sample_rate"]),
            delta=float(state["delta"]),
        )
        acc.steps = int(state["steps"])
        return acc


@dataclass(frozen=True)
class CentralDP:
    """The parameters of user-level DP-FedAvg, checked once.

    Parameters
    ----------
    clip_norm : float
        ``S``: L2 bound on each device's update (> 0).
    noise_multiplier : float
        ``z``: noise std on the sum divided by ``S`` (>= 0; 0 means no
        central privacy and an infinite ε, allowed for comparisons only).
    num_sampled : int
        ``n``: devices each round is sent to; the fixed denominator.
    sampling : str
        :data:`SAMPLING_ALL` (Flower ``fraction_train=1.0``) or
        :data:`SAMPLING_FIXED_SIZE` (``fraction_train < 1``). Both are
        accounted with ``q = 1``.
    delta : float
        δ for the accountant.
    """

    clip_norm: float
    noise_multiplier: float
    num_sampled: int
    sampling: str = SAMPLING_ALL
    delta: float = 1e-5

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise CentralDPError(f"central clip norm must be a number > 0, got {self.clip_norm!r}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise CentralDPError(
                f"central noise multiplier must be a number >= 0, got {self.noise_multiplier!r}"
            )
        if isinstance(self.num_sampled, bool) or not isinstance(self.num_sampled, int) or (
            self.num_sampled < 1
        ):
            raise CentralDPError(
                f"devices sampled per round must be an integer >= 1, got {self.num_sampled!r}"
            )
        if self.sampling not in SAMPLING_DESCRIPTIONS:
            raise CentralDPError(
                f"unknown sampling {self.sampling!r}; use one of "
                f"{', '.join(sorted(SAMPLING_DESCRIPTIONS))} (Poisson sampling of devices "
                "is not what Flower does, so keystay does not offer its amplification)"
            )
        if not (0 < self.delta < 1):
            raise CentralDPError(f"central delta must be in (0, 1), got {self.delta!r}")

    @property
    def sample_rate(self) -> float:
        """The ``q`` used for accounting: always 1.0 (no amplification claimed)."""
        return 1.0

    @property
    def sampling_description(self) -> str:
        """The sentence the ledger and security report carry."""
        return SAMPLING_DESCRIPTIONS[self.sampling]

    @property
    def noise_std(self) -> float:
        """Std of the Gaussian noise added to the *mean* update: ``z * S / n``."""
        return self.noise_multiplier * self.clip_norm / self.num_sampled

    def accountant(self) -> CentralDPAccountant:
        """A fresh accountant for a run with these parameters."""
        return CentralDPAccountant(self.noise_multiplier, self.sample_rate, self.delta)

    def aggregate(
        self,
        global_arrays: Sequence[np.ndarray],
        replies: Sequence[Sequence[np.ndarray]],
        rng: np.random.Generator,
    ) -> list[np.ndarray]:
        """New global weights from the replies of one round (see module docstring).

        Every device weighs 1.

        Parameters
        ----------
        global_arrays : sequence of numpy.ndarray
            The global weights the round was sent with.
        replies : sequence of sequence of numpy.ndarray
            Each device's returned weights (same shapes, same order).
        rng : numpy.random.Generator
            Source of the noise.

        Returns
        -------
        list of numpy.ndarray
            ``global + (sum of clipped updates) / n + noise``, in each
            global array's dtype.

        Raises
        ------
        CentralDPError
            No replies, more replies than ``num_sampled``, or mismatched shapes.
        """
        if not replies:
            raise CentralDPError("no device updates to aggregate this round")
        if len(replies) > self.num_sampled:
            raise CentralDPError(
                f"{len(replies)} device updates but the round was sent to {self.num_sampled}; "
                "num_sampled must count every device the round was sent to"
            )
        total = [np.zeros(np.shape(g), dtype=np.float64) for g in global_arrays]
        for index, reply in enumerate(replies):
            if len(reply) != len(global_arrays):
                raise CentralDPError(
                    f"device update {index} has {len(reply)} arrays, the model has "
                    f"{len(global_arrays)}"
                )
            update = []
            for g, r in zip(global_arrays, reply, strict=True):
                if np.shape(g) != np.shape(r):
                    raise CentralDPError(
                        f"device update {index} has an array of shape {np.shape(r)} where the "
                        f"model has {np.shape(g)}"
                    )
                update.append(np.asarray(r, dtype=np.float64) - np.asarray(g, dtype=np.float64))
            clipped, _ = clip_update(update, self.clip_norm)
            for acc, u in zip(total, clipped, strict=True):
                acc += u
        std = self.noise_std
        new: list[np.ndarray] = []
        for g, acc in zip(global_arrays, total, strict=True):
            mean = acc / self.num_sampled
            if std > 0:
                mean = mean + rng.normal(0.0, std, size=mean.shape)
            base = np.asarray(g)
            new.append((base.astype(np.float64) + mean).astype(base.dtype))
        return new


def aggregate_with_central_dp(
    global_arrays: Sequence[np.ndarray],
    replies: Sequence[Sequence[np.ndarray]],
    rng: np.random.Generator,
    *,
    clip_norm: float,
    noise_multiplier: float,
    num_sampled: int | None = None,
) -> list[np.ndarray]:
    """One round of user-level DP-FedAvg for a Flower strategy's ``aggregate_train``.

    Parameters
    ----------
    global_arrays : sequence of numpy.ndarray
        The global weights sent this round (``configure_train``'s arrays).
    replies : sequence of sequence of numpy.ndarray
        The weights each accepted device returned; each weighs 1 (see the
        module docstring for why).
    rng : numpy.random.Generator
        Noise source; ``numpy.random.default_rng()`` (OS entropy) in production.
    clip_norm : float
        ``S``.
    noise_multiplier : float
        ``z``.
    num_sampled : int or None
        Devices the round was *sent to*, the fixed denominator ``n``. Pass it:
        with None the number of replies is used, which makes the denominator
        depend on which devices answered, outside the add/remove-one-device
        analysis.

    Returns
    -------
    list of numpy.ndarray
        The new global weights.
    """
    if not replies:
        raise CentralDPError("no device updates to aggregate this round")
    mechanism = CentralDP(
        clip_norm=clip_norm,
        noise_multiplier=noise_multiplier,
        num_sampled=len(replies) if num_sampled is None else num_sampled,
    )
    return mechanism.aggregate(global_arrays, replies, rng)
