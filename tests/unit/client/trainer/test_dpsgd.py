"""DP-SGD training (trainer.dpsgd), its per-example clipping (trainer.clipping), the job types."""

from __future__ import annotations

import doctest
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import replace

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from scipy import stats
from torch import nn
from torch.nn import functional

from keystay.client.trainer import job as job_module
from keystay.client.trainer.clipping import PerExampleClipper
from keystay.client.trainer.dpsgd import train_dp, train_nondp
from keystay.client.trainer.job import TrainJob, sample_rate_for
from keystay.common.model import ModelConfig, NextEventModel, evaluate, initial_weights, set_weights
from keystay.common.windows import WINDOW, make_windows, split_heldout

# Small enough that a step takes milliseconds.
SMALL = ModelConfig(vocab_size=32, embed_dim=16, channels=16, layers=5)


def _random_windows(n: int, vocab: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, vocab, size=(n, WINDOW + 1))


def _job(**overrides: object) -> TrainJob:
    fields: dict[str, object] = {
        "weights": initial_weights(SMALL, seed=0),
        "train": _random_windows(200),
        "heldout": _random_windows(20, seed=1),
        "noise_multiplier": 1.0,
        "max_grad_norm": 1.0,
        "steps": 5,
        "batch_size": 16,
        "learning_rate": 1e-3,
        "seed": 0,
        "config": SMALL,
    }
    fields.update(overrides)
    return TrainJob(**fields)  # type: ignore[arg-type]


