"""QAT end to end: a train step on a rule-quantized model lowers the loss; accuracy (slow)."""

import dataclasses

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


def test_recipe_partition_relative_rate_and_distillation_against_numpy():
    """param_partition labels learned quantizer leaves (Linen dict and NNX state); the
    relative rate moves a step by ``quant_lr * rms(s)`` on Adam's first update (``|u| = 1``);
    the distillation loss equals its NumPy formula."""
    from flax import nnx

    from jquant import qat

    params = {"conv": {"kernel": np.ones((2, 3)), "input_scale": np.float32(0.5)}}
    assert qat.param_partition(params) == {"conv": {"kernel": "weight", "input_scale": "quant"}}
    lin = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    labels = jax.tree.leaves(qat.param_partition(nnx.state(lin, nnx.Param)))
    assert labels == ["weight", "weight"]
    params = {"kernel": np.float32(2.0), "kernel_scale": np.array([0.5, 4.0], np.float32)}
    opt = qat.qat_optimizer(1e-3, quant_lr=1e-2)
    grads = {"kernel": np.float32(1.0), "kernel_scale": np.array([1.0, -1.0], np.float32)}
    upd, _ = opt.update(grads, opt.init(params), params)
    rms = np.sqrt(np.mean(np.square([0.5, 4.0])))
    np.testing.assert_allclose(upd["kernel_scale"], [-1e-2 * rms, 1e-2 * rms], rtol=1e-3)
    np.testing.assert_allclose(upd["kernel"], -1e-3, rtol=1e-3)
    with pytest.raises(ValueError, match="quant_lr"):
        qat.qat_optimizer(1e-3, quant_lr=-1.0)

    z = np.asarray(jax.random.normal(jax.random.key(0), (4, 5)))
    zt = np.asarray(jax.random.normal(jax.random.key(1), (4, 5)))
    y = np.array([0, 1, 2, 3])

    def log_softmax(v):
        v = v - v.max(-1, keepdims=True)
        return v - np.log(np.exp(v).sum(-1, keepdims=True))

    a, t = 0.3, 2.0
    ce = -log_softmax(z)[np.arange(4), y].mean()
    pt = np.exp(log_softmax(zt / t))
    kl = (pt * (log_softmax(zt / t) - log_softmax(z / t))).sum(-1).mean()
    got = qat.distillation_loss(z, y, zt, weight=a, temperature=t)
    np.testing.assert_allclose(got, (1 - a) * ce + a * t * t * kl, rtol=1e-5)
    np.testing.assert_allclose(qat.distillation_loss(z, y, zt, weight=0.0), ce, rtol=1e-5)
    with pytest.raises(ValueError, match="weight"):
        qat.distillation_loss(z, y, zt, weight=1.5)
    with pytest.raises(ValueError, match="QATConfig.distill"):
        qat.QATConfig(distill=2.0)


@pytest.mark.slow
def test_recipe_runs_calibrate_qat_eval_on_a_tiny_model():
    """run_linen: PTQ and QAT accuracies for two seeds in one vmapped program; QAT with
    LSQ weights and dynamic per-token activations at 2 bits beats PTQ on a learnable task."""
    from types import SimpleNamespace

    from jquant import qat
    from jquant.formats import IntFormat
    from jquant.nn import QuantRule

    k = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k[0], (512, 8, 1))
    y = (x[:, :4, 0].sum(1) > 0).astype(np.int32)
    cnn = models.CNN(models.CNNConfig(features=(4,), dense=(8,), num_classes=2))
    data = SimpleNamespace(x_train=x[:384], y_train=y[:384], x_test=x[384:], y_test=y[384:])
    opt = T.make_optimizer(1e-2, 200)
    v = [cnn.init(k[i], x[:2]) for i in (1, 2)]
    step = jax.jit(T.make_train_step(T.linen_apply_fn(cnn), opt))
    for i in range(2):
        st = T.TrainState.create(v[i]["params"], {}, opt)
        for t in range(200):
            st, _ = step(st, x[(t % 3) * 128 : (t % 3 + 1) * 128], y[(t % 3) * 128 :][:128])
        v[i] = {"params": st.params}
    rule = QuantRule(
        ".*",
        weight=IntFormat(2),
        act=IntFormat(2),
        estimator="lsq",
        act_estimator="ste",
        act_scale="dynamic_per_token",
    )
    cfg = qat.QATConfig(steps=60, calib_batches=2, distill=0.5)
    res = qat.run_linen(cnn, v, rule, data, cfg, log=None)
    assert len(res) == 2 and all(set(r) == {"float", "ptq", "qat"} for r in res)
    assert np.mean([r["qat"] for r in res]) > np.mean([r["ptq"] for r in res])
    table = qat.format_table({"recipe": res})
    assert table.splitlines()[2].startswith("| recipe | ")


