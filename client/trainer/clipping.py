"""Per-example gradient clipping by book-keeping: one forward, one backward, no hooks on weights.

DP-SGD needs ``sum_i clip_C(grad_i)``, the sum over a batch of each example's
gradient scaled to L2 norm at most ``C``. Opacus materialises every example's
gradient for every parameter with backward hooks (``GradSampleModule``); on
keystay's model that made a DP epoch cost 2.4-4x a non-private one. This
module computes the same sum the way "book-keeping" clipping does (Bu et al.,
*Differentially Private Optimization on Large Model at Small Cost*, ICML 2023;
the ghost-norm trick is Goodfellow 2015 and Li et al. 2022):

1. **Forward** with a forward hook on every layer that owns parameters,
   recording its input. While the step runs the parameters do not require
   gradients, so autograd never computes the (per-batch) weight gradients that
   would be thrown away; each layer's output is made to require a gradient
   instead (the first layer's output becomes a leaf).
2. **One backward**, ``torch.autograd.grad(sum of per-example losses,
   layer outputs)``: the gradient of each example's loss with respect to each
   layer's output, ``g``, for every layer at once. Only activation gradients
   are computed, which a non-private backward computes anyway.
3. **Per-example norms** from ``(a, g)`` per layer, without the full
   per-example gradient where that would be larger:

   * ``Linear`` (and ``Conv1d``, as a Linear over unfolded patches): the
     per-example weight gradient is ``g_i^T a_i`` with ``a_i`` of shape
     ``(L, in)``, ``g_i`` of ``(L, out)``. With ``L = 1`` (keystay's head) its
     squared norm is ``|a_i|^2 |g_i|^2``; otherwise it is either formed with one
     batched matmul (``B L in out`` flops, what the layer's own weight gradient
     costs) or, when ``L (in + out) < in out``, taken as the ghost norm
     ``sum(a_i a_i^T * g_i g_i^T)``.
   * ``Embedding``: ghost norm ``sum_{s,t} [x_s = x_t] g_s . g_t`` (the
     per-example gradient would be a ``vocab x dim`` matrix per example).
   * ``LayerNorm``: the per-example gradients, ``(B, dim)``, are formed
     directly, the normalised input recovered from the output.

   The example's norm is the root of the sum over layers, and its clip factor
   ``min(1, C / (norm + 1e-6))``, exactly Opacus's formula.
4. **The clipped sum**, layer by layer, from the same ``(a, g)``: scaling
   ``g_i`` by example ``i``'s clip factor and contracting over the batch is
   ``sum_i c_i grad_i`` (one matmul per layer, or a ``scatter_add`` for the
   embedding). No second backward pass.

A layer called more than once in a forward (a recurrent cell) contributes
every call: its ``(a, g)`` pairs are concatenated along the position axis,
which is exactly the sum of the calls' per-example gradients.

Supported layers are ``nn.Linear``, ``nn.Conv1d`` (``groups=1``, zero or no
padding), ``nn.Embedding`` (without ``max_norm`` or ``scale_grad_by_freq``)
and ``nn.LayerNorm``. A model with trainable parameters anywhere else is
refused with a message naming the layer: an unsupported parameter would
otherwise go unclipped. Gradients are taken through each layer's own
forward only: a parameter a model also uses outside its layer (a functional
call on ``layer.weight``) would miss that part of its gradient. That costs
accuracy, not privacy: each example's summed contribution is the clip factor
times exactly the gradient whose norm was measured.
``tests/unit/client/test_dpsgd.py`` checks the clipped sums against Opacus's
``GradSampleModule`` on random inputs.

The loss is cross-entropy summed over the batch, so ``g`` holds each
example's own loss gradient (a mean would scale every example by ``1/B``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional

__all__ = ["SUPPORTED_LAYERS", "ClippedSum", "PerExampleClipper"]

#: Layer types whose parameters this module can clip per example.
SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Embedding, nn.LayerNorm)


class _Call(NamedTuple):
    """One call of a layer in the forward: its input, output, and the output's gradient."""

    inp: torch.Tensor
    out: torch.Tensor
    grad: torch.Tensor


_Calls = list[_Call]

