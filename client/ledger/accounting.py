r"""The epsilon maths: pure functions over a history of DP-SGD mechanisms.

A *history* is every Poisson-subsampled Gaussian mechanism that touched a
block of data, in any order (composition is commutative): each
:class:`Mechanism` is ``steps`` applications of DP-SGD's step with sampling
rate ``q`` and noise multiplier ``sigma``. The device ledger stores the
history (and never resets it); these functions turn it into an epsilon at a
given delta. They hold no state, so a test can call them directly.

Two accountants, both backed by Opacus:

RDP (:func:`epsilon_rdp`)
    Renyi DP composes by addition (Mironov 2017, "Renyi Differential
    Privacy", Prop. 1): :math:`\varepsilon_{RDP}(\alpha) = \sum_i T_i\,
    \varepsilon_{q_i,\sigma_i}(\alpha)`, where the RDP of one sampled Gaussian
    step at order :math:`\alpha` is computed exactly for integer orders and by
    the convergent series for fractional ones (Mironov, Talwar, Zhang 2019,
    "Renyi Differential Privacy of the Sampled Gaussian Mechanism", Sec. 3.3).
    Converted to :math:`(\varepsilon, \delta)` with Balle et al. 2020
    ("Hypothesis Testing Interpretations and Renyi DP", Thm. 21):
    :math:`\varepsilon = \min_\alpha \varepsilon_{RDP}(\alpha) + \log((\alpha-1)/\alpha)
    - (\log\delta + \log\alpha)/(\alpha-1)`.
    A valid upper bound, loose by 10-20 % on typical DP-SGD runs.

PRV (:func:`epsilon_prv`)
    The privacy loss random variable of each mechanism is discretised on a
    common mesh, self-composed by FFT and convolved (Gopi, Lee, Wutschitz 2021,
    "Numerical Composition of Differential Privacy", Thm. 5.5 and Alg. 1).
    Gives an estimate and a certified interval ``[lower, upper]`` around the
    true epsilon, with ``upper - lower`` about ``2 * eps_error``.

What the device enforces
    :func:`enforced`: ``min(rdp, prv_upper)``. Both are valid upper bounds on
    the epsilon of the same mechanism at the same delta, so their minimum is
    too; in practice the PRV upper bound wins (it is tight to ``eps_error``),
    and the RDP bound covers the case where the PRV computation fails (it can
    for extreme histories; then ``prv`` and ``prv_upper`` are ``inf``). The
    PRV *estimate* is never enforced: it can sit below the true epsilon.

Opacus (and so torch) is imported inside the functions only: the daemon
imports this module for :class:`Mechanism` and :class:`Epsilons`, and the
functions run in the warm trainer process.

Examples
--------
Abadi et al. 2016's example (q = 0.01, sigma = 4, 10,000 steps, delta = 1e-5)::

    >>> h = [Mechanism(noise_multiplier=4.0, sample_rate=0.01, steps=10_000)]
    >>> round(epsilon_rdp(h, delta=1e-5), 2)
    1.04
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

#: Name of the bound :func:`enforced` returns, as written in privacy reports.
ACCOUNTANT = "min(rdp, prv_upper)"

#: RDP orders searched. Opacus's defaults (1.1 ... 10.9, 12 ... 63) extended to 256: small
#: budgets (epsilon below ~0.5 at delta = 1e-5) have their best order above 63, where the
#: default grid would give a needlessly loose bound.
RDP_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + [float(a) for a in range(12, 257)]
)

#: Absolute error allowed in the PRV epsilon; ``upper - estimate`` is about this.
PRV_EPS_ERROR = 0.01


@dataclass(frozen=True, slots=True)
class Mechanism:
    """``steps`` DP-SGD steps with Poisson sampling rate ``sample_rate`` and noise ``sigma``.

    Parameters
    ----------
    noise_multiplier : float
        ``sigma``: the Gaussian noise std over the clip norm, ``> 0``.
    sample_rate : float
        ``q``: each record's probability of joining a step's batch, in ``(0, 1]``.
    steps : int
        Number of steps, ``>= 0``.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError(
                f"noise_multiplier must be a finite number > 0, got {self.noise_multiplier}"
            )
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if int(self.steps) != self.steps or self.steps < 0:
            raise ValueError(f"steps must be a whole number >= 0, got {self.steps}")


