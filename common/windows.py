"""Token streams to training windows, with numpy only.

A *window* is ``width + 1`` consecutive tokens of one block (employee-day):
the first ``width`` are the context, the last is the token to predict. Windows
are the records DP-SGD protects (record-level DP within a block), so the split
into training and held-out windows is made so that no token is in both.

Training windows do not overlap: they are cut ``TRAIN_STRIDE = WINDOW + 1``
tokens apart, so each event (token) is in exactly one training record. With
stride 1 an event sat in up to 33 records, and the ε stated "per record"
was not what one event got (group privacy would multiply it). Now the unit is
plain: :data:`PRIVACY_UNIT`, stated the same way by the device status, the
signed report, the budget report and SECURITY.md. The price is about 33×
fewer records per day, so a run's sampling rate and steps are set for that.

This module must stay free of torch: the daemon cuts windows before handing
them to the trainer process.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

#: Context length of the shared model: 32 tokens predict the 33rd.
WINDOW = 32
#: Distance between training window starts: one window's length, so training
#: records never share an event.
TRAIN_STRIDE = WINDOW + 1
#: The unit of privacy, as signed into every privacy report (``unit``).
PRIVACY_UNIT = (
    f"one training record = {WINDOW + 1} consecutive input events of one employee-day; "
    "records do not overlap, so each event is in exactly one record"
)
#: The same, in a sentence for the people it protects.
PRIVACY_UNIT_SENTENCE = (
    f"The unit protected is one record: {WINDOW + 1} consecutive input events (keys, "
    "clicks) within a day. Records do not overlap, so each event is in exactly one of "
    "them: whether or not any one record was used, the chance of any training outcome "
    "changes by at most a factor e^ε, except with probability δ. A longer stretch of "
    "activity, k records, is protected only at about k·ε (group privacy)."
)


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
    with windows ``stride`` apart that is the ``floor(width / stride)`` windows
    before the seam (``width = windows.shape[1] - 1``; 32 windows at stride 1,
    none at :data:`TRAIN_STRIDE`, where windows share no token). Splitting the
    concatenation of several blocks at once would only guard the last seam:
    call this per block (:func:`windows_for_blocks` does).

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
    # Window i covers tokens [i*stride, i*stride + width]; the first held-out
    # window starts at token seam*stride, so windows i >= seam - width/stride
    # overlap it: floor(width / stride) of them.
    gap = (windows.shape[1] - 1) // stride
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
