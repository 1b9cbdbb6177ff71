"""What a training job is, and what it returns, without importing torch.

The device daemon builds a :class:`TrainJob`, hands it to the warm trainer
process (:mod:`keystay.client.trainer.process`) and gets a
:class:`TrainOutcome` back. Both cross a process boundary by pickle, so they
live here, in a module that needs only numpy: unpickling them in the daemon
must not pull torch into the always-on process.

:attr:`TrainJob.sample_rate` is defined here for the same reason: the daemon
charges the ledger *before* training (write-ahead), so it must know the
Poisson sampling rate the trainer will use without asking the trainer. The
daemon sets it to the run's ``q`` (``poisson_rate``), never ``B / n``: the
signed report names the rate, and ``B / n`` would reveal the window count
``n``. :func:`sample_rate_for` (``B / n``) remains for benchmarks and tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # only for the annotation: the real class imports torch
    from keystay.common.model import ModelConfig


def sample_rate_for(num_examples: int, batch_size: int) -> float:
    """The Poisson sampling rate DP-SGD uses for ``num_examples`` and ``batch_size``.

    ``q = min(1, B / n)``: each training window joins each step's batch
    independently with probability ``q``, so the expected batch size is
    ``q * n = B`` (when ``B <= n``). The ledger charges with this number, so it
    is defined once, here, and the trainer checks that Opacus samples with it.

    Parameters
    ----------
    num_examples : int
        Training windows available, ``n >= 1``.
    batch_size : int
        The expected batch size asked for, ``B >= 1``.

    Returns
    -------
    float
        ``q`` in ``(0, 1]``.

    Examples
    --------
    >>> sample_rate_for(3000, 60)
    0.02
    >>> sample_rate_for(10, 64)
    1.0
    """
    if num_examples < 1:
        raise ValueError(f"DP-SGD needs at least one training window, got {num_examples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    return min(1.0, batch_size / num_examples)


@dataclass(frozen=True)
class TrainJob:
    """One round of local training, as the daemon asks for it.

    Parameters
    ----------
    weights : list of numpy.ndarray
        Starting weights, in the model's ``state_dict`` order.
    train : numpy.ndarray
        Training windows, shape ``(n, window + 1)``, int64 token ids; the last
        column is the token to predict (see :mod:`keystay.common.windows`).
    heldout : numpy.ndarray
        Held-out windows of the same shape (may have zero rows).
    noise_multiplier : float
        ``sigma``: Gaussian noise std divided by the clip norm.
    max_grad_norm : float
        ``C``: every per-example gradient is clipped to this L2 norm.
    steps : int
        Optimizer steps to take, exactly.
    batch_size : int
        Expected Poisson batch size; without ``poisson_rate`` the sampling
        rate is :func:`sample_rate_for` ``(n, batch_size)``.
    learning_rate : float
        Step size of the optimizer.
    seed : int or None
        ``None`` (what the device daemon must use): batch sampling and noise
        draw fresh OS entropy, so nobody, the server included, can predict
        which windows were sampled or subtract the noise (both would void the
        guarantee: the analysis assumes secret sampling and secret noise).
        An integer makes a run reproducible; for tests and benchmarks only.
        Never pass a seed that came from the server.
    config : ModelConfig or None
        Model shape; ``None`` means ``ModelConfig()`` (the shared default).
    optimizer : str
        ``"sgd"`` (momentum 0.9) or ``"adam"``. Either way the privacy
        guarantee is the same: the optimizer only post-processes the noised
        gradient.
    poisson_rate : float or None
        The sampling rate ``q`` to use as is (what the device daemon passes:
        the run's rate, which must not depend on the data, since the report
        names it; ``B / n`` would reveal ``n``). ``None``: ``B / n``.
    record_level_dp : bool
        ``True`` (record-level policies): DP-SGD, as above. ``False``: plain
        minibatch training (:func:`~keystay.client.trainer.dpsgd.train_nondp`),
        for the employee-day mechanism, whose privacy comes from clipping each
        day's whole update and the noise the device adds before masking
        (:mod:`keystay.client.employee_day`); the policy's
        ``record_level_dp`` adds DP-SGD inside.
    """

    weights: list[np.ndarray]
    train: np.ndarray
    heldout: np.ndarray
    noise_multiplier: float
    max_grad_norm: float
    steps: int
    batch_size: int
    learning_rate: float
    seed: int | None = None
    config: ModelConfig | None = None
    optimizer: str = "adam"
    poisson_rate: float | None = None
    record_level_dp: bool = True

    def __post_init__(self) -> None:
        # Checked here (in the daemon) so a bad job fails before it crosses
        # into the trainer process, with a message naming the field.
        if self.train.ndim != 2 or self.train.shape[0] < 1:
            raise ValueError(
                f"train windows must be a non-empty (n, window+1) array, got shape "
                f"{self.train.shape}"
            )
        if self.heldout.ndim != 2 or (
            self.heldout.shape[0] > 0 and self.heldout.shape[1] != self.train.shape[1]
        ):
            raise ValueError(
                f"heldout windows must have shape (m, {self.train.shape[1]}), got "
                f"{self.heldout.shape}"
            )
        if not self.noise_multiplier > 0:
            raise ValueError(f"noise_multiplier must be > 0, got {self.noise_multiplier}")
        if not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.poisson_rate is not None and not 0.0 < self.poisson_rate <= 1.0:
            raise ValueError(f"poisson_rate must be in (0, 1], got {self.poisson_rate}")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")

    @property
    def sample_rate(self) -> float:
        """The Poisson sampling rate this job trains with."""
        if self.poisson_rate is not None:
            return float(self.poisson_rate)
        return sample_rate_for(int(self.train.shape[0]), self.batch_size)


@dataclass(frozen=True)
class TrainOutcome:
    """What one round of local training produced.

    Parameters
    ----------
    weights : list of numpy.ndarray
        Updated weights, same order, shapes and dtypes as the job's.
    train_loss : float
        Mean cross-entropy over the examples of the last 10 non-empty batches.
    heldout_accuracy : float
        Top-1 accuracy on the held-out windows after training (NaN if none).
    heldout_loss : float
        Mean cross-entropy on the held-out windows (NaN if none).
    steps : int
        Optimizer steps taken (equals the job's).
    sample_rate : float
        Poisson sampling rate used.
    num_examples : int
        Training windows sampled from.
    seconds : float
        Wall time of the training call.
    empty_batches : int
        Steps whose Poisson batch was empty (they still add noise and count).
    noise_multiplier : float
        The sigma actually used (echoed so a caller can check it).
    dp : bool
        ``False`` only for :func:`keystay.client.trainer.dpsgd.train_nondp`.
    """

    weights: list[np.ndarray]
    train_loss: float
    heldout_accuracy: float
    heldout_loss: float
    steps: int
    sample_rate: float
    num_examples: int
    seconds: float
    empty_batches: int = 0
    noise_multiplier: float = 0.0
    dp: bool = True
    extra: dict[str, float] = field(default_factory=dict)
