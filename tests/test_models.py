"""Tests of jquant.models: Linen/NNX zoo, weight copy, train step, fit, evaluate, cache."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jquant import data
from jquant.models import (
    MODEL_NAMES,
    CNNConfig,
    MLPConfig,
    TrainState,
    evaluate,
    fit,
    linen,
    linen_apply_fn,
    linen_to_nnx,
    make_optimizer,
    make_train_step,
    nnx_apply_fn,
    nnx_to_linen,
    split_linen,
    split_nnx,
    train,
    train_or_load,
)
from jquant.models import nnx as nnx_models

SHAPES = {"mnist1d": (40, 1), "digits": (8, 8, 1)}
CASES = [(name, data_name) for name in MODEL_NAMES for data_name in SHAPES]


def _random_variables(model, shape, seed=0):
    """Variables of ``model`` filled by NumPy (no PRNG compiles); BN variances positive."""
    rng = np.random.default_rng(seed)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *shape))))
    return jax.tree_util.tree_map_with_path(
        lambda path, a: (
            jnp.asarray(
                rng.uniform(0.5, 1.5, a.shape)
                if path[-1].key == "var"
                else rng.normal(size=a.shape),
                a.dtype,
            )
            / np.sqrt(max(a.shape[:-1], default=1))
        ),
        abstract,
    )


def _abstract_nnx(name, shape, num_classes=10):
    return nnx.eval_shape(lambda: nnx_models.make_model(name, shape, num_classes, rngs=nnx.Rngs(0)))


def _assert_trees_equal(a, b, **tol):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if tol:
            np.testing.assert_allclose(x, y, **tol)
        else:
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize(("name", "data_name"), CASES)
def test_linen_layout(name, data_name):
    shape = SHAPES[data_name]
    model = linen.make_model(name, shape, 10)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *shape))))
    params = variables["params"]
    out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((3, *shape))), variables)
    assert out.shape == (3, 10)
    if name == "mlp":
        assert set(params) == {"dense1", "dense2", "head"}
        assert params["dense1"]["kernel"].shape == (int(np.prod(shape)), 128)
        return
    expected = {"conv1", "conv2", "dense1", "head"} | (
        {"bn1", "bn2"} if name == "cnn_bn" else set()
    )
    assert set(params) == expected
    kernel = (5,) if data_name == "mnist1d" else (3, 3)
    assert params["conv1"]["kernel"].shape == (*kernel, 1, 32)
    assert params["conv2"]["kernel"].shape == (*kernel, 32, 32)
    assert ("bias" in params["conv1"]) == (name == "cnn")
    # Two 2x poolings: 40 -> 10 positions, 8x8 -> 2x2.
    assert params["dense1"]["kernel"].shape == (320 if data_name == "mnist1d" else 128, 64)
    if name == "cnn_bn":
        assert set(variables["batch_stats"]["bn2"]) == {"mean", "var"}


def _np_forward_cnn1d(variables, x, cfg):
    """NumPy CNN on (N, L, C) in eval mode, written from CNNConfig's docstring."""
    p = jax.tree.map(np.asarray, variables["params"])
    stats = jax.tree.map(np.asarray, variables.get("batch_stats", {}))
    x = np.asarray(x, np.float64)
    for i in range(1, len(cfg.features) + 1):
        w = p[f"conv{i}"]["kernel"]
        k = w.shape[0]
        xp = np.pad(x, ((0, 0), ((k - 1) // 2, k // 2), (0, 0)))  # SAME
        x = sum(xp[:, j : j + x.shape[1]] @ w[j] for j in range(k))
        if cfg.batch_norm:
            bn, st = p[f"bn{i}"], stats[f"bn{i}"]
            x = (x - st["mean"]) / np.sqrt(st["var"] + cfg.bn_epsilon) * bn["scale"] + bn["bias"]
        else:
            x = x + p[f"conv{i}"]["bias"]
        x = np.maximum(x, 0)
        n, length, c = x.shape
        windows = x[:, : length // 2 * 2].reshape(n, length // 2, 2, c)
        x = windows.max(2) if cfg.pool == "max" else windows.mean(2)
    x = x.reshape(len(x), -1)
    for i in range(1, len(cfg.dense) + 1):
        x = np.maximum(x @ p[f"dense{i}"]["kernel"] + p[f"dense{i}"]["bias"], 0)
    return x @ p["head"]["kernel"] + p["head"]["bias"]


@pytest.mark.parametrize(("pool", "batch_norm"), [("max", False), ("avg", True)])
def test_cnn1d_against_numpy(pool, batch_norm):
    cfg = CNNConfig(features=(4, 3), dense=(5,), pool=pool, batch_norm=batch_norm)
    model = linen.CNN(cfg)
    x = np.random.default_rng(1).normal(size=(2, 10, 2)).astype(np.float32)
    variables = _random_variables(model, (10, 2))  # non-trivial BN statistics too
    np.testing.assert_allclose(
        model.apply(variables, x), _np_forward_cnn1d(variables, x, cfg), rtol=1e-5, atol=1e-5
    )


def test_mlp_against_numpy():
    model = linen.MLP(MLPConfig(num_classes=3, hidden=(4,)))
    x = np.random.default_rng(1).normal(size=(2, 3, 2)).astype(np.float32)
    p = jax.tree.map(np.asarray, _random_variables(model, (3, 2))["params"])
    h = np.maximum(np.asarray(x).reshape(2, 6) @ p["dense1"]["kernel"] + p["dense1"]["bias"], 0)
    expected = h @ p["head"]["kernel"] + p["head"]["bias"]
    np.testing.assert_allclose(model.apply({"params": p}, x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("name", "data_name"),
    [("mlp", "digits"), ("cnn", "mnist1d"), ("cnn_bn", "mnist1d"), ("cnn_bn", "digits")],
)
def test_linen_equals_nnx_after_copy(name, data_name):
    shape = SHAPES[data_name]
    lin = linen.make_model(name, shape, 10)
    variables = _random_variables(lin, shape)
    x = np.random.default_rng(2).normal(size=(3, *shape)).astype(np.float32)
    copied = linen_to_nnx(variables, _abstract_nnx(name, shape))
    np.testing.assert_allclose(copied(x), lin.apply(variables, x), rtol=1e-6, atol=1e-6)
    _assert_trees_equal(nnx_to_linen(copied), variables)
    if name == "cnn_bn":  # training mode: batch statistics and their running averages agree
        out, updates = lin.apply(variables, x, train=True, mutable=["batch_stats"])
        np.testing.assert_allclose(copied(x, train=True), out, rtol=1e-5, atol=1e-5)
        _assert_trees_equal(
            nnx_to_linen(copied)["batch_stats"], updates["batch_stats"], rtol=1e-6, atol=1e-7
        )


def test_linen_to_nnx_leaves_its_input_and_rejects_mismatches():
    shape = SHAPES["mnist1d"]
    nnx_model = linen_to_nnx(
        _random_variables(linen.make_model("cnn", shape, 10), shape, seed=0),
        _abstract_nnx("cnn", shape),
    )
    before = nnx_to_linen(nnx_model)
    variables = _random_variables(linen.make_model("cnn", shape, 10), shape, seed=1)
    linen_to_nnx(variables, nnx_model)
    _assert_trees_equal(nnx_to_linen(nnx_model), before)
    with pytest.raises(ValueError, match="only in"):
        linen_to_nnx(_random_variables(linen.make_model("mlp", shape, 10), shape), nnx_model)
    wrong = _random_variables(linen.make_model("cnn", shape, 7), shape)
    with pytest.raises(ValueError, match="shape of head/"):
        linen_to_nnx(wrong, nnx_model)


@pytest.mark.parametrize(
    ("factory", "bad"),
    [
        (lambda: linen.make_model("resnet", (40, 1), 10), "model name"),
        (lambda: CNNConfig(pool="min"), "pool"),
        (lambda: CNNConfig(features=()), "features"),
        (lambda: CNNConfig(num_classes=1), "num_classes"),
        (lambda: linen.make_model("cnn", (40,), 10), "input_shape"),
        (lambda: nnx_models.CNN(CNNConfig(), (3, 1), rngs=nnx.Rngs(0)), "too small"),
        (lambda: make_optimizer(1e-3, 10, schedule="linear"), "schedule"),
        (lambda: make_optimizer(0.0, 10), "learning_rate"),
    ],
)
def test_bad_arguments_raise_value_error(factory, bad):
    with pytest.raises(ValueError, match=bad):
        factory()


def test_cross_entropy_formula():
    z = np.random.default_rng(0).normal(size=(5, 4))
    logits, labels = jnp.asarray(z, jnp.float32), jnp.array([0, 3, 1, 1, 2])
    expected = np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(5), np.asarray(labels)])
    np.testing.assert_allclose(train.cross_entropy(logits, labels), expected, rtol=1e-6)


def test_train_step_linen_equals_nnx_with_batch_stats():
    """One SGD step of a small BN CNN, through the Linen and the NNX adapters."""
    shape = (6, 2)
    cfg = CNNConfig(features=(3,), kernel_size=(3,), dense=(), batch_norm=True)
    lin = linen.CNN(cfg)
    variables = _random_variables(lin, shape)
    abstract = nnx.eval_shape(lambda: nnx_models.CNN(cfg, shape, rngs=nnx.Rngs(0)))
    copied = linen_to_nnx(variables, abstract)
    x = np.random.default_rng(2).normal(size=(4, *shape)).astype(np.float32)
    y = jnp.array([0, 1, 2, 3])
    opt = optax.sgd(0.1)

    lp, lstate = split_linen(variables)
    lin_state, lin_metrics = jax.jit(make_train_step(linen_apply_fn(lin), opt))(
        TrainState.create(lp, lstate, opt), x, y
    )
    graphdef, np_, nstate = split_nnx(copied)
    nnx_state, nnx_metrics = jax.jit(make_train_step(nnx_apply_fn(graphdef), opt))(
        TrainState.create(np_, nstate, opt), x, y
    )

    # The independent reference: plain SGD on jax.grad of the loss, BN in training mode.
    def loss(params):
        logits, _ = lin.apply({"params": params, **lstate}, x, train=True, mutable=["batch_stats"])
        return train.cross_entropy(logits, y)

    loss_value, grads = jax.jit(jax.value_and_grad(loss))(lp)
    expected = jax.tree.map(lambda p, g: p - 0.1 * g, lp, grads)
    np.testing.assert_allclose(lin_metrics["loss"], loss_value, rtol=1e-6)
    np.testing.assert_allclose(nnx_metrics["loss"], lin_metrics["loss"], rtol=1e-5)
    _assert_trees_equal(lin_state.params, expected, rtol=1e-5, atol=1e-6)
    trained = nnx.merge(graphdef, nnx_state.params, nnx_state.model_state)
    _assert_trees_equal(nnx_to_linen(trained)["params"], expected, rtol=1e-5, atol=1e-6)
    _assert_trees_equal(
        nnx_to_linen(trained)["batch_stats"], lin_state.model_state["batch_stats"], rtol=1e-5
    )
    assert not np.allclose(lin_state.model_state["batch_stats"]["bn1"]["mean"], 0.0)
    assert int(lin_state.step) == int(nnx_state.step) == 1


class _Carried(nn.Module):
    """``x W + b + c`` with ``c`` in the collection ``carried``."""

    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(3)(x) + self.variable("carried", "c", jnp.zeros, (3,)).value


def test_train_step_overwrites_a_collection_with_its_gradient():
    """loss = sum(z^2) / 2, z = x W + b + c: the step replaces c by dL/dc = sum_n z_n (NumPy)
    and takes an SGD step on W with dL/dW = x^T z; two steps, so the new c is read."""
    model = _Carried()
    x = np.random.default_rng(3).normal(size=(4, 2)).astype(np.float32)
    params, model_state = split_linen(model.init(jax.random.key(0), x))
    model_state = {"carried": {"c": jnp.array([0.5, -1.0, 2.0])}}
    opt = optax.sgd(0.1)
    step = jax.jit(
        make_train_step(
            linen_apply_fn(model),
            opt,
            lambda z, y: jnp.sum(z**2) / 2,
            overwrite_with_gradient=("carried",),
        )
    )
    state = TrainState.create(params, model_state, opt)
    for _ in range(2):
        w, b = (np.asarray(state.params["Dense_0"][k], np.float64) for k in ("kernel", "bias"))
        z = x @ w + b + np.asarray(state.model_state["carried"]["c"])
        state, _ = step(state, x, jnp.zeros(4, jnp.int32))
        np.testing.assert_allclose(state.model_state["carried"]["c"], z.sum(0), rtol=1e-5)
        np.testing.assert_allclose(
            state.params["Dense_0"]["kernel"], w - 0.1 * x.T @ z, rtol=1e-5, atol=1e-6
        )
    with pytest.raises(TypeError, match="overwrite_with_gradient"):
        make_train_step(linen_apply_fn(model), opt, overwrite_with_gradient=(1,))
    missing = make_train_step(linen_apply_fn(model), opt, overwrite_with_gradient=("nope",))
    with pytest.raises(ValueError, match="overwrite_with_gradient.*nope.*carried"):
        missing(state, x, jnp.zeros(4, jnp.int32))


@pytest.fixture(scope="module")
def digits():
    return data.load("digits")


def test_short_training_lowers_the_loss_deterministically(digits):
    model = linen.make_model("mlp", digits.input_shape, 10)
    params, model_state = split_linen(_random_variables(model, digits.input_shape))
    opt = make_optimizer(1e-2, 60)
    apply_fn = linen_apply_fn(model)
    step = make_train_step(apply_fn, opt)
    run = lambda: fit(
        step,
        TrainState.create(params, model_state, opt),
        digits.x_train,
        digits.y_train,
        steps=60,
        batch_size=64,
        key=jax.random.key(0),
        log_every=20,
    )
    state, history = run()
    before = evaluate(apply_fn, params, model_state, digits.x_test, digits.y_test)
    after = evaluate(apply_fn, state.params, state.model_state, digits.x_test, digits.y_test)
    assert [h["step"] for h in history] == [20, 40, 60]
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert after["loss"] < 0.5 * before["loss"]
    assert after["accuracy"] > 0.8 > before["accuracy"]
    again, _ = run()  # same step function: no recompilation
    _assert_trees_equal(again.params, state.params)


def test_evaluate_matches_numpy(digits):
    model = linen.make_model("mlp", digits.input_shape, 10)
    variables = _random_variables(model, digits.input_shape)
    params, model_state = split_linen(variables)
    x, y = digits.x_test[:50], digits.y_test[:50]
    got = evaluate(linen_apply_fn(model), params, model_state, x, y, batch_size=16)  # padded
    z = np.asarray(jax.jit(model.apply)(variables, x), np.float64)
    log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
    np.testing.assert_allclose(got["loss"], -log_p[np.arange(50), np.asarray(y)].mean(), rtol=1e-5)
    assert got["accuracy"] == np.mean(z.argmax(1) == np.asarray(y))


def test_step_indices_are_shuffled_epochs():
    idx = train._step_indices(jax.random.key(0), n=10, batch_size=3, steps=7)
    assert idx.shape == (7, 3)
    for epoch in (idx[0:3], idx[3:6]):  # 3 full batches per epoch, remainder dropped
        assert len(np.unique(epoch)) == 9
    assert not np.array_equal(idx[0:3], idx[3:6])
    np.testing.assert_array_equal(idx, train._step_indices(jax.random.key(0), 10, 3, 7))


def test_fit_rejects_bad_arguments(digits):
    with pytest.raises(ValueError, match="batch_size"):
        fit(None, None, digits.x_test, digits.y_test, steps=1, batch_size=10**6, key=None)
    with pytest.raises(ValueError, match="steps"):
        fit(None, None, digits.x_test, digits.y_test, steps=0, batch_size=8, key=None)


def test_train_or_load_cache_round_trip(digits, tmp_path):
    kwargs = {"batch_size": 64, "cache": tmp_path}
    first = train_or_load("mlp", digits, 0, 20, **kwargs)
    files = list((tmp_path / "models").glob("mlp-digits-*.msgpack"))
    assert len(files) == 1
    assert first.metrics["test_accuracy"] > 0.5
    loaded = train_or_load("mlp", digits, 0, 20, **kwargs)
    _assert_trees_equal(loaded.variables, first.variables)
    assert loaded.metrics == first.metrics  # train_seconds too: loaded, not retrained


def test_cache_path_is_keyed_by_the_config(digits, tmp_path):
    cfg = train.TrainConfig(steps=20, batch_size=64)
    path = train.cache_path("mlp", digits, 0, cfg, cache=tmp_path)
    assert path.parent == tmp_path / "models" and path.name.startswith("mlp-digits-")
    assert train.cache_path("mlp", digits, 0, train.TrainConfig(20, 64), cache=tmp_path) == path
    other_split = data.load_digits(seed=1)
    variants = [
        train.cache_path("mlp", digits, 1, cfg, cache=tmp_path),
        train.cache_path("cnn", digits, 0, cfg, cache=tmp_path),
        train.cache_path("mlp", digits, 0, train.TrainConfig(21, 64), cache=tmp_path),
        train.cache_path("mlp", digits, 0, train.TrainConfig(20, 64, 3e-3), cache=tmp_path),
        train.cache_path("mlp", other_split, 0, cfg, cache=tmp_path),  # same name, other data
    ]
    assert len({path, *variants}) == 6


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "data_name", "target"),
    [
        ("cnn", "mnist1d", 0.90),
        ("cnn_bn", "mnist1d", 0.90),
        ("mlp", "digits", 0.95),
        ("cnn", "digits", 0.95),
        ("cnn_bn", "digits", 0.95),
    ],
)
def test_accuracy_targets(name, data_name, target, tmp_path):
    ds = data.load(data_name, **({"cache": tmp_path} if data_name == "mnist1d" else {}))
    steps = train.RECOMMENDED_STEPS[data_name]
    result = train_or_load(name, ds, 0, steps, cache=tmp_path)
    assert result.metrics["test_accuracy"] >= target


def test_corrupt_cache_is_named_and_retrained(digits, tmp_path):
    from flax import serialization

    kwargs = {"batch_size": 64, "cache": tmp_path}
    first = train_or_load("mlp", digits, 0, 20, **kwargs)
    (path,) = (tmp_path / "models").glob("mlp-digits-*.msgpack")
    good = path.read_bytes()
    apply_fn = linen_apply_fn(first.model)

    def check_retrained(result):
        # the metrics are those of the returned weights (an independent evaluation)
        params, model_state = split_linen(result.variables)
        test = evaluate(apply_fn, params, model_state, digits.x_test, digits.y_test)
        assert result.metrics["test_accuracy"] == test["accuracy"] > 0.5
        assert result.metrics["train_seconds"] != first.metrics["train_seconds"]  # retrained
        assert train_or_load("mlp", digits, 0, 20, **kwargs).metrics == result.metrics  # valid

    # NaN weights under the stored metrics (issue #12: 92.5% reported, 8.5% real)
    record = serialization.msgpack_restore(good)
    head = record["variables"]["params"]["head"]
    head["kernel"] = head["kernel"].copy()
    head["kernel"][0, 0] = np.nan
    path.write_bytes(serialization.msgpack_serialize(record))
    with pytest.warns(RuntimeWarning, match=rf"{path}: weights cache not used.*non-finite"):
        check_retrained(train_or_load("mlp", digits, 0, 20, **kwargs))
    # finite weights that are not those the metrics came from: the stored sha256 disagrees
    record = serialization.msgpack_restore(good)
    head = record["variables"]["params"]["head"]
    head["kernel"] = head["kernel"] * 0.5
    path.write_bytes(serialization.msgpack_serialize(record))
    with pytest.warns(RuntimeWarning, match=rf"{path}: weights cache not used.*sha256"):
        check_retrained(train_or_load("mlp", digits, 0, 20, **kwargs))
    # a truncated file (a killed writer, a full disk)
    path.write_bytes(good[: len(good) // 2])
    with pytest.warns(RuntimeWarning, match=rf"{path}: weights cache not used.*unreadable"):
        check_retrained(train_or_load("mlp", digits, 0, 20, **kwargs))
    # a file without a checksum (written before jquant stored one)
    record = serialization.msgpack_restore(good)
    del record["sha256"]
    path.write_bytes(serialization.msgpack_serialize(record))
    with pytest.warns(RuntimeWarning, match=rf"{path}: weights cache not used.*no sha256"):
        check_retrained(train_or_load("mlp", digits, 0, 20, **kwargs))
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary left


def test_retrain_overwrites_a_valid_cache(digits, tmp_path):
    kwargs = {"batch_size": 64, "cache": tmp_path}
    first = train_or_load("mlp", digits, 0, 20, **kwargs)
    again = train_or_load("mlp", digits, 0, 20, retrain=True, **kwargs)
    assert again.metrics["train_seconds"] != first.metrics["train_seconds"]
    assert train_or_load("mlp", digits, 0, 20, **kwargs).metrics == again.metrics


def test_diverged_training_is_not_cached(digits, tmp_path):
    with pytest.raises(ValueError, match="diverged"):
        train_or_load("mlp", digits, 0, 3, batch_size=64, learning_rate=1e30, cache=tmp_path)
    assert not list(tmp_path.rglob("*.msgpack"))
