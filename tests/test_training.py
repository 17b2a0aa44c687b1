"""Training through the graph: the scripts' models learn.

The digits model (scikit-learn's bundled 8x8 digits, no download) must lower its loss within a
few steps and, trained as ``scripts/train_digits.py`` trains it, reach 95% held-out accuracy
(a few seconds).  The volumetric models of ``scripts/train_volumes.py`` (3-D and 4-D
convolutions) must fit a fixed batch.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

import symconv as sc
from symconv import optim

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def script(name: str):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn")
    return script("train_digits")


def test_digits_loss_falls_in_a_few_steps(digits, cache_dir):
    x_train, y_train, _, _ = digits.load_data(seed=0)
    model = digits.build_model(seed=0)
    opt = optim.Adam(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    losses = [digits.train_step(model, opt, x_train[idx], y_train[idx])
              for idx in digits.batches(len(x_train), 32, rng)]     # one epoch: 44 steps
    assert len(losses) == 44 and np.isfinite(losses).all()
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert first > 2.0                   # about log(10) at the start
    assert last < 0.8 * first, losses


def test_digits_reach_95_percent_held_out(digits, cache_dir):
    result = digits.train(verbose=False)   # the script's defaults
    assert result["accuracy"] >= 0.95, result["accuracy"]
    assert result["test_size"] == 360 and result["train_size"] == 1437
    losses = result["epoch_losses"]
    assert losses[-1] < 0.2 < losses[0]


def test_digits_prediction_takes_a_smaller_last_batch(digits, cache_dir):
    model = digits.build_model(seed=0)
    x = np.random.default_rng(0).random((70, 1, 8, 8)).astype(np.float32)
    with sc.no_grad():
        whole = model(sc.Tensor(x)).data.argmax(axis=1)
    predicted = digits.predict(model, x, 32)    # batches of 32, 32 and 6: one compiled model
    np.testing.assert_array_equal(predicted, whole)


@pytest.fixture(scope="module")
def volumes():
    return script("train_volumes")


def fit_one_batch(model, x, y, steps, lr):
    opt = optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = sc.cross_entropy(model(sc.Tensor(x)), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_3d_shapes_model_fits_a_batch(volumes, cache_dir):
    x, y = volumes.make_shapes(16, seed=1)
    assert x.shape == (16, 1, 16, 16, 16) and set(y) <= set(range(len(volumes.SHAPES)))
    losses = fit_one_batch(volumes.shapes_model(seed=0), x, y, steps=12, lr=2e-3)
    assert losses[-1] < 0.5 * losses[0], losses


def test_4d_motion_model_fits_a_batch(volumes, cache_dir):
    x, y = volumes.make_motions(8, seed=1)
    assert x.shape == (8, 1, 8, 8, 8, 8)
    losses = fit_one_batch(volumes.MotionNet(seed=0), x, y, steps=36, lr=3e-2)
    assert losses[-1] < 0.5 * losses[0], losses
