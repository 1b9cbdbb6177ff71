"""The score of a model on windows, as both sides report it.

Design
------
A device scores a model on its own held-out windows (through its control
socket) and the server scores the global model on simulated employees
(:mod:`keystay.server.heldout`); both report the same pair. It lives apart
from :mod:`keystay.common.model` so code that only carries a score (the
trainer's job messages) does not import torch.

>>> Evaluation(loss=2.5, accuracy=0.25).accuracy
0.25
"""

from __future__ import annotations

from typing import NamedTuple


class Evaluation(NamedTuple):
    """Mean cross-entropy and top-1 accuracy of predicting windows' last token."""

    loss: float
    accuracy: float