@dataclass(frozen=True, slots=True)
class Epsilons:
    """Epsilon of one history at one delta, under each accountant.

    Parameters
    ----------
    rdp : float
        RDP upper bound.
    prv : float
        PRV estimate (not a bound; for display).
    prv_upper : float
        PRV certified upper bound.
    """

    rdp: float
    prv: float
    prv_upper: float

    @property
    def enforced(self) -> float:
        """The bound the device enforces; see :func:`enforced`."""
        return enforced(self)


class PrvEpsilon(NamedTuple):
    """PRV accountant result: estimate and certified bounds."""

    estimate: float
    lower: float
    upper: float


def _merged(history: Iterable[Mechanism]) -> list[tuple[float, float, int]]:
    """``(sigma, q, steps)`` with identical mechanisms merged and zero-step ones dropped.

    Composition is commutative, so merging is exact; it spares the PRV
    accountant one convolution per repeated mechanism.
    """
    steps: dict[tuple[float, float], int] = {}
    for m in history:
        if not isinstance(m, Mechanism):
            raise TypeError(f"a history holds Mechanism objects, got {type(m).__name__}")
        if m.steps:
            key = (float(m.noise_multiplier), float(m.sample_rate))
            steps[key] = steps.get(key, 0) + int(m.steps)
    return [(sigma, q, n) for (sigma, q), n in sorted(steps.items())]


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


@functools.lru_cache(maxsize=4096)
def _step_rdp(sigma: float, q: float, orders: tuple[float, ...]) -> np.ndarray:
    """RDP of one sampled Gaussian step at each order (cached: the ledger asks often).

    ``compute_rdp`` is linear in ``steps``, so ``steps * _step_rdp(...)`` is exact.
    """
    from opacus.accountants.analysis import rdp as rdp_analysis

    curve = np.asarray(
        rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(orders)),
        dtype=float,
    )
    curve.setflags(write=False)
    return curve


def _composed_rdp(merged: list[tuple[float, float, int]], orders: tuple[float, ...]) -> np.ndarray:
    total = np.zeros(len(orders))
    for sigma, q, steps in merged:
        total = total + steps * _step_rdp(sigma, q, orders)
    return total


def _rdp_to_epsilon(curve: np.ndarray, orders: tuple[float, ...], delta: float) -> float:
    from opacus.accountants.analysis import rdp as rdp_analysis

    with warnings.catch_warnings():
        # Opacus warns when the best order is at the edge of the grid; the bound is
        # still valid (just not the tightest), and RDP_ORDERS is wide for that reason.
        warnings.simplefilter("ignore", UserWarning)
        eps, _ = rdp_analysis.get_privacy_spent(orders=list(orders), rdp=curve, delta=delta)
    return float(eps)


def rdp_curve(
    history: Iterable[Mechanism], *, orders: Iterable[float] = RDP_ORDERS
) -> np.ndarray:
    r"""Composed RDP :math:`\sum_i T_i\,\varepsilon_{q_i,\sigma_i}(\alpha)` at each order.

    Mironov 2017 Prop. 1 (composition adds RDP at each order); the per-step
    value is Mironov, Talwar, Zhang 2019 (sampled Gaussian mechanism), via
    ``opacus.accountants.analysis.rdp.compute_rdp``.
    """
    return _composed_rdp(_merged(history), tuple(float(a) for a in orders))


def epsilon_rdp(
    history: Iterable[Mechanism], *, delta: float, orders: Iterable[float] = RDP_ORDERS
) -> float:
    """Epsilon at ``delta`` from the RDP accountant (an upper bound).

    Converts :func:`rdp_curve` with Balle et al. 2020, Thm. 21, minimised over
    ``orders``. An empty history costs 0.
    """
    _check_delta(delta)
    merged = _merged(history)
    if not merged:
        return 0.0
    orders = tuple(float(a) for a in orders)
    return _rdp_to_epsilon(_composed_rdp(merged, orders), orders, delta)


def _safe_half_width(
    merged: list[tuple[float, float, int]], eps_error: float, delta_error: float
) -> float:
    """Opacus's ``compute_safe_domain_size`` (Gopi et al. Remark 5.6), with cached RDP.

    The same computation, on Opacus's default RDP orders, so the domain (and
    the result) is identical to Opacus's ``PRVAccountant``; a unit test checks
    that. Redone here only because Opacus recomputes every RDP curve per call.
    """
    from opacus.accountants import RDPAccountant

    orders = tuple(float(a) for a in RDPAccountant.DEFAULT_ALPHAS)
    total_steps = sum(steps for _, _, steps in merged)
    half_width = _rdp_to_epsilon(_composed_rdp(merged, orders), orders, delta_error / 4)
    for sigma, q, _ in merged:
        half_width = max(
            half_width,
            _rdp_to_epsilon(
                _step_rdp(sigma, q, orders), orders, delta_error / (8 * total_steps)
            ),
        )
    return max(half_width, eps_error) + 3


