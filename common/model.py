"""The next-event model, shared by the device (training) and the server (aggregation).

Given the last ``window`` interaction tokens (ids from
:mod:`keystay.common.tokens`), predict the next one. The model is a stand-in
for "a model of how people use computers": small on purpose, so DP-SGD's
per-example gradients stay cheap on a laptop CPU.

Every layer is one Opacus computes per-example gradients for natively
(``nn.Embedding``, ``nn.Conv1d``, ``nn.Linear``, ``nn.LayerNorm``): no
recurrent layers (Opacus needs its slower ``DPGRU``/``DPLSTM`` re-implementations
for those; see ``bench/bench_models.py``) and no BatchNorm (it mixes examples in
a batch, which per-example clipping cannot bound).

Two architectures share one config:

``"conv"`` (default)
    Embedding -> 1x1 conv to ``channels`` -> ``layers`` residual blocks of
    causal dilated ``Conv1d`` (dilations 1, 2, 4, ...) with LayerNorm and
    ReLU -> LayerNorm -> Linear(vocab) on the last position.
``"mlp"``
    Embedding -> flatten the window -> Linear -> ReLU -> LayerNorm ->
    Linear(vocab).

The one call a user of a trained model makes::

    from keystay.common.model import load_checkpoint, predict_next
    model = load_checkpoint("runs/demo/final.pt")  # written by the ServerApp
    probs = predict_next(model, last_tokens)   # shape (vocab_size,)
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from keystay.common.evaluation import Evaluation
from keystay.common.files import private_writer
from keystay.common.tokens import VOCAB_SIZE, VOCAB_VERSION, token_id
from keystay.common.windows import WINDOW

CHECKPOINT_FORMAT = "keystay.next-event-model"
CHECKPOINT_VERSION = 1
_CHECKPOINT_KEYS = frozenset(
    {"format", "version", "vocab_version", "config", "state_dict", "meta", "sha256"}
)

# Short contexts are left-padded with the vocabulary's "<pad>" token (id 0).
PAD_ID = token_id("<pad>")



#: Bounds on a model description (a checkpoint's config is not trusted). The
#: shipped model has about 35,000 parameters.
MAX_PARAMETERS = 50_000_000
MAX_LAYERS = 64

@dataclass(frozen=True)
class ModelConfig:
    """The shape of a :class:`NextEventModel`.

    Parameters
    ----------
    vocab_size : int
        Number of token ids; defaults to the shared vocabulary's size
        (``keystay.common.tokens.VOCAB_SIZE``).
    window : int
        Context length in tokens (``keystay.common.windows.WINDOW``); the model
        predicts token ``window + 1``.
    embed_dim : int
        Token embedding width.
    channels : int
        Width of the convolution stack (``"conv"``).
    layers : int
        Residual causal-convolution blocks (``"conv"``); block ``i`` has
        dilation ``2**i``, so the receptive field is
        ``1 + (kernel_size - 1) * (2**layers - 1)`` tokens.
    kernel_size : int
        Convolution kernel width (``"conv"``).
    arch : str
        ``"conv"`` or ``"mlp"``.
    hidden : int
        Hidden width of the ``"mlp"`` architecture.
    """

    vocab_size: int = VOCAB_SIZE
    window: int = WINDOW
    embed_dim: int = 32
    channels: int = 32
    layers: int = 5
    kernel_size: int = 3
    arch: str = "conv"
    hidden: int = 128

    def __post_init__(self) -> None:
        for name in ("vocab_size", "window", "embed_dim", "channels", "kernel_size", "hidden"):
            value = getattr(self, name)
            if int(value) < 1:
                raise ValueError(f"ModelConfig.{name} must be at least 1, got {value}")
        if self.vocab_size < 2:
            raise ValueError(f"ModelConfig.vocab_size must be at least 2, got {self.vocab_size}")
        if self.layers < 0:
            raise ValueError(f"ModelConfig.layers must be >= 0, got {self.layers}")
        if self.arch not in ("conv", "mlp"):
            raise ValueError(f"ModelConfig.arch must be 'conv' or 'mlp', got {self.arch!r}")
        # A config can come from a checkpoint file, which is not trusted: a
        # model built from one with huge dimensions would take all memory
        # before any check of its weights could refuse it.
        if self.layers > MAX_LAYERS:
            raise ValueError(f"ModelConfig.layers must be at most {MAX_LAYERS}, got {self.layers}")
        size = self.parameter_bound()
        if size > MAX_PARAMETERS:
            raise ValueError(
                f"ModelConfig describes about {size:,} parameters; keystay's models have at "
                f"most {MAX_PARAMETERS:,}"
            )

    def parameter_bound(self) -> int:
        """An upper bound on the model's parameter count, computed without building it.

        >>> ModelConfig().parameter_bound() >= sum(p.numel() for p in NextEventModel().parameters())
        True
        """
        width = max(self.embed_dim, self.channels, self.hidden)
        body = (self.layers + 1) * (self.kernel_size + 1) * width * (width + 2)
        flat = (self.window + 1) * width * (width + 1) if self.arch == "mlp" else 0
        return (self.vocab_size + 1) * (width + 1) * 2 + body + flat

    def to_dict(self) -> dict[str, Any]:
        """Plain types only, for checkpoints and JSON."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error (a newer format)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"model config has fields this keystay does not know: {unknown}; "
                "the checkpoint was written by a newer version, upgrade keystay"
            )
        return cls(**dict(data))


