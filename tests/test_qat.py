"""QAT end to end: a train step on a rule-quantized model lowers the loss; accuracy (slow)."""

import jax
import numpy as np
import pytest

from jquant.examples import mnist1d_qat
from jquant.models import linen as models
from jquant.models import train as T
from jquant.nn import linen as ql


def test_qat_steps_lower_the_loss_at_two_bits():
    model = models.make_model("mlp", (8, 1), 3)
    x = jax.random.normal(jax.random.key(0), (64, 8, 1))
    y = (x[:, 0, 0] > 0).astype(np.int32) + (x[:, 1, 0] > 1).astype(np.int32)
    v = jax.jit(model.init)(jax.random.key(1), x)
    qm, match = ql.quantize_model(model, mnist1d_qat.rules_for(2), x, on_unused="ignore")
    assert match.assignment["head"].weight.bits == 8 and match.assignment["dense1"].weight.bits == 2
    qv = qm.calibrate(qm.attach(v, x), [x])
    params, state = T.split_linen(qv)
    opt = mnist1d_qat.qat_optimizer(3e-3, 40, scale_lr=1e-3)
    step = jax.jit(T.make_train_step(T.linen_apply_fn(qm.with_phase("train")), opt))
    st = T.TrainState.create(params, state, opt)
    losses = []
    for _ in range(40):
        st, m = step(st, x, y)
        losses.append(float(m["loss"]))
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    moved = params["dense1"]["input_scale"] != st.params["dense1"]["input_scale"]
    assert bool(moved)  # the learned step size is trained


@pytest.mark.slow
def test_mnist1d_accuracy_reduced():
    r = mnist1d_qat.run(float_steps=3000, qat_steps=300, bits=(4, 2), log=lambda *_: None)
    assert r["float"] >= 0.90
    assert r["ptq_w8a8"] >= r["float"] - 0.01
    assert r["qat_w4a4"] >= r["float"] - 0.03
    assert r["qat_w2a2"] > r["ptq_w2a2"] + 0.05


def test_mnist1d_summary_rows_against_numpy_and_bad_input():
    per_seed = [{"float": 0.9, "ptq_w2a2": 0.3, "qat_w2a2": 0.8 + s / 100} for s in range(3)]
    rows = mnist1d_qat.summarize(per_seed)
    assert [r["name"] for r in rows] == ["float", "ptq_w2a2", "qat_w2a2"]
    a = np.array([0.8, 0.81, 0.82])
    qat = rows[2]
    assert qat["per_seed"] == pytest.approx(a.tolist())
    assert qat["mean"] == pytest.approx(a.sum() / 3)
    assert qat["std"] == pytest.approx(np.sqrt(((a - a.mean()) ** 2).sum() / 2))
    assert (qat["label"], qat["estimator"]) == ("QAT w2a2", "lsq")  # the rule's estimator
    assert mnist1d_qat.rules_for(2)[1].estimator == qat["estimator"]
    assert rows[1]["estimator"] is None and rows[0]["activation_scales"] is None
    assert mnist1d_qat.summarize(per_seed[:1])[2]["std"] == 0.0
    with pytest.raises(ValueError, match="name must be"):
        mnist1d_qat.describe("qat")
    with pytest.raises(ValueError, match="seeds must be"):
        mnist1d_qat.run_seeds(())
