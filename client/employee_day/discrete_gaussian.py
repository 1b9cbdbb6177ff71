r"""Discrete Gaussian noise from the device's cryptographic generator.

The discrete Gaussian :math:`\mathcal{N}_\mathbb{Z}(0, s^2)` puts mass
proportional to :math:`e^{-x^2/(2s^2)}` on every integer :math:`x`. Its
privacy for an integer-valued query of L2 sensitivity :math:`\Delta` is at
least that of the continuous Gaussian with the same :math:`s/\Delta`
(Canonne, Kamath, Steinke, "The Discrete Gaussian for Differential Privacy",
NeurIPS 2020), and it needs no rounding after it is drawn, so it survives
secure aggregation's integer arithmetic exactly.

Sampler
-------
Canonne, Kamath, Steinke 2020, Algorithm 3, vectorised: draw a candidate
:math:`Y` from the discrete Laplace distribution with scale
:math:`t = \lfloor s \rfloor + 1` (the difference of two geometric draws), and
keep it with probability :math:`\exp(-(|Y| - s^2/t)^2 / (2 s^2))`; repeat for
the rejected coordinates. A kept :math:`Y` is exactly discrete Gaussian
(their Theorem 3); about 60 % of candidates are kept for large ``s``.

All randomness comes from :class:`~keystay.client.trainer.csprng.CryptoRandom`
(ChaCha20 under 256 OS bits), never numpy's generator: whoever could predict
the noise could subtract it. The geometric draws and the acceptance test use
floating point (53-bit uniforms, ``log`` and ``exp``), so, like every
floating-point DP sampler, the result is exact only up to the rounding of
those operations (Mironov, CCS 2012); the integer outputs themselves are
exact. Values stay far inside float64's exact integers for any ``s`` keystay
allows (:data:`MAX_SCALE`).
"""

from __future__ import annotations

import math

import numpy as np

from keystay.client.trainer.csprng import CryptoRandom

#: The largest noise scale sampled: candidates stay below 2**53 / 64 with
#: overwhelming probability, far inside float64's exact integers.
MAX_SCALE = 2.0**40


def sample(n: int, scale: float, rng: CryptoRandom) -> np.ndarray:
    """``n`` independent draws of :math:`\\mathcal{N}_\\mathbb{Z}(0, \\text{scale}^2)`.

    Parameters
    ----------
    n : int
        How many values (``>= 0``).
    scale : float
        The standard-deviation parameter ``s`` (``> 0``, at most :data:`MAX_SCALE`).
    rng : CryptoRandom
        The generator; the daemon passes one keyed from the OS.

    Returns
    -------
    numpy.ndarray
        int64 array of length ``n``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not (math.isfinite(scale) and 0 < scale <= MAX_SCALE):
        raise ValueError(f"scale must be in (0, {MAX_SCALE:g}], got {scale}")
    out = np.empty(n, dtype=np.int64)
    todo = np.arange(n)
    t = math.floor(scale) + 1
    # Geometric(p) failures count, p = 1 - exp(-1/t): floor(log(u) / log(1 - p)).
    log_keep = -1.0 / t
    shift = scale * scale / t
    while len(todo):
        m = len(todo)
        # uniform() is in [0, 1); 1 - u is in (0, 1], so the logarithm is finite.
        g1 = np.floor(np.log1p(-rng.uniform(m)) / log_keep)
        g2 = np.floor(np.log1p(-rng.uniform(m)) / log_keep)
        candidate = g1 - g2
        accept = rng.uniform(m) < np.exp(
            -np.square(np.abs(candidate) - shift) / (2 * scale * scale)
        )
        out[todo[accept]] = candidate[accept].astype(np.int64)
        todo = todo[~accept]
    return out


def pmf(values: np.ndarray, scale: float) -> np.ndarray:
    """The exact probability of each integer in ``values`` (for tests and docs).

    The normalising constant is summed over ``|x| <= 40 s + 40`` (the mass
    beyond is below 1e-300).
    """
    reach = int(40 * scale) + 40
    support = np.arange(-reach, reach + 1, dtype=np.float64)
    log_w = -np.square(support) / (2 * scale * scale)
    log_z = float(np.log(np.sum(np.exp(log_w - log_w.max())))) + float(log_w.max())
    return np.exp(-np.square(np.asarray(values, dtype=np.float64)) / (2 * scale * scale) - log_z)