@pytest.mark.slow
def test_recipe_nnx_matches_linen_structure_and_trains():
    """run_nnx: float, PTQ and QAT accuracies of NNX models (one per seed) at 2 bits with
    LSQ weights and dynamic per-example activations; the float models stay unchanged."""
    from types import SimpleNamespace

    from flax import nnx

    from jquant import qat
    from jquant.formats import IntFormat
    from jquant.models import nnx as nnx_models
    from jquant.nn import QuantRule

    k = jax.random.split(jax.random.key(0), 2)
    x = jax.random.normal(k[0], (512, 8, 1))
    y = (x[:, :4, 0].sum(1) > 0).astype(np.int32)
    data = SimpleNamespace(x_train=x[:384], y_train=y[:384], x_test=x[384:], y_test=y[384:])
    opt = T.make_optimizer(1e-2, 150)
    models = []
    for seed in (0, 1):
        m = nnx_models.make_model("mlp", (8, 1), 2, rngs=nnx.Rngs(seed))
        g, p, s = T.split_nnx(m)
        step = jax.jit(T.make_train_step(T.nnx_apply_fn(g), opt))
        st = T.TrainState.create(p, s, opt)
        for t in range(150):
            st, _ = step(st, x[(t % 3) * 128 :][:128], y[(t % 3) * 128 :][:128])
        models.append(nnx.merge(g, st.params, st.model_state))
    rule = QuantRule(
        ".*",
        weight=IntFormat(2),
        act=IntFormat(2),
        estimator="lsq",
        act_estimator="ste",
        act_scale="dynamic_per_example",
    )
    before = jax.tree.map(np.asarray, nnx.state(models[0], nnx.Param))
    res = qat.run_nnx(models, rule, data, qat.QATConfig(steps=60, calib_batches=2), log=None)
    assert len(res) == 2 and all(set(r) == {"float", "ptq", "qat"} for r in res)
    assert min(r["float"] for r in res) > 0.8 and min(r["qat"] for r in res) > 0.7  # chance 0.5
    after = nnx.state(models[0], nnx.Param)  # the float models are left unchanged
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, after))


class _ConvBN(__import__("flax").linen.Module):
    """Conv -> BatchNorm -> relu -> Dense: a small model with batch statistics."""

    @__import__("flax").linen.compact
    def __call__(self, x, train: bool = False):
        import flax.linen as fnn

        x = fnn.Conv(3, (3,), use_bias=False, name="conv")(x)
        x = fnn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x)
        x = fnn.relu(x)
        return fnn.Dense(2, name="head")(x.reshape(x.shape[0], -1))


