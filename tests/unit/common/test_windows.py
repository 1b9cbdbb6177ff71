"""Token windows and the train/held-out split (keystay.common.windows)."""

from __future__ import annotations

import doctest
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keystay.common import windows as windows_module
from keystay.common.windows import WINDOW, make_windows, split_heldout, windows_for_blocks


def test_make_windows_shape_dtype_and_content() -> None:
    tokens = np.arange(10, dtype=np.int32)
    w = make_windows(tokens, 3)
    assert w.shape == (7, 4)
    assert w.dtype == np.int64
    assert w.flags.c_contiguous
    np.testing.assert_array_equal(w[0], [0, 1, 2, 3])
    np.testing.assert_array_equal(w[-1], [6, 7, 8, 9])
    # Every row is consecutive tokens: context then the token to predict.
    np.testing.assert_array_equal(np.diff(w, axis=1), 1)


def test_make_windows_is_a_copy() -> None:
    tokens = np.arange(6, dtype=np.int64)
    w = make_windows(tokens, 2)
    w[0, 0] = 99
    assert tokens[0] == 0


def test_short_block_gives_no_windows() -> None:
    assert make_windows(np.arange(3), 3).shape == (0, 4)
    assert make_windows(np.arange(4), 3).shape == (1, 4)
    assert make_windows(np.array([], dtype=np.int64), WINDOW).shape == (0, WINDOW + 1)


def test_stride() -> None:
    w = make_windows(np.arange(10), 2, stride=3)
    np.testing.assert_array_equal(w[:, 0], [0, 3, 6])
    assert w.shape == (3, 3)


@pytest.mark.parametrize(
    ("tokens", "width", "stride"),
    [(np.arange(5), 0, 1), (np.arange(5), 2, 0), (np.zeros((2, 5)), 2, 1)],
)
def test_make_windows_rejects_bad_arguments(tokens: np.ndarray, width: int, stride: int) -> None:
    with pytest.raises(ValueError):
        make_windows(tokens, width, stride=stride)


def test_split_takes_the_tail_and_drops_the_seam() -> None:
    w = make_windows(np.arange(120), 4)  # 116 windows of 5 tokens
    train, heldout = split_heldout(w, 0.1)
    assert len(heldout) == 12  # ceil(0.1 * 116)
    np.testing.assert_array_equal(heldout, w[-12:])
    # The 4 windows before the seam share tokens with the first held-out window.
    assert len(train) == 116 - 12 - 4
    np.testing.assert_array_equal(train, w[: len(train)])
    assert train.max() < heldout.min()
    # Without the gap the next window would overlap: the drop is not more than needed.
    assert w[len(train)].max() >= heldout.min()


def test_split_is_deterministic() -> None:
    w = make_windows(np.random.default_rng(0).integers(0, 50, 500), WINDOW)
    a = split_heldout(w, 0.2)
    b = split_heldout(w, 0.2)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def test_split_fraction_zero_keeps_everything_for_training() -> None:
    w = make_windows(np.arange(50), 4)
    train, heldout = split_heldout(w, 0.0)
    assert len(train) == len(w)
    assert heldout.shape == (0, 5)


def test_short_block_goes_to_heldout_rather_than_leak() -> None:
    w = make_windows(np.arange(10), 4)  # 6 windows
    train, heldout = split_heldout(w, 0.5)
    assert len(heldout) == 3
    assert len(train) == 0


def test_split_with_stride_drops_fewer_windows() -> None:
    w = make_windows(np.arange(200), 8, stride=4)
    train, heldout = split_heldout(w, 0.1, stride=4)
    assert train.max() < heldout.min()
    assert len(train) == len(w) - len(heldout) - 2  # ceil(8 / 4) windows dropped


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_split_rejects_bad_fraction(fraction: float) -> None:
    with pytest.raises(ValueError, match="fraction"):
        split_heldout(make_windows(np.arange(20), 2), fraction)


@settings(max_examples=200, deadline=None)
@given(
    n_tokens=st.integers(0, 300),
    width=st.integers(1, 40),
    fraction=st.floats(0.0, 0.95),
    stride=st.integers(1, 5),
)
def test_split_never_shares_a_token(
    n_tokens: int, width: int, fraction: float, stride: int
) -> None:
    # Token value = position, so "shares a token" is "overlapping value ranges".
    w = make_windows(np.arange(n_tokens), width, stride=stride)
    train, heldout = split_heldout(w, fraction, stride=stride)
    assert len(train) + len(heldout) <= len(w)
    if len(heldout):
        np.testing.assert_array_equal(heldout, w[len(w) - len(heldout) :])
    if len(train) and len(heldout):
        assert train.max() < heldout.min()


def test_windows_for_blocks_never_span_two_blocks() -> None:
    blocks = [np.arange(0, 100), np.arange(1000, 1060), np.arange(5000, 5010)]
    train, heldout = windows_for_blocks(blocks, 8, 0.2)
    for w in (train, heldout):
        # Within one block consecutive tokens differ by 1; a window spanning blocks would not.
        np.testing.assert_array_equal(np.diff(w, axis=1), 1)
    # The 10-token block is too short for a window of 9 tokens plus a seam: held out only.
    assert not ((train >= 5000).any())
    assert train.dtype == heldout.dtype == np.int64


def test_windows_for_no_blocks() -> None:
    train, heldout = windows_for_blocks([], 4)
    assert train.shape == heldout.shape == (0, 5)


def test_doctests() -> None:
    result = doctest.testmod(windows_module)
    assert result.attempted > 0
    assert result.failed == 0


def test_module_does_not_import_torch() -> None:
    code = "import keystay.common.windows, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_training_windows_at_the_train_stride_hold_each_token_once() -> None:
    from keystay.common.windows import TRAIN_STRIDE, WINDOW

    tokens = np.arange(5_000)
    windows = make_windows(tokens, WINDOW, stride=TRAIN_STRIDE)
    train, heldout = split_heldout(windows, 0.1, stride=TRAIN_STRIDE)
    seen = np.concatenate([train.ravel(), heldout.ravel()])
    # Every token in at most one record (exactly one, up to the ragged tail).
    assert len(np.unique(seen)) == len(seen)
    assert len(seen) == (len(tokens) // (WINDOW + 1)) * (WINDOW + 1)
    # Non-overlapping windows need no gap at the seam: nothing is dropped.
    assert len(train) + len(heldout) == len(windows)
    assert int(train[-1, -1]) < int(heldout[0, 0])


def test_the_seam_gap_is_the_number_of_windows_that_overlap_it() -> None:
    # Width 3, stride 2: windows [2i, 2i+3]; only the one just before the seam
    # shares a token with the first held-out window.
    windows = make_windows(np.arange(41), 3, stride=2)
    train, heldout = split_heldout(windows, 0.25, stride=2)
    assert len(windows) - len(train) - len(heldout) == 1
    assert not set(train.ravel()) & set(heldout.ravel())
