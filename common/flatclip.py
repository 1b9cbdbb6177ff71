"""The flat L2 clip of a model update, as the device and the server both apply it.

Design
------
Under SecAgg+ the device clips its update before masking (the server never
sees it alone), and without SecAgg the server clips each update it receives
(:mod:`keystay.server.central_dp`). Both must compute the same clip, so it is
written once, here: the update is taken as one flat vector, its norm is
computed in float64 and the whole vector is scaled down to ``clip_norm`` when
longer (Flower's FlatClip).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def update_norm(update: Sequence[np.ndarray]) -> float:
    r"""L2 norm of a model update taken as one flat vector.

    Parameters
    ----------
    update : sequence of numpy.ndarray
        The update, one array per model tensor.

    Returns
    -------
    float
        :math:`\sqrt{\sum_i \lVert u_i \rVert_2^2}`, computed in float64.

    Examples
    --------
    >>> update_norm([np.array([3.0]), np.array([[4.0]])])
    5.0
    """
    return float(math.sqrt(sum(float(np.sum(np.square(u, dtype=np.float64))) for u in update)))


def clip_update(
    update: Sequence[np.ndarray], clip_norm: float
) -> tuple[list[np.ndarray], float]:
    """Scale an update so its L2 norm is at most ``clip_norm`` (FlatClip).

    Parameters
    ----------
    update : sequence of numpy.ndarray
        The update (reply weights minus global weights).
    clip_norm : float
        The bound ``S`` (> 0).

    Returns
    -------
    tuple of (list of numpy.ndarray, float)
        The clipped update in float64, and the norm before clipping.
    """
    norm = update_norm(update)
    # norm == 0 would divide by zero; a zero update needs no scaling.
    scale = 1.0 if norm <= clip_norm else clip_norm / norm
    return [np.asarray(u, dtype=np.float64) * scale for u in update], norm
