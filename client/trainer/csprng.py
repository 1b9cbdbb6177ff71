"""The randomness that protects privacy in DP-SGD: ChaCha20 keyed with 256 OS bits.

Every random draw whose secrecy the DP guarantee assumes (which windows join a
step's Poisson batch, and the Gaussian noise added to the clipped sum) comes
from a :class:`CryptoRandom`, never from torch's or numpy's generators.

Why not torch's or numpy's generator
    torch's CPU generator (Mersenne Twister) keeps only the low 32 bits of
    ``manual_seed``: whatever entropy is passed in, an observer who knows the
    weights a round started from and the update it returned can try all
    ``2**32`` seeds, regenerate the noise and subtract it, which voids the
    guarantee. numpy's PCG64 keeps 128 bits of state but is not a
    cryptographic generator: its outputs reveal its state, and nothing about
    it is designed to resist an adversary who sees (noised) outputs.

Which generator
    The keystream of ChaCha20 (RFC 8439; ``cryptography``'s OpenSSL binding,
    already a keystay dependency) under a 256-bit key. A key from
    ``os.urandom(32)`` makes the stream indistinguishable from uniform bits
    to anyone without the key, so observing some draws (or the trained
    update) tells nothing about the others. Each generator is one
    ``(key, stream)`` pair: the stream label is hashed into ChaCha20's 96-bit
    nonce, so one key yields independent streams for sampling and for noise.
    The 32-bit block counter allows 256 GiB per stream; :meth:`CryptoRandom.bytes`
    refuses to go past it rather than let the counter wrap and repeat keystream.

Seeded mode (tests and benchmarks only)
    :meth:`CryptoRandom.from_seed` keys the *same* generator with
    ``SHA-256(label || decimal(seed))``: every bit of an integer of any size
    reaches the key, there is no code path that truncates a seed. The device
    daemon never passes a seed (``TrainJob.seed`` is ``None``).

From bytes to numbers
    Uniforms: 8 keystream bytes -> a 64-bit integer -> its top 53 bits
    ``* 2**-53``, so every value in ``{0, 2**-53, ..., 1 - 2**-53}`` is equally
    likely (a double has 53 bits of mantissa; more bits would be rounded
    away unevenly). A Bernoulli(``q``) draw is ``u < q``, exact up to
    ``2**-53``.

    Gaussians: Box-Muller, ``r = sqrt(-2 ln(1 - u1))``, ``z = (r cos 2 pi u2,
    r sin 2 pi u2)``. Chosen because it is an exact transform (no approximation
    of the inverse normal CDF), uses a fixed 16 bytes per pair of outputs with
    no rejection loop (the time taken does not depend on the values drawn), and
    vectorises in numpy. ``1 - u1`` lies in ``(0, 1]``, so the logarithm is
    finite; the largest ``|z|`` is ``sqrt(2 * 53 ln 2) ~ 8.6``, a tail cut
    whose mass (~1e-17) is far below any delta keystay accepts. DP-SGD asks
    for float32 samples (its gradients are float32): the radius is still
    computed in float64 from the 53-bit ``u1``, the cosine and sine in float32
    (numpy's float64 trigonometry was half the cost of a step's noise). Known
    limitation, shared with Opacus and every floating-point DP library that
    does not use discrete noise: the low-order bits of a floating-point sample
    are not exactly Gaussian (Mironov, CCS 2012).
"""

from __future__ import annotations

import hashlib
import math
import os

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

__all__ = ["KEY_BYTES", "CryptoRandom"]

#: ChaCha20 key length: 256 bits.
KEY_BYTES = 32

# ChaCha20's 32-bit block counter times 64-byte blocks: past this, OpenSSL would
# repeat keystream under the same nonce.
_MAX_STREAM_BYTES = 2**32 * 64

_SEED_LABEL = b"keystay.trainer.csprng.v1.seed\x00"


