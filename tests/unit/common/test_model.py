"""The shared next-event model (keystay.common.model)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator

from keystay.common import tokens
from keystay.common.model import (
    PAD_ID,
    ModelConfig,
    NextEventModel,
    evaluate,
    get_weights,
    initial_weights,
    load_checkpoint,
    predict_next,
    read_checkpoint,
    save_checkpoint,
    set_weights,
)
from keystay.common.windows import WINDOW

ARCHS = ["conv", "mlp"]


def _windows(n: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(n, WINDOW + 1))


def test_defaults_come_from_the_shared_vocabulary_and_window() -> None:
    config = ModelConfig()
    assert config.vocab_size == tokens.VOCAB_SIZE
    assert config.window == WINDOW == 32
    assert tokens.token_id("<pad>") == PAD_ID


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_shape(arch: str) -> None:
    model = NextEventModel(ModelConfig(arch=arch))
    x = torch.from_numpy(_windows(5, tokens.VOCAB_SIZE)[:, :-1])
    assert model(x).shape == (5, tokens.VOCAB_SIZE)


@pytest.mark.parametrize("arch", ARCHS)
def test_opacus_accepts_every_layer(arch: str) -> None:
    model = NextEventModel(ModelConfig(arch=arch))
    assert ModuleValidator.validate(model, strict=False) == []


# The model's inputs are token ids (no gradient); torch notes Opacus's hooks fire on outputs.
@pytest.mark.filterwarnings("ignore:Full backward hook")
@pytest.mark.parametrize("arch", ARCHS)
def test_opacus_per_sample_gradients_are_exact(arch: str) -> None:
    # Opacus's per-example gradients must equal each example's own gradient: this is
    # what clipping relies on. A layer Opacus mishandled would fail here.
    config = ModelConfig(vocab_size=40, arch=arch, channels=8, layers=3, embed_dim=8, hidden=16)
    model = NextEventModel(config)
    gsm = GradSampleModule(model, loss_reduction="sum")
    data = torch.from_numpy(_windows(4, 40, seed=1))
    loss = torch.nn.functional.cross_entropy(gsm(data[:, :-1]), data[:, -1], reduction="sum")
    loss.backward()
    per_sample = {name: p.grad_sample.clone() for name, p in model.named_parameters()}
    for i in range(4):
        reference = NextEventModel(config)
        reference.load_state_dict(model.state_dict())
        one = torch.nn.functional.cross_entropy(
            reference(data[i : i + 1, :-1]), data[i : i + 1, -1], reduction="sum"
        )
        one.backward()
        for name, p in reference.named_parameters():
            torch.testing.assert_close(per_sample[name][i], p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_whole_window_matters(arch: str) -> None:
    # The conv stack's receptive field (63 tokens) covers the window: the oldest token
    # changes the prediction.
    model = NextEventModel(ModelConfig(arch=arch)).eval()
    x = torch.from_numpy(_windows(1, tokens.VOCAB_SIZE)[:, :-1])
    y = x.clone()
    y[0, 0] = (int(x[0, 0]) + 1) % tokens.VOCAB_SIZE
    with torch.no_grad():
        assert not torch.allclose(model(x), model(y))


def test_initial_weights_are_seeded_and_leave_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = initial_weights(ModelConfig(), seed=1)
    after = torch.rand(1)
    assert torch.equal(before, after)
    b = initial_weights(ModelConfig(), seed=1)
    c = initial_weights(ModelConfig(), seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_weights_round_trip_in_state_dict_order() -> None:
    model = NextEventModel()
    weights = initial_weights(ModelConfig(), seed=3)
    set_weights(model, weights)
    got = get_weights(model)
    assert [w.shape for w in got] == [tuple(v.shape) for v in model.state_dict().values()]
    assert all(np.array_equal(x, y) for x, y in zip(weights, got, strict=True))
    got[0][0, 0] = 1e6  # copies: changing them does not touch the model
    assert float(model.embed.weight[0, 0].detach()) != 1e6


def test_set_weights_names_the_mismatch() -> None:
    model = NextEventModel()
    weights = initial_weights(ModelConfig(), seed=0)
    with pytest.raises(ValueError, match="different model configuration"):
        set_weights(model, weights[:-1])
    wrong = list(weights)
    wrong[0] = np.zeros((3, 3), dtype=np.float32)
    with pytest.raises(ValueError, match=r"embed\.weight"):
        set_weights(model, wrong)
    poisoned = list(weights)
    poisoned[-1] = np.full_like(weights[-1], np.nan)
    with pytest.raises(ValueError, match="NaN"):
        set_weights(model, poisoned)


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    config = ModelConfig()
    weights = initial_weights(config, seed=5)
    path = save_checkpoint(tmp_path / "run" / "global.pt", weights, config, {"round": 3})
    assert [p.name for p in path.parent.iterdir()] == ["global.pt"]  # no temp file left
    model = load_checkpoint(path)
    assert not model.training
    assert model.config == config
    assert model.meta == {"round": 3}
    reference = NextEventModel(config)
    set_weights(reference, weights)
    context = _windows(3, config.vocab_size)[:, :-1]
    np.testing.assert_allclose(predict_next(model, context), predict_next(reference, context))
    checkpoint = read_checkpoint(path)
    assert all(np.array_equal(x, y) for x, y in zip(weights, checkpoint.weights, strict=True))
    # Readable with torch's safe loader (no pickled code).
    assert torch.load(path, weights_only=True)["format"] == "keystay.next-event-model"


def test_checkpoint_refuses_meta_that_is_not_json(tmp_path: Path) -> None:
    config = ModelConfig()
    with pytest.raises(ValueError, match="JSON"):
        save_checkpoint(tmp_path / "m.pt", initial_weights(config), config, {"x": object()})


def test_checkpoint_refuses_weights_of_another_config(tmp_path: Path) -> None:
    weights = initial_weights(ModelConfig(arch="mlp"))
    with pytest.raises(ValueError, match="different model configuration"):
        save_checkpoint(tmp_path / "m.pt", weights, ModelConfig(), {})


def test_load_rejects_other_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no model checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a keystay model checkpoint"):
        load_checkpoint(junk)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(ValueError, match="not a keystay model checkpoint"):
        load_checkpoint(other)


def test_load_rejects_another_vocabulary(tmp_path: Path) -> None:
    config = ModelConfig()
    path = save_checkpoint(tmp_path / "m.pt", initial_weights(config), config, {})
    payload = torch.load(path, weights_only=True)
    payload["vocab_version"] = -1
    torch.save(payload, path)
    with pytest.raises(ValueError, match="vocabulary version"):
        load_checkpoint(path)


def test_config_dict_round_trip_and_unknown_fields() -> None:
    config = ModelConfig(arch="mlp", hidden=64)
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="newer version"):
        ModelConfig.from_dict({**config.to_dict(), "heads": 4})


@pytest.mark.parametrize(
    "kwargs", [{"arch": "gru"}, {"vocab_size": 1}, {"window": 0}, {"layers": -1}]
)
def test_config_rejects_nonsense(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="ModelConfig"):
        ModelConfig(**kwargs)  # type: ignore[arg-type]


def test_predict_next_pads_and_truncates() -> None:
    model = NextEventModel()
    context = list(_windows(1, tokens.VOCAB_SIZE)[0, :-1])
    probs = predict_next(model, context)
    assert probs.shape == (tokens.VOCAB_SIZE,)
    assert probs.sum() == pytest.approx(1.0, abs=1e-5)
    # Longer context: only the last WINDOW tokens count.
    np.testing.assert_allclose(predict_next(model, [7, 8, 9, *context]), probs, rtol=1e-6)
    # Shorter context: left-padded with <pad>.
    short = context[-5:]
    padded = [PAD_ID] * (WINDOW - 5) + short
    np.testing.assert_allclose(predict_next(model, short), predict_next(model, padded), rtol=1e-6)
    batch = predict_next(model, np.array([context, context]))
    assert batch.shape == (2, tokens.VOCAB_SIZE)
    with pytest.raises(ValueError, match="token ids"):
        predict_next(model, [tokens.VOCAB_SIZE])


def test_evaluate() -> None:
    model = NextEventModel()
    nothing = evaluate(model, np.empty((0, WINDOW + 1), dtype=np.int64))
    assert np.isnan(nothing.loss) and np.isnan(nothing.accuracy)
    windows = _windows(50, tokens.VOCAB_SIZE)
    loss, accuracy = evaluate(model, windows, batch_size=7)
    # An untrained model is close to uniform: loss near log(vocab), few hits.
    assert loss == pytest.approx(np.log(tokens.VOCAB_SIZE), rel=0.2)
    assert 0.0 <= accuracy <= 0.2
    assert model.training  # evaluate restores the mode it found