def epsilon_prv(
    history: Iterable[Mechanism],
    *,
    delta: float,
    eps_error: float = PRV_EPS_ERROR,
    delta_error: float | None = None,
) -> PrvEpsilon:
    """Epsilon at ``delta`` from the PRV accountant: ``(estimate, lower, upper)``.

    Gopi, Lee, Wutschitz 2021: each distinct mechanism's privacy loss random
    variable is truncated to a safe domain (their Remark 5.6), discretised on a
    mesh of width ``eps_error / sqrt(T log(12 / delta_error) / 2)`` (``T`` the
    total steps), self-composed ``steps`` times by FFT and convolved with the
    others. ``upper`` is certified: the history is ``(upper, delta)``-DP.
    Same steps as Opacus's ``PRVAccountant`` (which returns only ``upper``);
    its safe-domain rule is the one from the authors' code, which Opacus notes
    is fine for ``eps_error < 1`` (the default here is 0.01).

    Parameters
    ----------
    history : iterable of Mechanism
    delta : float
    eps_error : float
        Allowed absolute error in epsilon (mesh fineness), in ``(0, 1)``.
    delta_error : float or None
        Allowed error in delta; ``None`` means ``delta / 1000`` (Opacus's default).

    Returns
    -------
    PrvEpsilon
        ``(estimate, lower, upper)``; ``(0, 0, 0)`` for an empty history.
    """
    from opacus.accountants.analysis.prv import (
        Domain,
        PoissonSubsampledGaussianPRV,
        TruncatedPrivacyRandomVariable,
        compose_heterogeneous,
        discretize,
    )

    _check_delta(delta)
    if not 0 < eps_error < 1:
        raise ValueError(f"eps_error must be in (0, 1), got {eps_error}")
    merged = _merged(history)
    if not merged:
        return PrvEpsilon(0.0, 0.0, 0.0)
    if delta_error is None:
        delta_error = delta / 1000
    counts = [steps for _, _, steps in merged]
    half_width = _safe_half_width(merged, eps_error, delta_error)
    mesh = eps_error / math.sqrt(sum(counts) * math.log(12 / delta_error) / 2)
    domain = Domain.create_aligned(-half_width, half_width, mesh)
    # q = 1 makes Opacus's PRV formulas take log(0) = -inf on purpose (the density is 0
    # there); numpy's warning about it is noise.
    with np.errstate(divide="ignore", invalid="ignore"):
        dprvs = [
            discretize(
                TruncatedPrivacyRandomVariable(
                    PoissonSubsampledGaussianPRV(q, sigma), domain.t_min, domain.t_max
                ),
                domain,
            )
            for sigma, q, _ in merged
        ]
        composed = compose_heterogeneous(dprvs=dprvs, num_self_compositions=counts)
        lower, estimate, upper = composed.compute_epsilon(delta, delta_error, eps_error)
    if not (math.isfinite(upper) and lower <= estimate <= upper):
        raise FloatingPointError(
            f"PRV accounting gave an unusable interval ({lower}, {estimate}, {upper})"
        )
    return PrvEpsilon(float(estimate), float(lower), float(upper))


def epsilons(history: Iterable[Mechanism], *, delta: float) -> Epsilons:
    """Epsilon of ``history`` at ``delta`` under RDP and PRV.

    If the PRV computation fails (very long or extreme histories can exhaust
    its floating-point range), ``prv`` and ``prv_upper`` are ``inf`` and the
    enforced bound falls back to RDP; the failure is never hidden as a small
    number.
    """
    history = list(history)
    rdp = epsilon_rdp(history, delta=delta)
    try:
        prv = epsilon_prv(history, delta=delta)
    except (ValueError, RuntimeError, MemoryError, FloatingPointError):
        return Epsilons(rdp=rdp, prv=math.inf, prv_upper=math.inf)
    return Epsilons(rdp=rdp, prv=prv.estimate, prv_upper=prv.upper)


def enforced(e: Epsilons) -> float:
    """The epsilon the device enforces: ``min(rdp, prv_upper)`` (see the module docstring).

    NaN counts as "no bound" (infinite), never as zero.
    """
    bounds = [b for b in (e.rdp, e.prv_upper) if not math.isnan(b)]
    return min(bounds) if bounds else math.inf
