r"""The epsilon maths: pure functions over DP-SGD mechanisms, and a state that composes.

A *history* is every Poisson-subsampled Gaussian mechanism that touched a
block of data, in any order (composition is commutative): each
:class:`Mechanism` is ``steps`` applications of DP-SGD's step with sampling
rate ``q`` and noise multiplier ``sigma``. The device ledger stores the
history (and never resets it). Pricing a round by re-running an accountant
over the whole history grew without bound (Opacus's PRV accountant: 23 s at
10 distinct mechanisms, 482 s at 50), so the ledger instead keeps one
:class:`AccountantState` per block, composes only the new mechanism into it
(:func:`compose_state`) and reads epsilons off it (:func:`state_epsilons`).
Everything here is a pure function (Opacus style: the maths here, the state
in the ledger); :func:`epsilons` is the same maths from scratch over a
history. numpy and scipy only: the daemon charges without torch.

Two accountants, both valid upper bounds, both delta-free in the state:

RDP (:func:`epsilon_rdp`; state: the composed curve)
    Renyi DP composes by addition (Mironov 2017, "Renyi Differential
    Privacy", Prop. 1): :math:`\varepsilon_{RDP}(\alpha) = \sum_i T_i\,
    \varepsilon_{q_i,\sigma_i}(\alpha)`, so the state keeps the curve over
    :data:`RDP_ORDERS` and a round adds to it. The RDP of one sampled
    Gaussian step is :math:`\log A_\alpha / (\alpha - 1)`, computed here
    (numpy/scipy, no Opacus) exactly for integer orders and by the
    convergent series for fractional ones (Mironov, Talwar, Zhang 2019,
    "Renyi Differential Privacy of the Sampled Gaussian Mechanism", Sec. 3.3);
    a test checks it against Opacus and dp-accounting. Converted to
    :math:`(\varepsilon, \delta)` with Balle et al. 2020 ("Hypothesis Testing
    Interpretations and Renyi DP", Thm. 21):
    :math:`\varepsilon = \min_\alpha \varepsilon_{RDP}(\alpha) + \log((\alpha-1)/\alpha)
    - (\log\delta + \log\alpha)/(\alpha-1)`.
    Loose by 10-20 % on typical DP-SGD runs.

PLD (:mod:`keystay.client.ledger.pld`; state: the composed distributions)
    The privacy loss distribution of each direction (add, remove) on a fixed
    grid, built so that it *dominates* the true one ("connect the dots"
    discretisation, pessimistic truncation, round-off slack); composition is
    a convolution. The epsilon read from it is never below the true epsilon
    (the argument and the error terms are in that module's docstring) and
    within about 0.5 % above dp-accounting's PLD. It replaces the PRV
    accountant on the device: PRV's mesh depends on the total number of
    steps, so it cannot be kept as a state and extended.

PRV (:func:`epsilon_prv`, Opacus; a reference only)
    Gopi, Lee, Wutschitz 2021 ("Numerical Composition of Differential
    Privacy", Thm. 5.5 and Alg. 1) over a whole history, as before; kept for
    its pinned published figures and comparisons, never called by the ledger.

What the device enforces
    :func:`enforced`: ``min(rdp, prv_upper)``, where :class:`Epsilons`'
    ``prv`` and ``prv_upper`` now both hold the PLD bound (the field and wire
    names are unchanged; :data:`ACCOUNTANT` names the bound ``min(rdp, pld)``
    in ledgers and reports). Both are valid upper bounds, so their minimum is
    one; the RDP bound covers a PLD whose mass at infinity exceeds delta
    (then ``prv`` is ``inf``).

Examples
--------
Abadi et al. 2016's example (q = 0.01, sigma = 4, 10,000 steps, delta = 1e-5)::

    >>> h = [Mechanism(noise_multiplier=4.0, sample_rate=0.01, steps=10_000)]
    >>> round(epsilon_rdp(h, delta=1e-5), 2)
    1.04

The PLD bound the device enforces for it, and the same from a state that
composes the steps in two rounds::

    >>> round(epsilons(h, delta=1e-5).prv_upper, 2)
    0.95
    >>> half = Mechanism(noise_multiplier=4.0, sample_rate=0.01, steps=5_000)
    >>> state = compose_state(compose_state(EMPTY_STATE, half), half)
    >>> round(state_epsilons(state, delta=1e-5).prv_upper, 2)
    0.95
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy import special

from keystay.client.ledger import pld

#: Name of the bound :func:`enforced` returns, as written in privacy reports.
ACCOUNTANT = "min(rdp, pld)"

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
        The tight accountant's figure for display: from :func:`epsilons` and
        :func:`state_epsilons` the certified PLD bound (equal to
        ``prv_upper``); from a PRV computation its estimate (not a bound).
        The name is kept for the ledger columns and the report's wire field.
    prv_upper : float
        The tight accountant's certified upper bound (PLD; PRV's upper end before).
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


def _log_a_integer(q: float, sigma: float, alphas: np.ndarray) -> np.ndarray:
    r""":math:`\log A_\alpha` for integer orders (Mironov, Talwar, Zhang 2019, Sec. 3.3).

    :math:`A_\alpha = \sum_{k=0}^{\alpha} \binom{\alpha}{k} q^k (1-q)^{\alpha-k}
    e^{(k^2 - k) / (2\sigma^2)}`, all terms positive, summed in log space.
    """
    if len(alphas) == 0:
        return np.zeros(0)
    top = int(alphas.max())
    k = np.arange(top + 1, dtype=float)
    a = alphas[:, None]
    with np.errstate(invalid="ignore"):
        terms = (
            special.gammaln(a + 1)
            - special.gammaln(k + 1)
            - special.gammaln(np.maximum(a - k, 0) + 1)
            + k * math.log(q)
            + (a - k) * math.log1p(-q)
            + (k * k - k) / (2 * sigma**2)
        )
    terms = np.where(k <= a, terms, -np.inf)
    return np.asarray(special.logsumexp(terms, axis=1), dtype=float)


def _log_a_fractional(q: float, sigma: float, alphas: np.ndarray) -> np.ndarray:
    r""":math:`\log A_\alpha` for fractional orders by the convergent series (all at once).

    Mironov, Talwar, Zhang 2019, Sec. 3.3: with
    :math:`z_0 = \sigma^2 \log(1/q - 1) + 1/2`, :math:`A_\alpha = A_0 + A_1`,

    .. math:: A_0 = \sum_{i \ge 0} \binom{\alpha}{i} q^i (1-q)^{\alpha-i}
              e^{(i^2 - i)/(2\sigma^2)}\, \Phi((z_0 - i)/\sigma),
              \quad
              A_1 = \sum_{i \ge 0} \binom{\alpha}{i} q^{\alpha-i} (1-q)^{i}
              e^{(j^2 - j)/(2\sigma^2)}\, \Phi((j - z_0)/\sigma),\ j = \alpha - i.

    The binomial coefficients alternate in sign past ``alpha``; each order's
    series is summed up to and including its first term below ``e^-30`` (its
    tail is then negligible against :math:`A_\alpha \ge 1`), as the
    reference implementations do.
    """
    if len(alphas) == 0:
        return np.zeros(0)
    return _log_a_fractional_rows(q, sigma, np.asarray(alphas, dtype=float), 128)


def _log_a_fractional_rows(q: float, sigma: float, alphas: np.ndarray, n: int) -> np.ndarray:
    """The series of :func:`_log_a_fractional` over ``n`` terms; longer for orders that need it."""
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    a = alphas[:, None]
    i = np.arange(n, dtype=float)[None, :]
    j = a - i
    log_binom = special.gammaln(a + 1) - special.gammaln(i + 1) - special.gammaln(j + 1)
    sign = special.gammasgn(j + 1)
    log_s0 = (
        log_binom + i * math.log(q) + j * math.log1p(-q) + (i * i - i) / (2 * sigma**2)
        + special.log_ndtr((z0 - i) / sigma)
    )
    log_s1 = (
        log_binom + j * math.log(q) + i * math.log1p(-q) + (j * j - j) / (2 * sigma**2)
        + special.log_ndtr((j - z0) / sigma)
    )
    small = np.maximum(log_s0, log_s1) < -30
    done = small.any(axis=1)
    if n >= 1 << 20:
        done[:] = True  # give up growing: sum what there is (never reached in practice)
    out = np.empty(len(alphas))
    if not done.all():
        out[~done] = _log_a_fractional_rows(q, sigma, alphas[~done], 4 * n)
    if done.any():
        # Each order's terms up to and including its first small one.
        first = np.where(small[done].any(axis=1), small[done].argmax(axis=1), n - 1)
        keep = np.arange(n)[None, :] <= first[:, None]
        both = np.concatenate(
            [np.where(keep, log_s0[done], -np.inf), np.where(keep, log_s1[done], -np.inf)],
            axis=1,
        )
        signs = np.concatenate([sign[done], sign[done]], axis=1)
        top = both.max(axis=1, keepdims=True)
        total = np.sum(signs * np.exp(both - top), axis=1)
        if not np.all(total > 0):
            raise FloatingPointError(
                f"RDP series lost its precision at q = {q}, sigma = {sigma}"
            )
        out[done] = top[:, 0] + np.log(total)
    return out


@functools.lru_cache(maxsize=4096)
def _step_rdp(sigma: float, q: float, orders: tuple[float, ...]) -> np.ndarray:
    r"""RDP of one sampled Gaussian step at each order (cached: the ledger asks often).

    :math:`\varepsilon(\alpha) = \log A_\alpha / (\alpha - 1)`; for ``q = 1``
    the plain Gaussian mechanism's :math:`\alpha / (2\sigma^2)`. RDP is linear
    in the number of steps, so ``steps * _step_rdp(...)`` is exact.
    """
    alphas = np.asarray(orders, dtype=float)
    if q == 1.0:
        curve = alphas / (2 * sigma**2)
    else:
        integer = alphas == np.round(alphas)
        log_a = np.empty(len(alphas))
        log_a[integer] = _log_a_integer(q, sigma, alphas[integer])
        log_a[~integer] = _log_a_fractional(q, sigma, alphas[~integer])
        curve = log_a / (alphas - 1)
    curve = np.asarray(curve, dtype=float)
    curve.setflags(write=False)
    return curve


def _rdp_to_epsilon(curve: np.ndarray, orders: tuple[float, ...], delta: float) -> float:
    r"""Balle et al. 2020, Thm. 21, minimised over ``orders`` (never below 0).

    :math:`\varepsilon = \min_\alpha \varepsilon(\alpha) + \log((\alpha-1)/\alpha)
    - (\log\delta + \log\alpha)/(\alpha-1)`.
    """
    alphas = np.asarray(orders, dtype=float)
    eps = (
        np.asarray(curve, dtype=float)
        + np.log1p(-1 / alphas)
        - (math.log(delta) + np.log(alphas)) / (alphas - 1)
    )
    if np.isnan(eps).all():
        return math.inf
    return max(0.0, float(np.nanmin(eps)))


def _composed_rdp(merged: list[tuple[float, float, int]], orders: tuple[float, ...]) -> np.ndarray:
    total = np.zeros(len(orders))
    for sigma, q, steps in merged:
        total = total + steps * _step_rdp(sigma, q, orders)
    return total


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


@functools.lru_cache(maxsize=256)
def _opacus_step_rdp(sigma: float, q: float, orders: tuple[float, ...]) -> np.ndarray:
    """Opacus's own RDP of one step, for the Opacus PRV reference path only."""
    from opacus.accountants.analysis import rdp as rdp_analysis

    curve = np.asarray(
        rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(orders)),
        dtype=float,
    )
    curve.setflags(write=False)
    return curve