# LayerNorm weights at least this large in magnitude let xhat be recovered from the
# output (see _LayerNormPart); the shipped model's start at 1.
_LN_RECOVER_MIN = 0.05

# Opacus's per-sample clip factor is C / (norm + 1e-6), capped at 1; the same here, so
# the clipped sums agree with Opacus's to floating-point tolerance.
_CLIP_EPS = 1e-6


@dataclass(frozen=True)
class ClippedSum:
    """The result of :meth:`PerExampleClipper.clipped_sum` on one batch.

    Parameters
    ----------
    grads : list of torch.Tensor
        ``sum_i clip_C(grad_i)`` for each trainable parameter, in
        :attr:`PerExampleClipper.params` order.
    loss_sum : float
        Sum of the examples' cross-entropy losses.
    norms : torch.Tensor
        Each example's unclipped gradient L2 norm, shape ``(B,)``.
    """

    grads: list[torch.Tensor]
    loss_sum: float
    norms: torch.Tensor


class PerExampleClipper:
    """Computes sums of per-example clipped gradients of a model's parameters.

    Parameters
    ----------
    model : torch.nn.Module
        Every trainable parameter must belong (directly) to a layer in
        :data:`SUPPORTED_LAYERS`.

    Raises
    ------
    ValueError
        If a trainable parameter belongs to another kind of layer, or a
        supported layer uses an option this module does not handle.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.params: list[nn.Parameter] = [p for p in model.parameters() if p.requires_grad]
        self._layers: list[nn.Module] = []
        owner: dict[int, str] = {}
        for name, layer in model.named_modules():
            if not isinstance(layer, SUPPORTED_LAYERS):
                continue
            mine = [p for p in layer.parameters(recurse=False) if p.requires_grad]
            if not mine:
                continue
            _check_layer(name or type(model).__name__, layer)
            self._layers.append(layer)
            for p in mine:
                if id(p) in owner:
                    # Tied weights: the per-example gradient is the sum over both layers,
                    # whose norm is not the sum of the two layers' squared norms.
                    raise ValueError(
                        f"layers {owner[id(p)]!r} and {name!r} share a parameter; "
                        "per-example clipping does not support tied weights"
                    )
                owner[id(p)] = name
        for name, p in model.named_parameters():
            if p.requires_grad and id(p) not in owner:
                # Found under a module that is not a supported layer (a container that
                # only aliases a supported child's parameter is fine: it is owned).
                holder = name.rpartition(".")[0] or type(model).__name__
                layer = model.get_submodule(name.rpartition(".")[0])
                raise ValueError(
                    f"layer {holder!r} ({type(layer).__name__}) has trainable parameters, "
                    "but per-example clipping supports only "
                    f"{', '.join(t.__name__ for t in SUPPORTED_LAYERS)}; freeze it or "
                    "rebuild the model from those layers"
                )

    def clipped_sum(
        self, inputs: torch.Tensor, targets: torch.Tensor, max_grad_norm: float
    ) -> ClippedSum:
        """``sum_i clip_C(grad_i)`` over the batch, for every trainable parameter.

        Parameters
        ----------
        inputs, targets : torch.Tensor
            A non-empty batch: model inputs and class indices for the
            cross-entropy loss.
        max_grad_norm : float
            ``C``.

        Returns
        -------
        ClippedSum
        """
        batch = int(targets.shape[0])
        if batch == 0:
            raise ValueError("clipped_sum needs a non-empty batch; an empty one sums to zero")
        records: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
        handles = [layer.register_forward_hook(_recorder(records)) for layer in self._layers]
        flags = [p.requires_grad for p in self.params]
        try:
            for p in self.params:
                p.requires_grad_(False)
            logits = self.model(inputs)
            loss = functional.cross_entropy(logits, targets, reduction="sum")
            outputs = [out for _, _, out in records]
            grads = torch.autograd.grad(loss, outputs, allow_unused=True)
        finally:
            for handle in handles:
                handle.remove()
            for p, flag in zip(self.params, flags, strict=True):
                p.requires_grad_(flag)

        by_layer: dict[int, _Calls] = {}
        for (layer, inp, out), grad in zip(records, grads, strict=True):
            by_layer.setdefault(id(layer), []).append(
                _Call(inp, out.detach(), grad if grad is not None else torch.zeros_like(out))
            )
        parts = [
            _PARTS[_base(layer)](layer, by_layer[id(layer)])
            for layer in self._layers
            if id(layer) in by_layer
        ]
        squared = torch.zeros(batch, dtype=torch.float64)
        for part in parts:
            squared += part.squared_norms().to(torch.float64)
        norms = squared.sqrt()
        factor = (max_grad_norm / (norms + _CLIP_EPS)).clamp(max=1.0)

        sums: dict[int, torch.Tensor] = {}
        for part in parts:
            sums.update(part.clipped_sums(factor.to(logits.dtype)))
        # A layer the forward never reached has a zero gradient for every example.
        clipped = [sums.get(id(p), torch.zeros_like(p)) for p in self.params]
        return ClippedSum(grads=clipped, loss_sum=float(loss.detach()), norms=norms)


def _check_layer(name: str, layer: nn.Module) -> None:
    if isinstance(layer, nn.Conv1d) and (
        layer.groups != 1 or isinstance(layer.padding, str) or layer.padding_mode != "zeros"
    ):
        raise ValueError(
            f"Conv1d {name!r} uses groups, string padding or non-zero padding mode, "
            "which per-example clipping does not support"
        )
    if isinstance(layer, nn.Embedding) and (
        layer.max_norm is not None or layer.scale_grad_by_freq
    ):
        raise ValueError(
            f"Embedding {name!r} uses max_norm or scale_grad_by_freq, which per-example "
            "clipping does not support"
        )
    base = _base(layer)
    if type(layer).forward is not base.forward:  # a subclass computing something else
        raise ValueError(
            f"layer {name!r} is a {type(layer).__name__}, a subclass of {base.__name__} "
            "with its own forward; per-example clipping cannot know its gradient"
        )


def _base(layer: nn.Module) -> type[nn.Module]:
    """The supported torch class ``layer`` is (an instance of a subclass of)."""
    return next(t for t in SUPPORTED_LAYERS if isinstance(layer, t))


def _recorder(
    records: list[tuple[nn.Module, torch.Tensor, torch.Tensor]],
) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], torch.Tensor]:
    def hook(layer: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
        if not out.requires_grad:
            # Nothing upstream needs a gradient (token ids in, parameters frozen for the
            # step): make the output a leaf, so the backward starts from here.
            out = out.detach().requires_grad_(True)
        records.append((layer, args[0].detach(), out))
        return out

    return hook


class _Part:
    """One layer's activations and output gradients for a batch."""

    def squared_norms(self) -> torch.Tensor:
        """Each example's squared gradient norm over this layer's parameters, ``(B,)``."""
        raise NotImplementedError

    def clipped_sums(self, factor: torch.Tensor) -> dict[int, torch.Tensor]:
        """``{id(param): sum_i factor_i grad_i}`` for this layer's trainable parameters."""
        raise NotImplementedError