class CausalConvBlock(nn.Module):
    """Pre-norm residual block: ``x + Conv1d(ReLU(LayerNorm(x)))``, left-padded.

    Left padding by ``(kernel_size - 1) * dilation`` keeps position ``t``
    a function of positions ``<= t`` only.
    """

    def __init__(self, channels: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        self.left_pad = (kernel_size - 1) * dilation
        self.norm = nn.LayerNorm(channels)
        self.conv = nn.Conv1d(channels, channels, kernel_size, dilation=dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, channels, time)
        h = self.norm(x.transpose(1, 2)).transpose(1, 2)
        h = self.conv(functional.pad(functional.relu(h), (self.left_pad, 0)))
        out: torch.Tensor = x + h
        return out


class NextEventModel(nn.Module):
    """Predicts the next token from a window of ``config.window`` tokens.

    ``forward`` takes int64 ids of shape ``(batch, window)`` and returns
    logits of shape ``(batch, vocab_size)``.

    Parameters
    ----------
    config : ModelConfig or None
        Shape of the model; ``None`` means ``ModelConfig()``.
    """

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else ModelConfig()
        self.meta: dict[str, Any] = {}
        c = self.config
        self.embed = nn.Embedding(c.vocab_size, c.embed_dim)
        if c.arch == "conv":
            self.proj = nn.Conv1d(c.embed_dim, c.channels, kernel_size=1)
            self.blocks = nn.ModuleList(
                CausalConvBlock(c.channels, c.kernel_size, 2**i) for i in range(c.layers)
            )
            self.out_norm = nn.LayerNorm(c.channels)
            self.head = nn.Linear(c.channels, c.vocab_size)
        else:
            self.fc = nn.Linear(c.window * c.embed_dim, c.hidden)
            self.out_norm = nn.LayerNorm(c.hidden)
            self.head = nn.Linear(c.hidden, c.vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        e = self.embed(tokens)  # (batch, window, embed)
        if self.config.arch == "conv":
            x = self.proj(e.transpose(1, 2))  # (batch, channels, window)
            for block in self.blocks:
                x = block(x)
            h = x[:, :, -1]  # the last position has seen the whole window
        else:
            h = functional.relu(self.fc(e.flatten(1)))
        logits: torch.Tensor = self.head(self.out_norm(h))
        return logits


def initial_weights(config: ModelConfig | None = None, seed: int = 0) -> list[np.ndarray]:
    """Freshly initialised weights, the same for the same config and seed.

    The global torch RNG is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = NextEventModel(config)
    return get_weights(model)


def get_weights(model: nn.Module) -> list[np.ndarray]:
    """The model's ``state_dict`` values as numpy arrays (copies), in order."""
    return [v.detach().cpu().numpy().copy() for v in model.state_dict().values()]


def set_weights(model: nn.Module, weights: Sequence[np.ndarray]) -> None:
    """Load ``weights`` (``state_dict`` order) into ``model``, checking every shape."""
    state = model.state_dict()
    if len(weights) != len(state):
        raise ValueError(
            f"got {len(weights)} weight arrays but the model has {len(state)} tensors; "
            "the weights come from a different model configuration"
        )
    new_state = {}
    for (name, current), array in zip(state.items(), weights, strict=True):
        if tuple(array.shape) != tuple(current.shape):
            raise ValueError(
                f"weight {name!r} has shape {tuple(array.shape)} but the model expects "
                f"{tuple(current.shape)}; the weights come from a different model configuration"
            )
        if not np.all(np.isfinite(array)):
            raise ValueError(f"weight {name!r} holds NaN or infinite values; refusing to load it")
        new_state[name] = torch.as_tensor(np.asarray(array), dtype=current.dtype)
    model.load_state_dict(new_state)


@dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint file holds."""

    config: ModelConfig
    weights: list[np.ndarray]
    meta: dict[str, Any]


def save_checkpoint(
    path: str | os.PathLike[str],
    weights: Sequence[np.ndarray],
    config: ModelConfig,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write weights, config and ``meta`` to ``path`` atomically.

    The file holds only tensors and plain Python types, so
    :func:`load_checkpoint` reads it with ``torch.load(weights_only=True)``
    (no code runs on load). ``meta`` must be JSON-serialisable (round, run id,
    epsilon figures, ...).
    """
    path = Path(path)
    meta = dict(meta or {})
    try:
        meta = json.loads(json.dumps(meta))  # plain types only, a copy
    except (TypeError, ValueError) as error:
        raise ValueError(f"checkpoint meta must be JSON-serialisable: {error}") from error
    model = NextEventModel(config)
    set_weights(model, weights)  # checks the weights fit the config
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "vocab_version": VOCAB_VERSION,
        "config": config.to_dict(),
        "state_dict": state,
        "meta": meta,
        "sha256": _checkpoint_digest(config.to_dict(), [t.numpy() for t in state.values()], meta),
    }
    # Write then rename: a reader never sees half a checkpoint.
    with private_writer(path) as f:
        torch.save(payload, f)
    return path


def _checkpoint_digest(config: Mapping[str, Any], weights: Sequence[np.ndarray],
                       meta: Mapping[str, Any]) -> str:
    """SHA-256 over the config, the weights and the meta.

    torch's zip container does not check its CRCs on load, so without this a
    flipped bit in a weight (or in ``meta``) would load silently as a
    different model.
    """
    import hashlib

    from keystay.common.digest import weights_sha256

    text = json.dumps({"config": config, "meta": meta}, sort_keys=True)
    return hashlib.sha256(text.encode() + weights_sha256(weights).encode()).hexdigest()


def read_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read a checkpoint's config, weights (``state_dict`` order) and meta.

    Raises
    ------
    FileNotFoundError
        There is no file at ``path``.
    ValueError
        Naming ``path`` and what is wrong: not a checkpoint, another version
        or vocabulary, damaged (the digest does not match), or contents that
        do not make a model. Nothing of a damaged file is returned.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model checkpoint at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(
            f"{path} is not a keystay model checkpoint (torch.load failed: {error})"
        ) from error
    try:
        return _checkpoint_from_payload(path, payload)
    except (KeyError, TypeError, AttributeError, ValueError, RuntimeError) as error:
        if str(path) in str(error):
            raise
        raise ValueError(f"{path} is not a valid keystay model checkpoint ({error})") from error


def _checkpoint_from_payload(path: Path, payload: Any) -> Checkpoint:
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a keystay model checkpoint (format field missing)")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise ValueError(
            f"{path} has checkpoint version {payload.get('version')}; this keystay reads "
            f"version {CHECKPOINT_VERSION}"
        )
    if payload.get("vocab_version") != VOCAB_VERSION:
        # Token ids changed meaning between vocabularies: such a model predicts nonsense.
        raise ValueError(
            f"{path} was trained on token vocabulary version {payload.get('vocab_version')}, "
            f"this keystay uses version {VOCAB_VERSION}; retrain the model"
        )
    unknown = sorted(str(k) for k in set(payload) - _CHECKPOINT_KEYS)
    if unknown:  # a damaged key name would otherwise hide the digest
        raise ValueError(f"{path} holds entries this keystay does not know: {unknown}")
    config = ModelConfig.from_dict(payload["config"])
    model = NextEventModel(config)
    expected = list(model.state_dict())
    state = payload["state_dict"]
    if list(state) != expected:
        raise ValueError(
            f"{path} holds tensors {list(state)} but a model of its config has {expected}"
        )
    weights = [t.numpy().copy() for t in state.values()]
    meta = dict(payload.get("meta", {}))
    # Checkpoints written before the digest have none; every one written now does.
    if "sha256" in payload and payload["sha256"] != _checkpoint_digest(
        payload["config"], weights, meta
    ):
        raise ValueError(
            f"{path} is damaged: its contents do not match the digest written with it"
        )
    return Checkpoint(config=config, weights=weights, meta=meta)