def test_bn_reestimation_equals_batch_stats_of_the_quantized_pre_bn_activations():
    """After re-estimation the running mean / var are the averages over the batches of the
    batch mean / (biased) variance of the BN's input in the *quantized* model, computed here
    from the captured pre-BN activations in NumPy; other state and parameters unchanged."""
    import flax.linen as fnn

    from jquant import qat
    from jquant.formats import IntFormat
    from jquant.nn import QuantRule

    model = _ConvBN()
    k = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k[0], (64, 12, 2))
    v = model.init(k[1], x[:2])
    v = {**v, "batch_stats": jax.tree.map(lambda a: a + 0.3, v["batch_stats"])}  # stale stats
    rule = QuantRule(".*", weight=IntFormat(3), act=IntFormat(3))
    qm, _ = ql.quantize_model(model, rule, x[:2], on_unused="ignore")
    qv = qm.calibrate(qm.attach(v, x[:2]), [x[:32]])
    params, state = T.split_linen(qv)
    train_apply = T.linen_apply_fn(qm.with_phase("train"))
    batches = [x[:16], x[16:32], x[32:48]]  # one shape: one compile
    new = qat.reestimate_batch_stats(train_apply, params, state, batches)

    def capture(apply_model, variables, xb):
        seen = []

        def spy(next_fun, args, kwargs, context):
            if isinstance(context.module, fnn.BatchNorm) and context.method_name == "__call__":
                seen.append(np.asarray(args[0], np.float64))
            return next_fun(*args, **kwargs)

        with fnn.intercept_methods(spy):
            apply_model.apply(variables, xb, train=True, mutable=["batch_stats", "quant_stats"])
        return seen[0].reshape(-1, seen[0].shape[-1])

    z = [capture(qm.with_phase("train"), qv, xb) for xb in batches]
    mean = np.mean([a.mean(0) for a in z], 0)
    var = np.mean([a.var(0) for a in z], 0)
    np.testing.assert_allclose(new["batch_stats"]["bn"]["mean"], mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(new["batch_stats"]["bn"]["var"], var, rtol=1e-4, atol=1e-5)
    z_float = capture(model, v, batches[0])  # the quantized activations are not the float ones
    assert np.max(np.abs(z_float - z[0])) > 1e-3
    jax.tree.map(np.testing.assert_array_equal, new["quant_stats"], state["quant_stats"])
    with pytest.raises(ValueError, match="no BatchNorm"):
        qat.reestimate_batch_stats(train_apply, params, {"quant_stats": {}}, batches)
    with pytest.raises(ValueError, match="at least one batch"):
        qat.reestimate_batch_stats(train_apply, params, state, [])


def test_bn_reestimation_nnx_batch_stats():
    """NNX: the nnx.BatchStat leaves become the batch statistics of a batch (one batch: the
    running value is that batch's mean / biased variance), whatever the momentum."""
    from flax import nnx

    from jquant import qat

    class M(nnx.Module):
        def __init__(self):
            self.lin = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
            self.bn = nnx.BatchNorm(4, momentum=0.5, rngs=nnx.Rngs(0))

        def __call__(self, x, train=False):
            self.bn.use_running_average = not train
            return self.bn(self.lin(x))

    m = M()
    g, p, s = T.split_nnx(m)
    xb = jax.random.normal(jax.random.key(3), (32, 3)) * 2 + 1
    new = qat.reestimate_batch_stats(T.nnx_apply_fn(g), p, s, [xb])
    z = np.asarray(m.lin(xb), np.float64)
    np.testing.assert_allclose(new["bn"]["mean"].value, z.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(new["bn"]["var"].value, z.var(0), rtol=1e-4, atol=1e-5)


def test_progressive_lowering_stages_and_widths():
    """width_stages splits the steps evenly (remainder last); rules_at_width raises every
    integer width to at least the stage's (an 8-bit first layer stays 8, float stays float);
    QATConfig.schedule and run_linen validate the schedule."""
    from jquant import qat
    from jquant.formats import IntFormat
    from jquant.nn import QuantRule

    assert qat.width_stages(300, (8, 4, 2)) == (
        qat.Stage(0, 100, 8),
        qat.Stage(100, 200, 4),
        qat.Stage(200, 300, 2),
    )
    assert qat.width_stages(7, None) == (qat.Stage(0, 7, None),)
    rules = (
        QuantRule("conv0", weight=IntFormat(8), act=IntFormat(8)),
        QuantRule(".*", weight=IntFormat(2), act=IntFormat(3), estimator="lsq"),
        QuantRule("head", weight=None, act=None),
    )
    for width, want in ((8, [8, 8, 8, 8]), (4, [8, 8, 4, 4]), (2, [8, 8, 2, 3]), (None, None)):
        got = qat.rules_at_width(rules, width)
        bits = [f.bits for r in got[:2] for f in (r.weight, r.act)]
        assert bits == (want or [8, 8, 2, 3])
        assert got[1].estimator == "lsq" and got[2].weight is None
    for bad in ((2, 4), (8, 8), (8, 1), [8, 2], (8.0, 2)):
        with pytest.raises(ValueError, match="QATConfig.schedule"):
            qat.QATConfig(schedule=bad)
    with pytest.raises(ValueError, match="fewer than"):
        qat.QATConfig(steps=2, schedule=(8, 4, 2))
    data = _tiny_data()
    with pytest.raises(ValueError, match="smallest integer width 2"):
        qat.run_linen(
            data.model, [data.v], rules[1], data, qat.QATConfig(schedule=(8, 4)), log=None
        )
    with pytest.raises(ValueError, match="run_linen only"):
        qat.run_nnx([], rules[1], data, qat.QATConfig(schedule=(8, 2)), log=None)


def _tiny_data():
    from types import SimpleNamespace

    k = jax.random.split(jax.random.key(0), 2)
    x = jax.random.normal(k[0], (256, 8, 1))
    y = (x[:, :4, 0].sum(1) > 0).astype(np.int32)
    cnn = models.CNN(models.CNNConfig(features=(4,), dense=(8,), num_classes=2))
    v = cnn.init(k[1], x[:2])
    return SimpleNamespace(
        x_train=x[:128], y_train=y[:128], x_test=x[128:], y_test=y[128:], model=cnn, v=v
    )


@pytest.mark.slow
def test_progressive_lowering_changes_the_width_at_the_scheduled_steps(monkeypatch):
    """run_linen with schedule=(8, 2) over 4 steps: the model of steps 0..1 is quantized at 8
    bits and that of steps 2..3 at 2 bits (the rules given to quantize_model, in the order of
    the stage log lines); a one-width schedule at the rules' width trains exactly as none."""
    from jquant import qat
    from jquant.formats import IntFormat
    from jquant.nn import QuantRule

    data = _tiny_data()
    rule = QuantRule(".*", weight=IntFormat(2), act=IntFormat(2), estimator="lsq")
    events = []
    quantize_model = ql.quantize_model

    def spy(model, rules, *a, **k):
        events.append(("quantize", rules[0].weight.bits, rules[0].act.bits))
        return quantize_model(model, rules, *a, **k)

    monkeypatch.setattr(qat.ql, "quantize_model", spy)
    cfg = qat.QATConfig(steps=4, batch_size=32, calib_batches=1, schedule=(8, 2))
    qat.run_linen(data.model, [data.v], rule, data, cfg, log=events.append)
    events = [e for e in events if isinstance(e, tuple) or e.startswith("stage")]
    assert events == [
        ("quantize", 2, 2),  # the target model: PTQ and evaluation
        ("quantize", 8, 8),
        "stage: steps 0..1 at widths >= 8 bits",
        ("quantize", 2, 2),
        "stage: steps 2..3 at widths >= 2 bits",
    ]
    monkeypatch.undo()
    same = [
        qat.run_linen(
            data.model, [data.v], rule, data, dataclasses.replace(cfg, schedule=s), log=None
        )
        for s in ((2,), None)
    ]
    assert same[0] == same[1]


def test_named_recipes_rules_configs_and_switches():
    """STATIC_RECIPE / DYNAMIC_RECIPE give rules and configs with their fields; a schedule
    ends at the target width; every part can be switched off; bad fields raise at once."""
    from jquant import qat
    from jquant.formats import IntFormat

    r = qat.STATIC_RECIPE.rule("conv.*", IntFormat(2), IntFormat(2))
    assert (r.pattern, r.act_scale, r.estimator) == ("conv.*", "static", "lsq")
    assert r.act_estimator == qat.STATIC_RECIPE.act_estimator
    d = qat.DYNAMIC_RECIPE.rule(".*", "int4", "int4", weight_granularity="per_tensor")
    assert (d.act_scale, d.act_estimator, d.weight_granularity) == (
        "dynamic_per_token",
        "ste",
        "per_tensor",
    )
    lowering = dataclasses.replace(qat.STATIC_RECIPE, schedule=(8, 4))
    assert lowering.config(30, target_bits=2).schedule == (8, 4, 2)
    assert lowering.config(30, target_bits=3).schedule == (8, 4, 3)
    assert lowering.config(30, target_bits=8).schedule is None
    with pytest.raises(ValueError, match="target_bits"):
        lowering.config(30)
    off = dataclasses.replace(
        qat.STATIC_RECIPE, distill=0.0, quant_lr=None, schedule=None, bn_batches=0
    )
    cfg = off.config(10, batch_size=64)
    assert (cfg.steps, cfg.distill, cfg.quant_lr, cfg.schedule, cfg.bn_batches) == (
        10,
        0.0,
        None,
        None,
        0,
    )
    assert cfg.batch_size == 64
    with pytest.raises(ValueError, match="act_scale"):
        qat.Recipe(act_scale="dynamic_per_token", act_estimator="lsq")
    with pytest.raises(ValueError, match="QATConfig.distill"):
        qat.Recipe(distill=3.0)