class CryptoRandom:
    """Uniforms, Bernoulli trials and Gaussians from one ChaCha20 keystream.

    Parameters
    ----------
    key : bytes
        Exactly 32 bytes. Use :meth:`from_os` for training on a device.
    stream : str
        Label of this stream; the same key with different labels gives
        independent streams.

    Examples
    --------
    >>> a = CryptoRandom.from_seed(1, "noise")
    >>> b = CryptoRandom.from_seed(1, "noise")
    >>> bool((a.uniform(4) == b.uniform(4)).all())
    True
    """

    def __init__(self, key: bytes, stream: str = "") -> None:
        if not isinstance(key, bytes) or len(key) != KEY_BYTES:
            raise ValueError(f"a CryptoRandom key is {KEY_BYTES} bytes")
        # Nonce = 32-bit block counter (starts at 0) || 96 bits naming the stream.
        nonce = b"\x00" * 4 + hashlib.sha256(stream.encode("utf-8")).digest()[:12]
        self._cipher = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
        self._drawn = 0
        # Reused plaintext (zeros) and output buffers: update_into on them measured
        # 5x faster than update() on fresh bytes for a step's ~300 kB of keystream.
        self._zeros = bytearray()
        self._out = bytearray()

    @classmethod
    def from_os(cls, stream: str = "") -> CryptoRandom:
        """A generator keyed with 256 bits of ``os.urandom``: unpredictable to anyone."""
        return cls(os.urandom(KEY_BYTES), stream)

    @classmethod
    def from_seed(cls, seed: int, stream: str = "") -> CryptoRandom:
        """A reproducible generator for tests and benchmarks; never for the device.

        The key is ``SHA-256`` of the seed's full decimal representation, so
        seeds that differ in any bit (beyond 32 or 64 bits too) give unrelated
        streams.
        """
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        return cls(hashlib.sha256(_SEED_LABEL + str(seed).encode("ascii")).digest(), stream)

    @classmethod
    def pair(cls, seed: int | None) -> tuple[CryptoRandom, CryptoRandom]:
        """Independent ``(sampling, noise)`` generators under one key.

        ``None`` draws the key from ``os.urandom`` (what the device does).
        """
        key = (
            os.urandom(KEY_BYTES)
            if seed is None
            else cls.from_seed(seed).bytes(KEY_BYTES)  # a key derived from the seed
        )
        return cls(key, "poisson-sampling"), cls(key, "gaussian-noise")

    def bytes(self, n: int) -> bytes:
        """The next ``n`` keystream bytes."""
        return bytes(self._keystream(n))

    def _keystream(self, n: int) -> memoryview:
        """The next ``n`` keystream bytes, in a buffer the next call overwrites."""
        if n < 0:
            raise ValueError(f"cannot draw {n} bytes")
        if self._drawn + n > _MAX_STREAM_BYTES:
            raise RuntimeError(
                "this random stream is exhausted (256 GiB drawn); make a new CryptoRandom"
            )
        self._drawn += n
        if len(self._zeros) < n:
            self._zeros = bytearray(n)
            self._out = bytearray(n + 64)  # update_into wants room for a block more
        written = self._cipher.update_into(memoryview(self._zeros)[:n], self._out)
        assert written == n  # a stream cipher returns what it is given
        return memoryview(self._out)[:n]

    def _words53(self, n: int) -> np.ndarray:
        """``n`` independent integers uniform on ``[0, 2**53)`` (a fresh array)."""
        words = np.frombuffer(self._keystream(8 * n), dtype="<u8")
        return words >> np.uint64(11)  # a new array: the buffer may be reused at once

    def uniform(self, n: int) -> np.ndarray:
        """``n`` float64 uniforms on ``[0, 1)``, multiples of ``2**-53``."""
        return self._words53(n).astype(np.float64) * (2.0**-53)

    def bernoulli(self, n: int, p: float) -> np.ndarray:
        """``n`` independent booleans, each ``True`` with probability ``p``."""
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"a probability must be in [0, 1], got {p}")
        # u = k * 2**-53 < p  <=>  k < p * 2**53 (exact: a power-of-two scaling)
        # <=>  k < ceil(p * 2**53); compared as integers, without forming u.
        return self._words53(n) < np.uint64(math.ceil(p * 2.0**53))

    def normal(self, n: int, dtype: type[np.floating] = np.float64) -> np.ndarray:
        """``n`` standard Gaussians (Box-Muller, see the module docstring).

        Parameters
        ----------
        n : int
        dtype : numpy float type
            ``float64`` (default) or ``float32``. With ``float32`` (what
            DP-SGD adds to float32 gradients) the radius is still computed in
            float64 from 53-bit uniforms, so the tail is the same; only the
            cosine and sine of the angle are taken in float32, the precision
            of the result (measured 20x faster than in float64).
        """
        pairs = (n + 1) // 2
        u = self.uniform(2 * pairs)
        radius = np.sqrt(-2.0 * np.log1p(-u[:pairs]))  # log(1 - u1), 1 - u1 in (0, 1]
        angle = (2.0 * np.pi) * u[pairs:]
        if dtype is np.float32:
            radius, angle = radius.astype(np.float32), angle.astype(np.float32)
        elif dtype is not np.float64:
            raise ValueError(f"normal() draws float64 or float32, not {dtype}")
        return np.concatenate((radius * np.cos(angle), radius * np.sin(angle)))[:n]