def load_checkpoint(path: str | os.PathLike[str]) -> NextEventModel:
    """Load a trained model from a checkpoint, ready for :func:`predict_next`.

    Parameters
    ----------
    path : str or path-like
        A file written by :func:`save_checkpoint` (the server writes one per round).

    Returns
    -------
    NextEventModel
        In eval mode, on the CPU; ``model.meta`` holds the checkpoint's metadata.
    """
    checkpoint = read_checkpoint(path)
    model = NextEventModel(checkpoint.config)
    set_weights(model, checkpoint.weights)
    model.meta = checkpoint.meta
    model.eval()
    return model


def _context(model: NextEventModel, window_tokens: Sequence[int] | np.ndarray) -> torch.Tensor:
    tokens = np.asarray(window_tokens, dtype=np.int64)
    if tokens.ndim == 1:
        tokens = tokens[None, :]
    if tokens.ndim != 2:
        raise ValueError(f"window_tokens must be 1-D or 2-D, got shape {tokens.shape}")
    w = model.config.window
    if tokens.shape[1] >= w:
        tokens = tokens[:, -w:]
    else:  # too little context: left-pad, as the start of a recording would be
        tokens = np.pad(tokens, ((0, 0), (w - tokens.shape[1], 0)), constant_values=PAD_ID)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= model.config.vocab_size):
        raise ValueError(f"token ids must be in [0, {model.config.vocab_size})")
    return torch.from_numpy(np.ascontiguousarray(tokens))


