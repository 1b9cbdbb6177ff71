r"""One device's part of an employee-day round: sample days, clip, sum, noise, encode.

The unit and its sensitivity
----------------------------
The privacy unit is one employee-day (a block of the store). A round trains
on each day the device chose *separately*, from the round's global weights,
and clips that day's update to L2 norm ``C`` before the days are summed:
:math:`U = \sum_{d \in S} \mathrm{clip}_C(\Delta_d)`. Adding or removing one
day adds or removes one term, so the sensitivity of ``U`` to one day is
``C``. (Clipping the whole round's update once instead would give ``2C``:
removing a day changes which update is clipped, and the device still sends
one. Separate terms halve the noise the same guarantee needs.)

Days sampled in secret
----------------------
Each eligible day joins the round independently with probability ``q``,
drawn from the daemon's cryptographic generator
(:func:`sample_days`). The device answers whether or not any day joined (an
empty sum is still noised and masked), so taking part reveals nothing about
which days were read, and the ledger may claim amplification by Poisson
subsampling: every eligible day is charged the subsampled mechanism, chosen
or not.

Noise on the device, discretised for secure aggregation
-------------------------------------------------------
SecAgg+ adds integers modulo ``2**b``. The device scales its sum by
:math:`\gamma = R / (2c)` (``R`` the protocol's quantization range, ``c`` its
clipping range, as Flower's quantiser does), rounds it deterministically and
adds its share of discrete Gaussian noise,
:math:`\mathcal{N}_\mathbb{Z}(0, s^2)` per coordinate with
:math:`s = \gamma\sigma C/\sqrt{t}` (:func:`encode`). Nothing noisy is clipped
per coordinate (that would not commute with the sum); wrap-around modulo
``2**b`` is a function of the sum, so it costs accuracy, never privacy.

Rounding moves each coordinate by at most 1/2, so the integer sensitivity
is :math:`\Delta = \gamma C + \sqrt{D}` (two roundings, ``D`` parameters).
The device therefore charges :math:`\sigma_\mathrm{eff} = \sigma\,\gamma C / \Delta`
(:func:`effective_noise_multiplier`; about 0.1 % below ``σ`` at the default
encoding).

Two guarantees per day (:func:`mechanisms`)
------------------------------------------
* Against an honest-but-curious server, which sees only the sum over at least
  ``t`` devices: that sum carries :math:`\mathcal{N}_\mathbb{Z}` noise of
  variance :math:`\ge t s^2 = (\gamma\sigma C)^2`. Kairouz, Liu, Steinke
  ("The Distributed Discrete Gaussian Mechanism for Federated Learning with
  Secure Aggregation", ICML 2021) bound how far a sum of discrete Gaussians is
  from one discrete Gaussian by :math:`\tau = 10\sum_{k=1}^{n-1}
  e^{-2\pi^2 s^2 k/(k+1)}`; the device refuses a scale where :math:`\tau D`
  exceeds :data:`MAX_TAU_TERM` (:func:`tau`), so the sum is charged as the
  Gaussian with noise multiplier :math:`\sigma_\mathrm{eff}`.
* Against a server that breaks the aggregation and sees this device's share
  alone: noise :math:`s`, noise multiplier :math:`\sigma_\mathrm{eff}/\sqrt{t}`.

Both are the Poisson-subsampled Gaussian of
:mod:`keystay.client.ledger.accounting` with one step per round: the discrete
Gaussian is at least as private as the continuous one at the same
:math:`s/\Delta` (Canonne, Kamath, Steinke 2020), and Poisson subsampling
preserves such a dominance (Zhu, Dong, Wang, "Optimal Accounting of
Differential Privacy via Characteristic Function", AISTATS 2022).

What the second guarantee assumes: the ``t`` devices in a sum add their
noise honestly. A device that colludes with the server and omits its share
lowers the sum's noise; the per-device guarantee holds regardless.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from keystay.client.employee_day import discrete_gaussian
from keystay.client.ledger.accounting import Mechanism
from keystay.client.trainer.csprng import CryptoRandom
from keystay.common.flatclip import clip_update

#: The largest ``τ·D`` (Kairouz et al.'s distance of a sum of discrete
#: Gaussians from one, times the dimension) the device accepts as negligible.
MAX_TAU_TERM = 1e-12

#: The smallest per-device noise scale, in integer units, the device accepts.
MIN_SCALE = 4.0


@dataclass(frozen=True, slots=True)
class DayRoundSpec:
    """What a round asks of the employee-day mechanism (already checked by the policy).

    Attributes
    ----------
    noise_multiplier : float
        ``σ``: the noise the sum over ``t`` devices carries, over ``C``.
    update_clip : float
        ``C``: each day's update is clipped to this L2 norm.
    day_sample_rate : float
        ``q``: each eligible day's probability of joining the round.
    min_summed_devices : int
        ``t``: the fewest devices whose shares are summed (the device's policy).
    """

    noise_multiplier: float
    update_clip: float
    day_sample_rate: float
    min_summed_devices: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError(f"noise_multiplier must be > 0, got {self.noise_multiplier}")
        if not (math.isfinite(self.update_clip) and self.update_clip > 0):
            raise ValueError(f"update_clip must be > 0, got {self.update_clip}")
        if not 0 < self.day_sample_rate <= 1:
            raise ValueError(f"day_sample_rate must be in (0, 1], got {self.day_sample_rate}")
        if int(self.min_summed_devices) != self.min_summed_devices or self.min_summed_devices < 1:
            raise ValueError(
                f"min_summed_devices must be a whole number >= 1, got {self.min_summed_devices}"
            )


@dataclass(frozen=True, slots=True)
class Encoding:
    """How SecAgg+ turns floats into integers (from the protocol's setup stage).

    Attributes
    ----------
    clipping_range : float
        ``c``: Flower's offset; a value ``x`` is sent as ``γ (x + c)``.
    quantization_range : int
        ``R``: ``γ = R / (2c)``.
    """

    clipping_range: float
    quantization_range: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clipping_range) and self.clipping_range > 0):
            raise ValueError(f"clipping_range must be > 0, got {self.clipping_range}")
        if int(self.quantization_range) != self.quantization_range or self.quantization_range < 2:
            raise ValueError(
                f"quantization_range must be an integer >= 2, got {self.quantization_range}"
            )

    @property
    def gamma(self) -> float:
        """Integer units per unit of the update."""
        return self.quantization_range / (2 * self.clipping_range)


def noise_scale(spec: DayRoundSpec, encoding: Encoding) -> float:
    """``s = γ σ C / √t``: this device's noise std in integer units."""
    return (
        encoding.gamma * spec.noise_multiplier * spec.update_clip
        / math.sqrt(spec.min_summed_devices)
    )


def effective_noise_multiplier(spec: DayRoundSpec, encoding: Encoding, dim: int) -> float:
    """``σ_eff = σ γC / (γC + √D)``: ``σ`` after rounding's extra sensitivity."""
    scaled_clip = encoding.gamma * spec.update_clip
    return spec.noise_multiplier * scaled_clip / (scaled_clip + math.sqrt(dim))


def tau(scale: float, devices: int) -> float:
    r"""Kairouz et al.'s :math:`\tau = 10\sum_{k=1}^{n-1} e^{-2\pi^2 s^2 k/(k+1)}`.

    Each term is at most :math:`e^{-\pi^2 s^2}`, so the sum is bounded by
    ``10 (n - 1) exp(-π² s²)``; that bound is returned (exact enough: it is
    compared with :data:`MAX_TAU_TERM`, and is 0 in float64 for ``s >= 9``).
    """
    return 10.0 * max(0, devices - 1) * math.exp(-(math.pi**2) * scale * scale)


def check_scale(spec: DayRoundSpec, encoding: Encoding, dim: int, devices: int) -> str | None:
    """Why this round's noise scale is unsafe to charge as Gaussian, or None when it is fine."""
    scale = noise_scale(spec, encoding)
    if scale < MIN_SCALE:
        return (
            f"the noise scale in integer units is {scale:.3g}, below {MIN_SCALE:g}: "
            "the protocol's quantization range is too coarse for this noise"
        )
    if scale > discrete_gaussian.MAX_SCALE:
        return f"the noise scale in integer units is {scale:.3g}, above the sampler's limit"
    if tau(scale, devices) * dim > MAX_TAU_TERM:
        return "the sum of the devices' discrete noise is not close enough to one Gaussian"
    return None


def mechanisms(spec: DayRoundSpec, encoding: Encoding, dim: int) -> tuple[Mechanism, Mechanism]:
    """``(honest-but-curious server, server that breaks aggregation)`` for every eligible day."""
    sigma = effective_noise_multiplier(spec, encoding, dim)
    q = float(spec.day_sample_rate)
    return (
        Mechanism(noise_multiplier=sigma, sample_rate=q, steps=1),
        Mechanism(
            noise_multiplier=sigma / math.sqrt(spec.min_summed_devices), sample_rate=q, steps=1
        ),
    )


def sample_days(days: Sequence[str], rate: float, rng: CryptoRandom) -> list[str]:
    """Each day independently with probability ``rate`` (Poisson sampling), in order."""
    if not days:
        return []
    joined = rng.bernoulli(len(days), rate)
    return [day for day, keep in zip(days, joined, strict=True) if keep]


def clip_and_sum(
    updates: Sequence[Sequence[np.ndarray]],
    clip: float,
    shapes: Sequence[tuple[int, ...]],
) -> list[np.ndarray]:
    """``Σ_d clip_C(Δ_d)`` in float64; zeros of ``shapes`` when no day joined."""
    total = [np.zeros(shape, dtype=np.float64) for shape in shapes]
    for update in updates:
        if [tuple(u.shape) for u in update] != [tuple(s) for s in shapes]:
            raise ValueError("a day's update does not have the model's shapes")
        clipped, _ = clip_update(update, clip)
        for acc, part in zip(total, clipped, strict=True):
            acc += part
    return total


def encode(
    update_sum: Sequence[np.ndarray],
    spec: DayRoundSpec,
    encoding: Encoding,
    rng: CryptoRandom,
) -> list[np.ndarray]:
    """The device's integer share before masking: ``round(γ (U + c)) + N_Z(0, s²)``.

    int64 arrays in the shapes of ``update_sum``. SecAgg's weight factor and
    masks are added by the caller; the server's unchanged Flower workflow
    subtracts the ``c`` offsets and divides by the number of devices.
    """
    gamma = encoding.gamma
    scale = noise_scale(spec, encoding)
    out = []
    for part in update_sum:
        values = np.asarray(part, dtype=np.float64)
        if not np.all(np.isfinite(values)):
            raise ValueError("the update sum is not finite; not encoding it")
        signal = np.rint(gamma * (values + encoding.clipping_range)).astype(np.int64)
        noise = discrete_gaussian.sample(signal.size, scale, rng).reshape(signal.shape)
        out.append(signal + noise)
    return out
