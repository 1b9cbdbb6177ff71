"""A digest of a model update, shared by the device (which signs it) and the server.

The device puts ``update_sha256`` of the weights it returns into its signed
privacy report, so a report is bound to the update it accounts for: a report
paired with a different update does not match. Torch-free (the daemon and the
server both import it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np


def weights_sha256(weights: Sequence[np.ndarray]) -> str:
    """SHA-256 over every array's dtype, shape and C-order bytes, in order.

    Examples
    --------
    >>> weights_sha256([np.zeros(2, dtype="<f4")])[:16]
    'fea49f5b74a04f93'
    """
    digest = hashlib.sha256()
    for array in weights:
        contiguous = np.require(array, requirements="C")
        digest.update(f"{contiguous.dtype.str}{contiguous.shape};".encode())
        digest.update(contiguous.tobytes())
    return digest.hexdigest()