def _squared(x: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm of each example's slice of ``x``, ``(B,)``.

    ``vector_norm`` is one fused reduction; ``x.square().sum()`` materialises the
    square first and measured several times slower on the per-example tensors.
    """
    norms: torch.Tensor = torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=1).square()
    return norms


def _cat(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    # torch.cat copies even a single tensor; most layers are called once.
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


class _LinearPart(_Part):
    """``out = a W^T + b`` with ``a`` of shape ``(B, L, in)`` and ``g`` of ``(B, L, out)``.

    ``L`` counts positions (a Linear on a sequence) and calls (a recurrent cell).
    """

    def __init__(self, layer: nn.Module, calls: _Calls) -> None:
        assert isinstance(layer, nn.Linear)
        self.layer = layer
        batch = calls[0][0].shape[0]
        self.a = _cat([inp.reshape(batch, -1, inp.shape[-1]) for inp, _, _ in calls], 1)
        self.g = _cat([grad.reshape(batch, -1, grad.shape[-1]) for _, _, grad in calls], 1)
        self.per_example: torch.Tensor | None = None  # (B, out, in) once formed
        self.weight_trainable = layer.weight.requires_grad
        self.bias_trainable = layer.bias is not None and layer.bias.requires_grad

    def squared_norms(self) -> torch.Tensor:
        a, g = self.a, self.g
        positions, fan_in, fan_out = a.shape[1], a.shape[2], g.shape[2]
        total = torch.zeros(a.shape[0], dtype=a.dtype)
        if self.weight_trainable:
            if positions == 1:  # rank one: |g a^T| = |g| |a|
                total += _squared(a) * _squared(g)
            elif positions * (fan_in + fan_out) < fan_in * fan_out:  # ghost norm is cheaper
                gram = torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))
                total += gram.sum((1, 2))
            else:
                self.per_example = torch.bmm(g.transpose(1, 2), a)
                total += _squared(self.per_example)
        if self.bias_trainable:
            total += _squared(g.sum(1))
        return total

    def clipped_sums(self, factor: torch.Tensor) -> dict[int, torch.Tensor]:
        layer = self.layer
        sums: dict[int, torch.Tensor] = {}
        if self.weight_trainable:
            if self.per_example is not None:
                weight = torch.einsum("b,boi->oi", factor, self.per_example)
            else:
                scaled = self.g * factor[:, None, None]
                weight = scaled.flatten(0, 1).T @ self.a.flatten(0, 1)
            sums[id(layer.weight)] = weight
        if self.bias_trainable:
            sums[id(layer.bias)] = factor @ self.g.sum(1)
        return sums


class _Conv1dPart(_Part):
    """``Conv1d`` as ``kernel_size`` taps, each a Linear over shifted inputs.

    Tap ``j``'s per-example weight gradient is ``g_i x_i[:, j d + s t]^T``, an
    ``(out, in)`` matrix from one batched matmul over a strided view of the
    input; forming the ``(B, in * k, L)`` patch matrix (``unfold``) instead
    measured several times slower than the matmuls themselves. The taps are
    written into one ``(k, B, out, in)`` tensor, so the norms and the clipped
    sum are one reduction and one matmul for the whole layer.
    """

    def __init__(self, layer: nn.Module, calls: _Calls) -> None:
        assert isinstance(layer, nn.Conv1d)
        self.layer = layer
        (kernel,), (dilation,), (stride,) = layer.kernel_size, layer.dilation, layer.stride
        pad = int(layer.padding[0])
        self.taps: torch.Tensor | None = None  # (kernel, B, out, in)
        bias_grad: torch.Tensor | None = None
        for inp, _, grad in calls:
            if inp.dim() != 3:  # an unbatched (C, T) call cannot be per-example
                raise ValueError("per-example clipping needs batched Conv1d inputs (B, C, T)")
            x = functional.pad(inp, (pad, pad)) if pad else inp
            batch, length = grad.shape[0], grad.shape[2]
            taps = grad.new_empty((kernel, batch, grad.shape[1], x.shape[1]))
            for j in range(kernel):
                start = j * dilation
                shifted = x[:, :, start : start + (length - 1) * stride + 1 : stride]
                torch.bmm(grad, shifted.transpose(1, 2), out=taps[j])
            self.taps = taps if self.taps is None else self.taps + taps
            bias_grad = grad.sum(2) if bias_grad is None else bias_grad + grad.sum(2)
        assert bias_grad is not None and self.taps is not None
        self.bias_grad = bias_grad
        self.weight_trainable = layer.weight.requires_grad
        self.bias_trainable = layer.bias is not None and layer.bias.requires_grad

    def squared_norms(self) -> torch.Tensor:
        total = torch.zeros(self.bias_grad.shape[0], dtype=self.bias_grad.dtype)
        if self.weight_trainable:
            assert self.taps is not None
            kernel, batch = self.taps.shape[:2]
            per_tap = torch.linalg.vector_norm(self.taps.view(kernel, batch, -1), dim=2)
            total += per_tap.square().sum(0)
        if self.bias_trainable:
            total += _squared(self.bias_grad)
        return total

    def clipped_sums(self, factor: torch.Tensor) -> dict[int, torch.Tensor]:
        layer = self.layer
        sums: dict[int, torch.Tensor] = {}
        if self.weight_trainable:
            assert self.taps is not None
            kernel, batch, fan_out, fan_in = self.taps.shape
            per_tap = torch.matmul(factor, self.taps.view(kernel, batch, -1))  # (k, out * in)
            sums[id(layer.weight)] = per_tap.view(kernel, fan_out, fan_in).permute(1, 2, 0)
        if self.bias_trainable:
            sums[id(layer.bias)] = factor @ self.bias_grad
        return sums


class _EmbeddingPart(_Part):
    def __init__(self, layer: nn.Module, calls: _Calls) -> None:
        assert isinstance(layer, nn.Embedding)
        self.layer = layer
        batch = calls[0][0].shape[0]
        self.ids = torch.cat([ids.reshape(batch, -1) for ids, _, _ in calls], 1)
        self.g = torch.cat([g.reshape(batch, -1, layer.embedding_dim) for _, _, g in calls], 1)
        if layer.padding_idx is not None:
            # torch gives the padding row no gradient; neither may the clipped sum.
            self.g = self.g * (self.ids != layer.padding_idx).unsqueeze(-1).to(self.g.dtype)

    def squared_norms(self) -> torch.Tensor:
        same = self.ids.unsqueeze(2) == self.ids.unsqueeze(1)  # (B, L, L)
        gram = torch.bmm(self.g, self.g.transpose(1, 2))
        return (gram * same.to(gram.dtype)).sum((1, 2))

    def clipped_sums(self, factor: torch.Tensor) -> dict[int, torch.Tensor]:
        weight = self.layer.weight
        scaled = (self.g * factor[:, None, None]).reshape(-1, weight.shape[1])
        total = torch.zeros_like(weight).index_add_(0, self.ids.reshape(-1), scaled)
        return {id(weight): total}


class _LayerNormPart(_Part):
    """``out = xhat * w + b``: per-example gradients ``sum_t g xhat`` and ``sum_t g``.

    ``xhat`` is recovered from the output as ``(out - b) / w`` when every
    ``|w|`` is at least :data:`_LN_RECOVER_MIN`: that is one subtraction,
    where normalising the input again costs a second layer norm over a
    strided tensor. Below that the division would amplify rounding, so the
    input is normalised again. Either way the norm and the clipped sum use the
    same per-example gradient, so clipping bounds what is summed.
    """

    def __init__(self, layer: nn.Module, calls: _Calls) -> None:
        assert isinstance(layer, nn.LayerNorm)
        self.layer = layer
        shape = tuple(layer.normalized_shape)
        weight, bias = layer.weight, layer.bias
        recover = weight is not None and bool(weight.detach().abs().min() >= _LN_RECOVER_MIN)
        weight_grad = bias_grad = None
        for inp, out, g in calls:
            batch = inp.shape[0]
            b = g.reshape(batch, -1, *shape).sum(1)
            if recover:
                assert weight is not None
                shifted = out if bias is None else out - bias.detach()
                # sum_t g (out - b) / w: divide once per example, after the sum.
                w = (g * shifted).reshape(batch, -1, *shape).sum(1) / weight.detach()
            else:
                normalised = functional.layer_norm(inp, shape, None, None, layer.eps)
                w = (g * normalised).reshape(batch, -1, *shape).sum(1)
            weight_grad = w if weight_grad is None else weight_grad + w
            bias_grad = b if bias_grad is None else bias_grad + b
        assert weight_grad is not None and bias_grad is not None
        self.grads: dict[int, torch.Tensor] = {}
        if weight is not None and weight.requires_grad:
            self.grads[id(weight)] = weight_grad.reshape(batch, -1)
        if bias is not None and bias.requires_grad:
            self.grads[id(bias)] = bias_grad.reshape(batch, -1)
        self.shapes = {id(p): p.shape for p in layer.parameters(recurse=False)}

    def squared_norms(self) -> torch.Tensor:
        return sum(_squared(g) for g in self.grads.values())  # type: ignore[return-value]

    def clipped_sums(self, factor: torch.Tensor) -> dict[int, torch.Tensor]:
        return {key: (factor @ g).reshape(self.shapes[key]) for key, g in self.grads.items()}


_PARTS: dict[type[nn.Module], Callable[[nn.Module, _Calls], _Part]] = {
    nn.Linear: _LinearPart,
    nn.Conv1d: _Conv1dPart,
    nn.Embedding: _EmbeddingPart,
    nn.LayerNorm: _LayerNormPart,
}
