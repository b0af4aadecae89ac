"""Tests of jquant.nn.nnx: NNX layers equal the Linen ones, QuantStat state, phases, saving."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, serialization

from jquant.formats import IntFormat
from jquant.models import linen as mlinen
from jquant.models import nnx as mnnx
from jquant.nn import QuantRule, QuantStat
from jquant.nn import linen as ql
from jquant.nn import nnx as qn

X = jax.random.normal(jax.random.key(1), (4, 16, 2))
BATCHES = [X, 1.5 * jax.random.normal(jax.random.key(2), (4, 16, 2))]
CFG = mlinen.CNNConfig(features=(8, 8), dense=(16,))
RULES = (
    QuantRule("conv1", keep_float=True),
    QuantRule("head", weight="int8", act="int8", mode="int"),
    QuantRule(".*", weight="int4", act=IntFormat(4, signed=False), estimator="lsq"),
)


@pytest.fixture(scope="module")
def pair():
    """(linen QuantizedModel, its calibrated variables, calibrated NNX copy), same weights."""
    cnn = mlinen.CNN(CFG)
    v = jax.jit(cnn.init)(jax.random.key(0), X)
    qm, _ = ql.quantize_model(cnn, RULES, X)
    qv = qm.calibrate(qm.attach(v, X), BATCHES)
    nm = mnnx.linen_to_nnx(v, mnnx.CNN(CFG, (16, 2), rngs=nnx.Rngs(5)))
    qnm, match = qn.quantize_model(nm, RULES)
    assert match.unused == ()
    qn.calibrate(qnm, BATCHES)
    return qm, qv, qnm


@pytest.mark.parametrize("phase", ["eval", "train"])
def test_linen_and_nnx_identical(pair, phase):
    qm, qv, qnm = pair
    y_linen = jax.jit(qm.with_phase(phase).apply)(qv, X)
    qn.with_phase(qnm, phase)
    y_nnx = nnx.jit(lambda m, x: m(x))(qnm, X)
    np.testing.assert_array_equal(y_nnx, y_linen)
    assert not np.allclose(y_linen, jax.jit(qm.model.apply)(qv, X), atol=1e-3)


def test_state_types_and_enumeration(pair):
    qm, qv, qnm = pair
    assert type(qnm.conv1) is nnx.Conv  # keep_float: untouched
    assert isinstance(qnm.conv2, qn.QConv) and isinstance(qnm.head, qn.QLinear)
    stats = nnx.state(qnm, QuantStat).to_pure_dict()
    assert set(stats) == {"conv2", "dense1", "head"}
    np.testing.assert_array_equal(
        stats["conv2"]["input_qparams"]["scale"],
        qv["quant_stats"]["conv2"]["input_qparams"]["scale"],
    )
    linen_layers = qm.quantized_layers(qv)
    nnx_layers = qn.quantized_layers(qnm)
    assert [layer.path for layer in nnx_layers] == [layer.path for layer in linen_layers]
    for a, b in zip(nnx_layers, linen_layers, strict=True):
        assert a.rule == b.rule
        leaves_a, leaves_b = jax.tree_util.tree_leaves(a[2:]), jax.tree_util.tree_leaves(b[2:])
        assert len(leaves_a) == len(leaves_b)
        for x, y in zip(leaves_a, leaves_b, strict=True):
            np.testing.assert_array_equal(x, y)


def test_original_model_unchanged():
    nm = mnnx.CNN(CFG, (16, 2), rngs=nnx.Rngs(0))
    qnm, _ = qn.quantize_model(nm, QuantRule(".*"))
    assert type(nm.conv2) is nnx.Conv and isinstance(qnm.conv2, qn.QConv)
    qnm.conv2.kernel.value = qnm.conv2.kernel.value + 1.0
    assert not np.array_equal(nm.conv2.kernel.value, qnm.conv2.kernel.value)


def test_gradients_reach_weights_and_learned_scales(pair):
    _, _, qnm = pair
    qn.with_phase(qnm, "train")

    @nnx.jit
    def grads(m):
        return nnx.grad(lambda m: jnp.sum(m(X) ** 2))(m)

    g = grads(qnm)
    for layer in ("conv2", "dense1"):
        for name in ("kernel", "kernel_scale", "input_scale"):
            leaf = np.asarray(g[layer][name].value)
            assert np.all(np.isfinite(leaf)) and np.any(leaf != 0), (layer, name)


def test_save_restore_identical_outputs(pair):
    _, _, qnm = pair
    qn.with_phase(qnm, "eval")
    # msgpack of the state's leaves, no pickle. (nnx's replace_by_pure_dict cannot restore
    # Variables whose value is a pytree, as the observer states and calibrated QParams are.)
    blob = serialization.to_bytes(jax.tree_util.tree_leaves(nnx.state(qnm)))
    nm = mnnx.CNN(CFG, (16, 2), rngs=nnx.Rngs(9))  # other weights, other calibration
    other, _ = qn.quantize_model(nm, RULES)
    qn.calibrate(other, [X * 0.1])
    state = nnx.state(other)
    leaves, treedef = jax.tree_util.tree_flatten(state)
    state = jax.tree_util.tree_unflatten(treedef, serialization.from_bytes(leaves, blob))
    nnx.update(other, state)
    qn.with_phase(other, "eval")
    f = nnx.jit(lambda m, x: m(x))
    np.testing.assert_array_equal(f(other, X), f(qnm, X))


def test_errors():
    nm = mnnx.CNN(CFG, (16, 2), rngs=nnx.Rngs(0))
    qnm, _ = qn.quantize_model(nm, QuantRule(".*"))
    with pytest.raises(ValueError, match=r"never calibrated: \['conv1', 'conv2'"):
        qn.with_phase(qnm, "eval")
    with pytest.raises(ValueError, match="batches yielded no batch"):
        qn.calibrate(qnm, iter(()))
    with pytest.raises(ValueError, match="phase must be one of"):
        qn.with_phase(qnm, "deploy")
    with pytest.warns(UserWarning, match="matched no layer"):
        qn.quantize_model(nm, (QuantRule(".*"), QuantRule("conv7")))
    with pytest.raises(TypeError, match="flax.nnx.Module"):
        qn.quantize_model(mlinen.CNN(CFG), QuantRule(".*"))


class _Mlp(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(2, 8, rngs=rngs)
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(jax.nn.relu(self.fc(x)))


def test_optimizer_built_before_calibrate_keeps_working():
    import optax

    rule = QuantRule(
        ".*",
        weight="int4",
        act=IntFormat(4, signed=False),
        estimator="lsq",
        learned_init="calibration",  # the learned step starts at the calibrated range
    )
    qnm, _ = qn.quantize_model(_Mlp(nnx.Rngs(0)), rule)
    params = nnx.state(qnm, nnx.Param).to_pure_dict()
    assert set(params["fc"]) == {"kernel", "bias", "kernel_scale", "input_scale"}
    assert np.isfinite(params["fc"]["input_scale"]) and params["fc"]["input_scale"] > 0
    opt = nnx.Optimizer(qnm, optax.adam(1e-2), wrt=nnx.Param)  # before calibrate
    x = X[:, :, 0].reshape(-1, 2)
    qn.calibrate(qnm, [x])
    calibrated = float(qnm.fc.input_scale.value)
    np.testing.assert_allclose(calibrated, qnm.fc.input_qparams.value["scale"])  # set by calibrate
    qn.with_phase(qnm, "train")

    @nnx.jit
    def step(m, opt, x):
        loss, g = nnx.value_and_grad(lambda m: jnp.mean((m(x) - 1.0) ** 2))(m)
        opt.update(m, g)
        return loss

    loss = step(qnm, opt, x)
    assert np.isfinite(loss)
    assert float(qnm.fc.input_scale.value) != calibrated  # the learned step size moved
    other, _ = qn.quantize_model(_Mlp(nnx.Rngs(0)), QuantRule(".*"))
    other.fc.rule = rule  # learned scales would appear after the optimizer: refused
    with pytest.raises(ValueError, match="no learned parameter 'input_scale'.*final rule"):
        qn.calibrate(other, [x])


class _General(nnx.Module):
    def __init__(self, rngs):
        init = nnx.initializers.normal(1.0)
        self.lg = nnx.LinearGeneral(5, (2, 3), bias_init=init, rngs=rngs)
        self.ein = nnx.Einsum("btnh,nhk->btk", (2, 3, 4), (4,), bias_init=init, rngs=rngs)

    def __call__(self, x):
        return self.ein(self.lg(x))


def test_linear_general_and_einsum_quantized_like_their_numpy_reference():
    def np_fq(x, s, zp, lo, hi):
        return (np.clip(np.round(x / s) + zp, lo, hi) - zp) * s

    x = jax.random.normal(jax.random.key(3), (2, 3, 5))
    model = _General(nnx.Rngs(0))
    for mode in ("simulate", "int"):
        qnm, match = qn.quantize_model(model, QuantRule(".*", mode=mode))
        assert isinstance(qnm.lg, qn.QLinearGeneral) and isinstance(qnm.ein, qn.QEinsum)
        assert set(match.assignment) == {"lg", "ein"}
        qn.calibrate(qnm, [x])
        qn.with_phase(qnm, "eval")
        y = nnx.jit(lambda m, x: m(x))(qnm, x)
        h = np.asarray(x, np.float64)
        layers = ((qnm.lg, "btd,dnh->btnh", 0), (qnm.ein, "btnh,nhk->btk", (0, 1)))
        listed = {q.path: q for q in qn.quantized_layers(qnm)}  # listed as Linen lists them
        assert set(listed) == {"lg", "ein"}
        for layer, eq, contracted in layers:
            qp = layer.input_qparams.value
            h = np_fq(h, float(qp["scale"]), float(qp["zero_point"]), -128, 127)
            w = np.asarray(layer.kernel.value, np.float64)
            s_w = np.abs(w).max(axis=contracted, keepdims=True) / 127
            s_listed = listed[layer.quant_path].kernel_qparams.scale  # per output channel
            np.testing.assert_allclose(np.ravel(s_listed), np.ravel(s_w), rtol=1e-6)
            h = np.einsum(eq, h, np_fq(w, s_w, 0, -127, 127)) + np.asarray(layer.bias.value)
        np.testing.assert_allclose(y, h, atol=5e-5, err_msg=mode)
    y_float = nnx.jit(lambda m, x: m(x))(model, x)
    assert np.abs(y_float - y).max() > 1e-3


def test_a_bare_layer_is_quantized_like_linen_dense():
    """A model that is itself an ``nnx.Linear`` (path ``""``) becomes a QLinear, equal to the
    Linen ``nn.Dense`` quantized by the same rule."""
    x = jax.random.normal(jax.random.key(4), (4, 6))
    layer = nnx.Linear(6, 3, rngs=nnx.Rngs(0))
    qnm, match = qn.quantize_model(layer, QuantRule(".*"))
    assert isinstance(qnm, qn.QLinear) and set(match.assignment) == {""}
    assert type(layer) is nnx.Linear  # the input model is unchanged
    qn.calibrate(qnm, [x])
    y = qn.with_phase(qnm, "eval")(x)
    params = {"kernel": layer.kernel.value, "bias": layer.bias.value}
    qlm, _ = ql.quantize_model(nn.Dense(3), QuantRule(".*"), x)
    v = qlm.calibrate(qlm.attach({"params": params}, x), [x])
    np.testing.assert_allclose(y, qlm.with_phase("eval").apply(v, x), rtol=1e-6, atol=1e-6)
    assert np.abs(np.asarray(y) - np.asarray(layer(x))).max() > 1e-4  # it is quantized


class _Unsupported(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.ConvTranspose(2, 2, (3,), rngs=rngs)
        self.lora = nnx.LoRALinear(2, 3, lora_rank=1, rngs=rngs)


def test_layers_with_a_kernel_rules_cannot_quantize_are_reported():
    model = _Unsupported(nnx.Rngs(0))
    with pytest.warns(UserWarning, match=r"'lora' \(LoRALinear\), 'up' \(ConvTranspose\)"):
        qnm, match = qn.quantize_model(model, QuantRule(".*"))
    assert match.not_quantized == {"up": "ConvTranspose", "lora": "LoRALinear"}
    assert match.assignment == {} and match.unused == ()
    assert type(qnm.lora) is nnx.LoRALinear  # left as it is, not replaced by a QLinear


def test_same_verbs_as_linen_and_the_shared_calibration_loop(capsys):
    nm = mnnx.CNN(CFG, (16, 2), rngs=nnx.Rngs(0))
    qnm, _ = qn.quantize_model(nm, QuantRule(".*"))
    with pytest.raises(ValueError, match="max_batches"):
        qn.calibrate(qnm, BATCHES, max_batches=0)
    assert qnm.conv1.phase == qnm.head.phase == "float"  # untouched by the error
    qn.calibrate(qnm, BATCHES, max_batches=1, progress=True)
    assert "calibrate" in capsys.readouterr().err
    assert qn.with_phase(qnm, "eval") is qnm and qnm.conv1.phase == "eval"
    with pytest.warns(DeprecationWarning, match="with_phase"):
        assert qn.set_phase(qnm, "train") is qnm
    assert qnm.head.phase == "train"