def _safe_half_width(
    merged: list[tuple[float, float, int]], eps_error: float, delta_error: float
) -> float:
    """Opacus's ``compute_safe_domain_size`` (Gopi et al. Remark 5.6), with cached RDP.

    The same computation, on Opacus's default RDP orders and with Opacus's
    RDP, so the domain (and the result) is identical to Opacus's
    ``PRVAccountant``; a unit test checks that.
    """
    from opacus.accountants import RDPAccountant

    orders = tuple(float(a) for a in RDPAccountant.DEFAULT_ALPHAS)
    total_steps = sum(steps for _, _, steps in merged)
    composed = np.zeros(len(orders))
    for sigma, q, steps in merged:
        composed = composed + steps * _opacus_step_rdp(sigma, q, orders)
    half_width = _rdp_to_epsilon(composed, orders, delta_error / 4)
    for sigma, q, _ in merged:
        half_width = max(
            half_width,
            _rdp_to_epsilon(
                _opacus_step_rdp(sigma, q, orders), orders, delta_error / (8 * total_steps)
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


# -- the incremental state a ledger keeps per block ---------------------------

#: Names the maths a stored :class:`AccountantState` was built with; a state
#: stored under another version is rebuilt from the block's history.
STATE_VERSION = (
    f"keystay-accountant-v1;orders={len(RDP_ORDERS)}:{RDP_ORDERS[0]!r}..{RDP_ORDERS[-1]!r};"
    f"{pld.VERSION}"
)


@dataclass(frozen=True, slots=True)
class AccountantState:
    """Everything needed to price the next round of one block, independent of delta.

    Attributes
    ----------
    rdp : numpy.ndarray
        The composed RDP curve over :data:`RDP_ORDERS` (RDP adds).
    pld : keystay.client.ledger.pld.PldPair
        The composed dominating privacy loss distributions (both directions).
    """

    rdp: np.ndarray
    pld: pld.PldPair

    def __post_init__(self) -> None:
        if len(self.rdp) != len(RDP_ORDERS):
            raise ValueError(f"an RDP curve has {len(RDP_ORDERS)} orders, got {len(self.rdp)}")
        self.rdp.setflags(write=False)


#: The state of a block nothing has touched.
EMPTY_STATE = AccountantState(np.zeros(len(RDP_ORDERS)), pld.IDENTITY_PAIR)


def mechanism_state(mechanism: Mechanism) -> AccountantState:
    """The state of ``mechanism`` alone (its PLD pair is cached by ``(sigma, q, steps)``)."""
    if not isinstance(mechanism, Mechanism):
        raise TypeError(f"a history holds Mechanism objects, got {type(mechanism).__name__}")
    sigma, q, steps = (
        float(mechanism.noise_multiplier), float(mechanism.sample_rate), int(mechanism.steps)
    )
    if steps == 0:
        return EMPTY_STATE
    return AccountantState(
        np.asarray(steps * _step_rdp(sigma, q, RDP_ORDERS), dtype=float),
        pld.gaussian_pair(sigma, q, steps),
    )


def compose_state(state: AccountantState, mechanism: Mechanism) -> AccountantState:
    """``state`` followed by ``mechanism``: RDP curves add, PLDs convolve.

    The cost depends on ``mechanism`` (cached) and on the width of the PLDs,
    never on how many mechanisms ``state`` already holds.
    """
    new = mechanism_state(mechanism)
    if new is EMPTY_STATE:
        return state
    return AccountantState(state.rdp + new.rdp, pld.compose_pair(state.pld, new.pld))


def compose_state_twice(
    state: AccountantState, mechanism: Mechanism
) -> tuple[AccountantState, AccountantState]:
    """``(state + M, state + M + M)``: a charge and its retirement check, sharing transforms.

    Each is a valid bound on its own (see :func:`pld.compose_twice`).
    """
    new = mechanism_state(mechanism)
    if new is EMPTY_STATE:
        return state, state
    once, twice = pld.compose_pair_twice(state.pld, new.pld)
    return (
        AccountantState(state.rdp + new.rdp, once),
        AccountantState(state.rdp + 2 * new.rdp, twice),
    )


def state_of(history: Iterable[Mechanism]) -> AccountantState:
    """The state of a whole history, from scratch (identical mechanisms merged first)."""
    state = EMPTY_STATE
    for sigma, q, steps in _merged(history):
        state = compose_state(state, Mechanism(sigma, q, steps))
    return state


def state_epsilons(state: AccountantState, *, delta: float) -> Epsilons:
    """Epsilon of ``state`` at ``delta``: RDP, and the PLD bound in ``prv`` and ``prv_upper``.

    The PLD bound is certified (see :mod:`keystay.client.ledger.pld`), so it
    fills both the estimate and the upper-bound field; it is ``inf`` when the
    PLD's mass at infinity alone reaches ``delta`` (then RDP is enforced).
    """
    _check_delta(delta)
    rdp = _rdp_to_epsilon(state.rdp, RDP_ORDERS, delta) if state.rdp.any() else 0.0
    tight = pld.epsilon_pair(state.pld, delta)
    return Epsilons(rdp=rdp, prv=tight, prv_upper=tight)


def state_to_bytes(state: AccountantState) -> bytes:
    """Serialise a state (float64 RDP curve, then :func:`pld.to_bytes`)."""
    return np.ascontiguousarray(state.rdp, dtype="<f8").tobytes() + pld.to_bytes(state.pld)


def state_from_bytes(data: bytes) -> AccountantState:
    """Inverse of :func:`state_to_bytes`; raises ``ValueError`` on a malformed blob."""
    n = 8 * len(RDP_ORDERS)
    if len(data) < n:
        raise ValueError("truncated accountant state")
    curve = np.frombuffer(data[:n], dtype="<f8").astype(float)
    if not (np.all(np.isfinite(curve)) and np.all(curve >= 0)):
        raise ValueError("accountant state holds an invalid RDP curve")
    return AccountantState(curve, pld.from_bytes(data[n:]))


def epsilons(history: Iterable[Mechanism], *, delta: float) -> Epsilons:
    """Epsilon of ``history`` at ``delta`` under RDP and the PLD accountant.

    The same maths the ledger runs incrementally (:func:`state_of`, then
    :func:`state_epsilons`), here from scratch. numpy and scipy only.
    """
    return state_epsilons(state_of(history), delta=delta)


def enforced(e: Epsilons) -> float:
    """The epsilon the device enforces: ``min(rdp, prv_upper)`` (see the module docstring).

    NaN counts as "no bound" (infinite), never as zero.
    """
    bounds = [b for b in (e.rdp, e.prv_upper) if not math.isnan(b)]
    return min(bounds) if bounds else math.inf