def predict_next(
    model: NextEventModel, window_tokens: Sequence[int] | np.ndarray
) -> np.ndarray:
    """Probabilities of each token id coming next.

    Parameters
    ----------
    model : NextEventModel
    window_tokens : sequence of int or numpy.ndarray
        The most recent tokens, oldest first: 1-D for one context, 2-D
        ``(batch, length)`` for several. Only the last ``window`` are used;
        shorter contexts are left-padded with ``<pad>``.

    Returns
    -------
    numpy.ndarray
        Shape ``(vocab_size,)`` for 1-D input, ``(batch, vocab_size)`` for 2-D;
        rows sum to 1.
    """
    x = _context(model, window_tokens)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            probs = torch.softmax(model(x), dim=-1).numpy()
    finally:
        model.train(was_training)
    return probs[0] if np.asarray(window_tokens).ndim == 1 else probs


def evaluate(model: nn.Module, windows: np.ndarray, *, batch_size: int = 2048) -> Evaluation:
    """Mean cross-entropy and top-1 accuracy of predicting each window's last token.

    Returns ``Evaluation(nan, nan)`` for zero windows.
    """
    if windows.shape[0] == 0:
        return Evaluation(float("nan"), float("nan"))
    was_training = model.training
    model.eval()
    correct = 0
    loss_sum = 0.0
    try:
        with torch.no_grad():
            for start in range(0, windows.shape[0], batch_size):
                chunk = torch.from_numpy(
                    np.ascontiguousarray(windows[start : start + batch_size], dtype=np.int64)
                )
                logits = model(chunk[:, :-1])
                target = chunk[:, -1]
                loss_sum += float(functional.cross_entropy(logits, target, reduction="sum"))
                correct += int((logits.argmax(dim=-1) == target).sum())
    finally:
        model.train(was_training)
    n = windows.shape[0]
    return Evaluation(loss_sum / n, correct / n)