@pytest.fixture
def optimizer_steps(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts the steps the underlying optimizer really takes (after Opacus's noise)."""
    calls: list[int] = []
    for cls in (torch.optim.Adam, torch.optim.SGD):
        original = cls.step

        def counted(self: torch.optim.Optimizer, *a: object, _o=original, **k: object) -> object:
            calls.append(1)
            return _o(self, *a, **k)

        monkeypatch.setattr(cls, "step", counted)
    yield calls


def _delta_norm(before: list[np.ndarray], after: list[np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(before, after, strict=True))))


@pytest.mark.parametrize("steps", [1, 7, 23])
def test_takes_exactly_the_steps_asked_for(steps: int, optimizer_steps: list[int]) -> None:
    # q = 0.5: one pass of the Poisson loader is 2 batches, so 7 and 23 steps need
    # the loader to be iterated again and again.
    outcome = train_dp(_job(train=_random_windows(40), batch_size=20, steps=steps))
    assert outcome.steps == steps
    assert len(optimizer_steps) == steps


def test_empty_poisson_batches_are_steps_too(optimizer_steps: list[int]) -> None:
    # q = 1/50: a batch is empty with probability 0.98**50 = 0.36.
    job = _job(train=_random_windows(50), batch_size=1, steps=30)
    outcome = train_dp(job)
    assert outcome.empty_batches > 0
    assert len(optimizer_steps) == 30
    assert all(np.isfinite(w).all() for w in outcome.weights)


def test_weights_change_and_keep_their_shapes() -> None:
    job = _job()
    outcome = train_dp(job)
    assert [w.shape for w in outcome.weights] == [w.shape for w in job.weights]
    assert [w.dtype for w in outcome.weights] == [w.dtype for w in job.weights]
    assert _delta_norm(job.weights, outcome.weights) > 0
    assert outcome.dp and outcome.noise_multiplier == 1.0
    assert outcome.num_examples == 200
    assert outcome.sample_rate == sample_rate_for(200, 16) == 16 / 200


def test_same_seed_same_result_and_no_seed_is_fresh() -> None:
    a = train_dp(_job(seed=7))
    b = train_dp(_job(seed=7))
    assert all(np.array_equal(x, y) for x, y in zip(a.weights, b.weights, strict=True))
    c = train_dp(_job(seed=None))
    d = train_dp(_job(seed=None))
    assert not all(np.array_equal(x, y) for x, y in zip(c.weights, d.weights, strict=True))


def test_noise_is_added_and_scales_with_sigma() -> None:
    # Plain SGD on the same batches: the update's size grows with the noise multiplier.
    base = _job(optimizer="sgd", learning_rate=0.01, steps=3)
    quiet = train_dp(replace(base, noise_multiplier=1e-3))
    loud = train_dp(replace(base, noise_multiplier=50.0))
    assert _delta_norm(base.weights, loud.weights) > 10 * _delta_norm(base.weights, quiet.weights)


def test_gradients_are_clipped() -> None:
    # Almost no noise: the update is the clipped gradient, so a tiny clip norm shrinks it.
    base = _job(optimizer="sgd", learning_rate=0.01, steps=1, noise_multiplier=1e-6)
    wide = train_dp(replace(base, max_grad_norm=100.0))
    tight = train_dp(replace(base, max_grad_norm=1e-3))
    assert _delta_norm(base.weights, tight.weights) < 0.01 * _delta_norm(base.weights, wide.weights)


def test_learns_a_learnable_sequence() -> None:
    # A repeating 7-token pattern: the next token is a function of the context.
    tokens = np.tile(np.array([3, 9, 4, 1, 5, 9, 2]), 300)
    train, heldout = split_heldout(make_windows(tokens, WINDOW), 0.1)
    weights = initial_weights(SMALL, seed=0)
    model = NextEventModel(SMALL)
    set_weights(model, weights)
    before = evaluate(model, heldout)
    outcome = train_dp(
        TrainJob(
            weights=weights,
            train=train,
            heldout=heldout,
            noise_multiplier=0.8,
            max_grad_norm=1.0,
            steps=60,
            batch_size=64,
            learning_rate=1e-2,
            seed=0,
            config=SMALL,
        )
    )
    assert outcome.heldout_loss < 0.5 * before.loss
    assert outcome.heldout_accuracy > 0.9
    assert outcome.train_loss < before.loss


def test_nondp_baseline() -> None:
    outcome = train_nondp(_job(steps=4))
    assert not outcome.dp
    assert outcome.steps == 4
    assert outcome.noise_multiplier == 0.0


def test_rejects_windows_of_another_width() -> None:
    with pytest.raises(ValueError, match="make_windows"):
        train_dp(_job(train=np.ones((50, 10), dtype=np.int64), heldout=np.ones((0, 10))))


def test_rejects_tokens_outside_the_vocabulary() -> None:
    with pytest.raises(ValueError, match="vocabularies"):
        train_dp(_job(train=_random_windows(50, vocab=100)))


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("noise_multiplier", 0.0, "noise_multiplier"),
        ("max_grad_norm", -1.0, "max_grad_norm"),
        ("steps", 0, "steps"),
        ("batch_size", 0, "batch_size"),
        ("learning_rate", 0.0, "learning_rate"),
        ("optimizer", "lbfgs", "optimizer"),
        ("train", np.ones((0, WINDOW + 1), dtype=np.int64), "non-empty"),
        ("heldout", np.ones((3, 5), dtype=np.int64), "heldout"),
    ],
)
def test_job_validation(field: str, value: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _job(**{field: value})


def test_sample_rate() -> None:
    assert sample_rate_for(3000, 64) == 64 / 3000
    assert sample_rate_for(10, 64) == 1.0
    with pytest.raises(ValueError):
        sample_rate_for(0, 64)
    result = doctest.testmod(job_module)
    assert result.attempted > 0 and result.failed == 0


def test_job_module_does_not_import_torch() -> None:
    code = "import keystay.client.trainer.job, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- per-example clipping against Opacus -------------------------------------------------


class _Mixed(nn.Module):
    """Every code path of the clipper: padded and strided convs (one called twice),
    a Linear over a sequence and one called twice, LayerNorm over 3-D input, a frozen layer, and
    optionally an Embedding with a padding index."""

    def __init__(
        self, vocab: int = 20, padding_idx: int | None = None, tiny_norm: bool = False
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 8, padding_idx=padding_idx)
        self.conv = nn.Conv1d(8, 6, kernel_size=3, padding=2, dilation=2)
        self.strided = nn.Conv1d(6, 6, kernel_size=2, stride=2, bias=False)
        self.norm = nn.LayerNorm(6)
        if tiny_norm:  # too small to divide by: the clipper normalises the input again
            with torch.no_grad():
                self.norm.weight[0] = 1e-4
        self.seq = nn.Linear(6, 6)  # on (B, T, 6): ghost or per-example path
        self.twice = nn.Linear(6, 6)  # called on two positions: a "recurrent" layer
        self.frozen = nn.Linear(6, 6)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(6, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(self.embed(tokens).transpose(1, 2)))
        x = self.strided(h) + self.strided(h.flip(-1))  # a conv called twice
        h = self.seq(self.norm(x.transpose(1, 2)))
        first, last = self.twice(h[:, 0]), self.twice(h[:, -1])
        return self.head(torch.tanh(first + last) + self.frozen(h[:, 1]))


def _opacus_clipped_sums(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    sampled = GradSampleModule(model, loss_reduction="sum")
    try:
        functional.cross_entropy(sampled(x), y, reduction="sum").backward()
        params = [p for p in model.parameters() if p.requires_grad]
        per_sample = [p.grad_sample.flatten(1) for p in params]  # type: ignore[union-attr]
        norms = torch.cat(per_sample, 1).norm(dim=1)
        factor = (clip / (norms + 1e-6)).clamp(max=1.0)
        return norms, [(factor @ g).view_as(p) for g, p in zip(per_sample, params, strict=True)]
    finally:
        sampled._close()


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # Opacus's hooks, token ids in
@pytest.mark.parametrize(
    "make",
    [
        lambda: NextEventModel(SMALL),
        lambda: NextEventModel(ModelConfig()),
        lambda: NextEventModel(ModelConfig(vocab_size=32, arch="mlp")),
        lambda: _Mixed(),
        lambda: _Mixed(tiny_norm=True),
    ],
    ids=["conv-small", "conv-shipped", "mlp", "mixed", "mixed-tiny-layernorm-weight"],
)
@pytest.mark.parametrize("clip", [0.05, 1e3])  # every example clipped / none clipped
def test_clipped_sums_match_opacus(make: Callable[[], nn.Module], clip: float) -> None:
    torch.manual_seed(0)
    model = make()
    vocab = model.config.vocab_size if isinstance(model, NextEventModel) else 20
    x = torch.randint(0, vocab, (23, WINDOW))
    y = torch.randint(0, vocab, (23,))
    ours = PerExampleClipper(model).clipped_sum(x, y, clip)
    # The clipper leaves no trace: parameters trainable as before, no .grad written.
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()].count(False) == (
        2 if isinstance(model, _Mixed) else 0
    )
    norms, reference = _opacus_clipped_sums(model, x, y, clip)
    torch.testing.assert_close(ours.norms.float(), norms, rtol=1e-4, atol=1e-6)
    assert len(ours.grads) == len(reference)
    for got, want in zip(ours.grads, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_unclipped_sum_is_the_true_gradient_with_a_padding_index() -> None:
    # Opacus (1.6) gives the padding row of an Embedding(padding_idx=...) per-sample
    # gradients that torch never applies, so it cannot be the reference here:
    # with no clipping the sum must equal autograd's gradient, padding row zero.
    torch.manual_seed(1)
    model = _Mixed(padding_idx=0)
    x = torch.randint(0, 20, (11, WINDOW))
    x[:, :4] = 0
    y = torch.randint(0, 20, (11,))
    ours = PerExampleClipper(model).clipped_sum(x, y, 1e6)
    functional.cross_entropy(model(x), y, reduction="sum").backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    for got, p in zip(ours.grads, trainable, strict=True):
        torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-6)
    assert torch.all(ours.grads[0][0] == 0)


def test_clipper_refuses_what_it_cannot_clip() -> None:
    class WithGRU(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.GRU(4, 4)

    with pytest.raises(ValueError, match=r"'rnn' \(GRU\).*supports only"):
        PerExampleClipper(WithGRU())

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight

    with pytest.raises(ValueError, match="tied"):
        PerExampleClipper(Tied())
    with pytest.raises(ValueError, match="groups"):
        PerExampleClipper(nn.Conv1d(4, 4, 3, groups=2))


# --- the mechanism: noise on the sum, Poisson batches, fresh randomness ------------------


def _first_update(job: TrainJob) -> np.ndarray:
    """``(w1 - w0) / lr`` for a one-step SGD job: minus the noised, scaled gradient.

    SGD with momentum's first step moves by ``lr * grad`` exactly.
    """
    outcome = train_dp(replace(job, optimizer="sgd", steps=1))
    pairs = zip(job.weights, outcome.weights, strict=True)
    return np.concatenate([((b - a) / job.learning_rate).ravel() for a, b in pairs])


def test_noise_has_std_sigma_c_on_the_sum_divided_by_the_expected_batch() -> None:
    # sigma * C dwarfs the clipped sum (at most C), so the update is the noise:
    # -(sigma * C * z) / (q * n) with z standard normal in every coordinate.
    job = _job(noise_multiplier=1e4, max_grad_norm=0.5, learning_rate=1.0, seed=None)
    update = _first_update(job)
    expected_batch = job.sample_rate * job.train.shape[0]
    z = -update * expected_batch / (job.noise_multiplier * job.max_grad_norm)
    assert abs(z.std() - 1) < 5 / np.sqrt(2 * z.size)
    assert abs(z.mean()) < 5 / np.sqrt(z.size)


def _recovered_noise(seed: int | None) -> np.ndarray:
    job = _job(noise_multiplier=1e4, learning_rate=1.0, seed=seed)
    return -_first_update(job) * job.sample_rate * job.train.shape[0] / 1e4


def test_rounds_with_the_same_public_inputs_get_unrelated_noise() -> None:
    a, b = _recovered_noise(None), _recovered_noise(None)
    assert abs(np.corrcoef(a, b)[0, 1]) < 5 / np.sqrt(a.size)
    # Sanity of the recovery itself: the same seed recovers the same noise.
    np.testing.assert_allclose(_recovered_noise(3), _recovered_noise(3), rtol=0, atol=1e-3)


def _best_torch_seed_match(noise: np.ndarray, seeds: list[int]) -> float:
    """The highest |correlation| of ``noise`` with torch's draws under any of ``seeds``."""
    best = 0.0
    for seed in seeds:
        for draw in (
            torch.randn(noise.size, generator=torch.Generator().manual_seed(seed)),
            torch.normal(0.0, 1.0, (noise.size,), generator=torch.Generator().manual_seed(seed)),
        ):
            best = max(best, abs(float(np.corrcoef(noise, draw.numpy())[0, 1])))
    return best


def test_noise_is_not_any_sampled_torch_seed() -> None:
    # The attack on the old trainer: its noise came from torch.Generator, which keeps
    # 32 seed bits, so a search over seeds finds the one whose randn matches. A sample
    # of such seeds (the small ones and random 32-bit ones) never comes close here.
    rng = np.random.default_rng(0)
    seeds = list(range(100)) + [int(s) for s in rng.integers(0, 2**32, size=150)]
    noise = _recovered_noise(None)[:512]  # the first parameter's noise is drawn first
    assert _best_torch_seed_match(noise, seeds) < 0.3
    # Control: the same search does find noise that did come from one of those seeds.
    planted = torch.randn(512, generator=torch.Generator().manual_seed(seeds[-1])).numpy()
    assert _best_torch_seed_match(planted + 0.01 * noise, seeds) > 0.99


def _record_batches(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    original = PerExampleClipper.clipped_sum

    def recording(self: PerExampleClipper, x: torch.Tensor, y: torch.Tensor, c: float) -> object:
        seen.append(x.clone())
        return original(self, x, y, c)

    monkeypatch.setattr(PerExampleClipper, "clipped_sum", recording)
    return seen


def test_fresh_rounds_sample_different_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _record_batches(monkeypatch)
    job = _job(steps=3, seed=None)
    train_dp(job)
    train_dp(job)
    first, second = seen[:3], seen[3:]
    assert len(first) == len(second) == 3
    assert any(
        a.shape != b.shape or not torch.equal(a, b) for a, b in zip(first, second, strict=True)
    )


def test_poisson_batch_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    # n = 200, q = 0.05: sizes are Binomial(200, 0.05), mean 10, variance 9.5, and
    # P(empty) = 0.95**200 ~ 3.5e-5, so over 400 steps no batch should be empty
    # while a few have 3 or fewer examples.
    seen = _record_batches(monkeypatch)
    outcome = train_dp(_job(batch_size=10, steps=400, seed=11))
    sizes = np.array([len(x) for x in seen])
    assert outcome.empty_batches == 400 - len(sizes)
    assert abs(sizes.mean() - 10) < 5 * np.sqrt(9.5 / 400)
    assert 9.5 * 0.7 < sizes.var() < 9.5 * 1.3
    assert sizes.min() < 10 < sizes.max()  # variable, never a fixed batch
    assert stats.chisquare(
        np.bincount(np.clip(sizes, 4, 16) - 4, minlength=13),
        400 * np.diff(np.concatenate(([0.0], stats.binom.cdf(np.arange(4, 16), 200, 0.05), [1.0]))),
    ).pvalue > 1e-4


def test_train_dp_draws_nothing_from_torch_generators(monkeypatch: pytest.MonkeyPatch) -> None:
    # Any torch RNG call on the DP path (dropout, randn, a DataLoader sampler) fails.
    job = _job(seed=None, steps=3)  # initial_weights seeds torch; that is not the DP path

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch RNG used on the DP path")

    for name in ("randn", "normal", "rand", "randperm", "bernoulli", "randint"):
        monkeypatch.setattr(torch, name, refuse)
    monkeypatch.setattr(torch, "Generator", refuse)
    monkeypatch.setattr(torch, "manual_seed", refuse)
    assert train_dp(job).steps == 3


def test_read_only_windows_are_copied_without_a_warning() -> None:
    # The store hands windows out of read-only buffers; torch warned (and a
    # write would have been undefined behaviour) before they were copied.
    from keystay.client.trainer.dpsgd import _windows

    frozen = np.arange(2 * WINDOW, dtype=np.int64).reshape(2, WINDOW)
    frozen.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tensor = _windows(frozen)
    tensor[0, 0] = -1
    assert frozen[0, 0] == 0 and tensor.dtype == torch.int64
