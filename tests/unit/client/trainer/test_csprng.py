"""The ChaCha20 generator behind DP-SGD's sampling and noise (keystay.client.trainer.csprng)."""

from __future__ import annotations

import doctest
import hashlib
import inspect
import os

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from scipy import stats

from keystay.client.trainer import csprng
from keystay.client.trainer.csprng import KEY_BYTES, CryptoRandom


def test_keystream_is_chacha20_of_the_key() -> None:
    # Against an independent ChaCha20 call: counter 0, the stream label hashed into
    # the nonce; bytes drawn in pieces continue the same keystream.
    key = bytes(range(32))
    nonce = b"\x00" * 4 + hashlib.sha256(b"s").digest()[:12]
    expected = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor().update(bytes(100))
    rng = CryptoRandom(key, "s")
    assert rng.bytes(40) + rng.bytes(60) == expected


def test_fresh_generators_draw_256_os_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[int] = []
    real = os.urandom

    def recording(n: int) -> bytes:
        asked.append(n)
        return real(n)

    monkeypatch.setattr(csprng.os, "urandom", recording)
    CryptoRandom.pair(None)
    CryptoRandom.from_os()
    assert asked == [KEY_BYTES, KEY_BYTES] and KEY_BYTES == 32


def test_fresh_pairs_are_unrelated() -> None:
    (s1, n1), (s2, n2) = CryptoRandom.pair(None), CryptoRandom.pair(None)
    assert not np.array_equal(s1.bernoulli(1000, 0.5), s2.bernoulli(1000, 0.5))
    a, b = n1.normal(20_000), n2.normal(20_000)
    assert abs(np.corrcoef(a, b)[0, 1]) < 5 / np.sqrt(20_000)


@pytest.mark.parametrize("offset", [2**32, 2**64, 2**128, -(2**31)])
def test_no_seed_bits_are_dropped(offset: int) -> None:
    # torch.Generator.manual_seed keeps 32 bits (and numpy seeds fold to 128):
    # seeds that differ only above those bits must still give unrelated streams.
    for seed in (0, 12345):
        a = CryptoRandom.from_seed(seed, "noise").bytes(64)
        b = CryptoRandom.from_seed(seed + offset, "noise").bytes(64)
        assert a != b


def test_seeded_mode_is_reproducible_and_streams_differ() -> None:
    a1, b1 = CryptoRandom.pair(5)
    a2, b2 = CryptoRandom.pair(5)
    assert np.array_equal(a1.uniform(10), a2.uniform(10))
    assert np.array_equal(b1.normal(10), b2.normal(10))
    # The sampling and noise streams of one key are not the same stream.
    sampling, noise = CryptoRandom.pair(5)
    assert sampling.bytes(64) != noise.bytes(64)


def test_rejects_short_keys_and_odd_seeds() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        CryptoRandom(b"\x00" * 16)
    with pytest.raises(TypeError, match="int"):
        CryptoRandom.from_seed(1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="probability"):
        CryptoRandom.from_seed(0).bernoulli(3, 1.5)


def test_no_torch_or_numpy_generator_in_the_module() -> None:
    source = inspect.getsource(csprng)
    code = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith("#"))
    body = code.split('"""', 2)[2]  # past the design docstring, which names them
    for banned in ("torch", "manual_seed", "default_rng", "np.random", "random."):
        assert banned not in body


def test_uniforms_are_53_bit_and_uniform() -> None:
    u = CryptoRandom.from_seed(1).uniform(200_000)
    assert u.dtype == np.float64 and u.min() >= 0.0 and u.max() < 1.0
    assert np.all(u * 2.0**53 == np.floor(u * 2.0**53))  # multiples of 2**-53
    # Low bits are used: a 32-bit uniform would have every value a multiple of 2**-32.
    assert np.any(u * 2.0**32 != np.floor(u * 2.0**32))
    assert stats.kstest(u, "uniform").pvalue > 1e-4


def test_gaussians_have_the_right_moments_and_shape() -> None:
    n = 200_000
    z = CryptoRandom.from_seed(2).normal(n)
    assert z.shape == (n,) and np.isfinite(z).all()
    assert abs(z.mean()) < 5 / np.sqrt(n)
    assert abs(z.std() - 1) < 5 / np.sqrt(2 * n)
    assert abs(stats.kurtosis(z)) < 0.1  # excess kurtosis 0
    assert stats.kstest(z, "norm").pvalue > 1e-4
    # Odd sizes and both Box-Muller outputs are used.
    assert CryptoRandom.from_seed(3).normal(7).shape == (7,)


def test_bernoulli_rate() -> None:
    n, p = 200_000, 0.03
    hits = CryptoRandom.from_seed(4).bernoulli(n, p)
    assert abs(hits.mean() - p) < 5 * np.sqrt(p * (1 - p) / n)
    assert not CryptoRandom.from_seed(4).bernoulli(1000, 0.0).any()
    assert CryptoRandom.from_seed(4).bernoulli(1000, 1.0).all()


def test_docstring_examples() -> None:
    result = doctest.testmod(csprng)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("p", [0.0, 1e-9, 1 / 3, 0.5, 0.006, 1 - 2**-53, 1.0])
def test_bernoulli_is_exactly_a_uniform_below_p(p: float) -> None:
    # The integer comparison must decide exactly as "53-bit uniform < p" would.
    hits = CryptoRandom.from_seed(9).bernoulli(50_000, p)
    assert np.array_equal(hits, CryptoRandom.from_seed(9).uniform(50_000) < p)


def test_float32_gaussians_match_the_float64_ones() -> None:
    # Same keystream, same transform: float32 samples are the float64 ones rounded
    # (up to float32 trigonometry), with the same moments.
    wide = CryptoRandom.from_seed(6).normal(100_001)
    narrow = CryptoRandom.from_seed(6).normal(100_001, np.float32)
    assert narrow.dtype == np.float32 and narrow.shape == wide.shape
    np.testing.assert_allclose(narrow, wide, rtol=0, atol=1e-5)
    assert abs(narrow.std() - 1) < 5 / np.sqrt(2 * narrow.size)
    with pytest.raises(ValueError, match="float64 or float32"):
        CryptoRandom.from_seed(6).normal(3, np.float16)  # type: ignore[arg-type]


def test_buffers_are_not_shared_between_draws() -> None:
    # The keystream buffer is reused; what a draw returned must not change after.
    rng = CryptoRandom.from_seed(8)
    first = rng.uniform(1000)
    kept = first.copy()
    rng.uniform(1000)
    rng.bernoulli(5000, 0.5)
    assert np.array_equal(first, kept)
    assert rng.bytes(10) != rng.bytes(10)
