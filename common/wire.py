"""Constants of the wire between the ServerApp and the devices' ClientApp.

Design
------
Both ends must read these the same way, so they are written once:

* the ClientApp's Flower ``Error`` codes, so the ServerApp can tell a
  device's policy declining a round (:data:`ERROR_REFUSED`) from a daemon that
  is down (:data:`ERROR_UNAVAILABLE`) or broken (:data:`ERROR_FAILED`);
* the SecAgg+ fit-config key carrying the central-DP clip norm, and each
  device's weight in the secure sum;
* the run-config keys of a training round (:data:`RUN_CONFIG_KEYS`).

The codes sit above Flower's own range (its ``ErrorCode`` values are small
integers) so the two never collide.

>>> ERROR_REFUSED, ERROR_UNAVAILABLE, ERROR_FAILED
(4001, 4002, 4003)
"""

from __future__ import annotations

#: A device's policy declined the round (a decision, not a fault).
ERROR_REFUSED = 4001
#: The device daemon could not be reached.
ERROR_UNAVAILABLE = 4002
#: The device tried and failed (bad request, broken daemon).
ERROR_FAILED = 4003

#: Each device's weight in the secure average: a public constant, never a count.
SECAGG_WEIGHT = 1

#: Run-config keys of one training round, as ``keystay round start`` writes
#: them and the ClientApp reads them.
CONFIG_NOISE_MULTIPLIER = "noise-multiplier"
CONFIG_MAX_GRAD_NORM = "max-grad-norm"
CONFIG_LOCAL_STEPS = "local-steps"
CONFIG_SAMPLE_RATE = "sample-rate"
CONFIG_LEARNING_RATE = "learning-rate"
CONFIG_DP = "dp"
CONFIG_BLOCKS = "blocks"
CONFIG_RUN_NAME = "run-name"
CONFIG_SERVER_ROUND = "server-round"
#: The employee-day mechanism (issue 10): the unit, the per-day update clip C
#: and the day sampling rate q.
CONFIG_PRIVACY_UNIT = "privacy-unit"
CONFIG_UPDATE_CLIP = "update-clip"
CONFIG_DAY_SAMPLE_RATE = "day-sample-rate"
RUN_CONFIG_KEYS = (
    CONFIG_NOISE_MULTIPLIER, CONFIG_MAX_GRAD_NORM, CONFIG_LOCAL_STEPS, CONFIG_SAMPLE_RATE,
    CONFIG_LEARNING_RATE, CONFIG_DP, CONFIG_BLOCKS, CONFIG_RUN_NAME, CONFIG_SERVER_ROUND,
    CONFIG_PRIVACY_UNIT, CONFIG_UPDATE_CLIP, CONFIG_DAY_SAMPLE_RATE,
)
