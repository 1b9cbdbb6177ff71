"""Token streams to training windows, with numpy only.

A *window* is ``width + 1`` consecutive tokens of one block (employee-day):
the first ``width`` are the context, the last is the token to predict. Windows
are the records DP-SGD protects (record-level DP within a block), so the split
into training and held-out windows is made so that no token is in both.

This module must stay free of torch: the daemon cuts windows before handing
them to the trainer process.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

#: Context length of the shared model: 32 tokens predict the 33rd.
WINDOW = 32


def make_windows(tokens: np.ndarray, width: int, *, stride: int = 1) -> np.ndarray:
    """All windows of ``width + 1`` consecutive tokens, ``stride`` tokens apart.

    Parameters
    ----------
    tokens : numpy.ndarray
        1-D token ids of one block, in time order.
    width : int
        Context length (the model's ``window``).
    stride : int
        Distance between window starts; 1 (default) uses every position.

    Returns
    -------
    numpy.ndarray
        Shape ``(n, width + 1)``, int64, C-contiguous (a copy, not a view);
        ``n = (len(tokens) - width - 1) // stride + 1``, or 0 when the block is
        shorter than one window.

    Examples
    --------
    >>> make_windows(np.arange(5), 2)
    array([[0, 1, 2],
           [1, 2, 3],
           [2, 3, 4]])
    """
    if width < 1:
        raise ValueError(f"window width must be at least 1, got {width}")
    if stride < 1:
        raise ValueError(f"stride must be at least 1, got {stride}")
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    tokens = tokens.astype(np.int64, copy=False)
    if tokens.shape[0] < width + 1:
        return np.empty((0, width + 1), dtype=np.int64)
    view = np.lib.stride_tricks.sliding_window_view(tokens, width + 1)[::stride]
    return np.ascontiguousarray(view)


def split_heldout(
    windows: np.ndarray, fraction: float = 0.1, *, stride: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Split one block's windows into training and held-out windows, deterministically.

    The held-out windows are the last ``ceil(fraction * n)`` (the tail of the
    block: the most recent behaviour). The training windows that share a token
    with the first held-out window are dropped, so no token is in both sets:
    with windows ``stride`` apart that is the ``ceil(width / stride)`` windows
    before the seam (``width = windows.shape[1] - 1``; 32 windows at the
    default stride 1). Splitting the concatenation of several blocks at once
    would only guard the last seam: call this per block
    (:func:`windows_for_blocks` does).

    Parameters
    ----------
    windows : numpy.ndarray
        ``(n, width + 1)`` windows from :func:`make_windows`, in order.
    fraction : float
        Share of windows held out, in ``[0, 1)``. 0 holds none out.
    stride : int
        The stride the windows were made with.

    Returns
    -------
    tuple of numpy.ndarray
        ``(train, heldout)``; either may have zero rows (a short block gives
        all its windows to ``heldout`` rather than leak tokens across the seam).

    Examples
    --------
    >>> w = make_windows(np.arange(20), 2)   # 18 windows, each 3 tokens
    >>> train, heldout = split_heldout(w, 0.2)
    >>> len(train), len(heldout), int(train[-1, -1]) < int(heldout[0, 0])
    (12, 4, True)
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")
    if windows.ndim != 2:
        raise ValueError(f"windows must be 2-D (n, width+1), got shape {windows.shape}")
    n = windows.shape[0]
    n_heldout = math.ceil(fraction * n)
    if n_heldout == 0:
        return windows, windows[:0]
    seam = n - n_heldout
    gap = math.ceil((windows.shape[1] - 1) / stride)
    return windows[: max(0, seam - gap)], windows[seam:]


def windows_for_blocks(
    blocks: Iterable[np.ndarray], width: int, fraction: float = 0.1, *, stride: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Windows of several blocks, split per block and concatenated.

    Windows never span two blocks (a block is the unit of privacy: a window
    that crossed days would belong to two budgets).

    Returns
    -------
    tuple of numpy.ndarray
        ``(train, heldout)``, each ``(m, width + 1)`` int64.
    """
    trains: list[np.ndarray] = []
    heldouts: list[np.ndarray] = []
    for tokens in blocks:
        train, heldout = split_heldout(
            make_windows(tokens, width, stride=stride), fraction, stride=stride
        )
        trains.append(train)
        heldouts.append(heldout)
    empty = np.empty((0, width + 1), dtype=np.int64)
    return (
        np.concatenate(trains) if trains else empty,
        np.concatenate(heldouts) if heldouts else empty,
    )
