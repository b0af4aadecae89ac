"""Tests of jquant.ptq: RTN, GPTQ against a NumPy Algorithm 1, AWQ, SmoothQuant, rotations."""

import collections
import dataclasses
import functools
import logging
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from flax import nnx

import jquant as jq
from jquant import ptq
from jquant.models import gpt
from jquant.models import nnx as nnx_models
from jquant.models.config import GPTConfig

IN, OUT, BLOCK = 64, 16, 32
CONFIGS = [(None, False), (16, False), (None, True), (16, True)]  # (group_size, act_order)


# ------------------------------------------------------------------ NumPy oracle, from the paper


def _np_ranges(w, bits):
    """Affine min-max grid over the last axis: range widened to 0, zero point rounded."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    lo, hi = np.minimum(w.min(-1), 0.0), np.maximum(w.max(-1), 0.0)
    scale = (hi - lo) / (qmax - qmin)
    scale = np.where(scale > 0, scale, 1.0)
    return scale, np.clip(np.round(qmin - lo / scale), qmin, qmax)


def _np_quant(w, scale, zero, bits):
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return scale * (np.clip(np.round(w / scale) + zero, qmin, qmax) - zero)


def gptq_numpy(kernel, x, bits, *, group_size=None, damp=0.01, act_order=False):
    """Frantar et al. 2022, Algorithm 1 without lazy batches (one column at a time), float64.

    W is (out, in) as in the paper; dead inputs get H_jj = 1 and zero weights; per-channel
    ranges (and every group's with act_order) from W before updates, a group's range from its
    current weights at its first column otherwise.
    """
    w = np.asarray(kernel, np.float64).T.copy()
    x = np.asarray(x, np.float64)
    h = 2 * x.T @ x
    n = h.shape[0]
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    g = group_size or n
    static = _np_ranges(w.reshape(w.shape[0], n // g, g), bits)  # (out, groups)
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(n)
    w, h = w[:, perm], h[perm][:, perm]
    h += damp * np.mean(np.diag(h)) * np.eye(n)
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: H^-1 = U^T U
    q = np.zeros_like(w)
    for j in range(n):
        orig = perm[j]
        if group_size is None or act_order:
            scale, zero = static[0][:, orig // g], static[1][:, orig // g]
        elif orig % g == 0:
            scale, zero = _np_ranges(w[:, j : j + g], bits)
        q[:, j] = _np_quant(w[:, j], scale, zero, bits)
        err = (w[:, j] - q[:, j]) / u[j, j]
        w[:, j:] -= np.outer(err, u[j, j:])
    return q[:, np.argsort(perm)].T


# ------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def layer():
    """A kernel, correlated calibration inputs (rank-8 structure plus noise, channel scales
    spanning 10x) and a dead input channel."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(IN, OUT)).astype(np.float32)
    z = rng.normal(size=(512, 8)) @ rng.normal(size=(8, IN))
    x = (z + 0.1 * rng.normal(size=(512, IN))) * np.geomspace(0.3, 3.0, IN)
    x[:, 5] = 0.0
    return jnp.asarray(w), jnp.asarray(x, jnp.float32)


def _err(x, w, wq):
    return float(jnp.sum((x @ w - x @ wq) ** 2))


# ------------------------------------------------------------------------------------------ RTN


def test_rtn_matches_numpy_per_channel_and_per_group(layer):
    w, _ = layer
    for group_size in (None, 16):
        q = ptq.rtn(w, jq.int4, group_size=group_size)
        g = group_size or IN
        wg = np.asarray(w).T.reshape(OUT, IN // g, g)
        scale, zero = _np_ranges(wg, 4)
        want = _np_quant(wg, scale[..., None], zero[..., None], 4).reshape(OUT, IN).T
        np.testing.assert_allclose(q.kernel, want, rtol=0, atol=1e-6)
        assert q.qparams.scale.shape == ((1, OUT) if group_size is None else (4, 1, OUT))


# ----------------------------------------------------------------------------------------- GPTQ


@pytest.mark.parametrize("group_size, act_order", CONFIGS)
def test_gptq_with_an_identity_hessian_is_rtn(layer, group_size, act_order):
    w, _ = layer
    x = 3.0 * jnp.eye(IN)  # H = 18 I: no error is ever propagated
    got = ptq.gptq(w, x, jq.int4, group_size=group_size, act_order=act_order, block=BLOCK)
    want = ptq.rtn(w, jq.int4, group_size=group_size)
    np.testing.assert_array_equal(got.kernel, want.kernel)
    np.testing.assert_array_equal(got.qparams.scale, want.qparams.scale)
    np.testing.assert_array_equal(got.qparams.zero_point, want.qparams.zero_point)


@pytest.mark.parametrize("group_size, act_order", CONFIGS)
def test_gptq_equals_numpy_algorithm_1_and_beats_rtn(layer, group_size, act_order):
    w, x = layer
    got = ptq.gptq(w, x, jq.int4, group_size=group_size, act_order=act_order, block=BLOCK)
    want = gptq_numpy(w, x, 4, group_size=group_size, act_order=act_order)
    # float32 with lazy batches vs float64 column by column: the same grid points (a flipped
    # rounding would differ by a whole step, ~0.1 here)
    np.testing.assert_allclose(got.kernel, want, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got.kernel)[5], 0.0)  # the dead input
    # on the grid of its QParams
    requant = ptq.fake_quant_kernel(got.kernel, got.qparams, jq.int4, group_size=group_size)
    np.testing.assert_allclose(requant, got.kernel, rtol=0, atol=1e-6)
    # the layer's reconstruction error against RTN's (measured: 0.27 per channel, 0.31 per
    # group; with act_order 0.008 and 0.010)
    rtn = ptq.rtn(w, jq.int4, group_size=group_size).kernel
    assert _err(x, w, got.kernel) < (0.05 if act_order else 0.4) * _err(x, w, rtn)


def test_gptq_block_size_does_not_change_the_result(layer):
    w, x = layer
    a = ptq.gptq(w, x, jq.int4, group_size=16, block=BLOCK).kernel
    b = ptq.gptq(w, x, jq.int4, group_size=16, block=8).kernel  # rounded up to 16
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)  # float rounding, never a whole step


def test_gptq_of_a_wide_layer_equals_numpy_algorithm_1():
    """530 inputs: the Hessian's symmetric product runs in 2 column blocks and the Cholesky
    factor of the inverse Hessian recurses by halves (265, then 132 / 133, then 66 / 67),
    against float64 NumPy."""
    rng = np.random.default_rng(1)
    n_in = 530
    w = rng.normal(size=(n_in, 8)).astype(np.float32)
    x = rng.normal(size=(1024, 32)) @ rng.normal(size=(32, n_in)) + rng.normal(size=(1024, n_in))
    x = jnp.asarray(x, jnp.float32)
    x64 = np.asarray(x, np.float64)
    np.testing.assert_allclose(ptq.hessian(x), 2 * x64.T @ x64, rtol=2e-5, atol=1e-2)
    got = np.asarray(ptq.gptq(jnp.asarray(w), x, jq.int4).kernel)
    want = gptq_numpy(w, x, 4)
    same = np.abs(got - want) < 1e-5
    assert same.mean() > 0.999, same.mean()  # float32 vs float64: a rare flipped rounding


def test_gptq_act_order_helps_with_uneven_channel_scales(layer):
    w, x = layer
    plain = ptq.gptq(w, x, jq.int3, block=BLOCK).kernel
    ordered = ptq.gptq(w, x, jq.int3, act_order=True, block=BLOCK).kernel
    assert _err(x, w, ordered) < _err(x, w, plain)


# ------------------------------------------------------------------------------------------ AWQ


def test_awq_is_never_worse_than_rtn_and_wins_with_salient_channels():
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.normal(size=(IN, OUT)), jnp.float32)
    x = rng.normal(size=(256, IN))
    x[:, :4] *= 20.0  # a few salient input channels
    x = jnp.asarray(x, jnp.float32)
    for group_size in (None, 16):
        res = ptq.awq(w, x, jq.int3, group_size=group_size)
        rtn = ptq.rtn(w, jq.int3, group_size=group_size).kernel
        awq_err = float(jnp.mean((x @ w - (x / res.scales) @ res.kernel) ** 2))
        rtn_err = float(jnp.mean((x @ w - x @ rtn) ** 2))
        assert awq_err == pytest.approx(float(res.error), rel=1e-4)
        assert awq_err < 0.8 * rtn_err and 0.0 < float(res.alpha) < 1.0
    # inputs of equal magnitude: alpha = 0 (s = 1) is in the grid, so never worse than RTN
    flat = jnp.asarray(np.sign(rng.normal(size=(64, IN))), jnp.float32)
    res = ptq.awq(w, flat, jq.int4, group_size=16, grid=4)
    rtn = ptq.rtn(w, jq.int4, group_size=16).kernel
    assert float(res.error) <= float(jnp.mean((flat @ w - flat @ rtn) ** 2)) * (1 + 1e-6)


def _np_clip_errors(w, x, bits, ratios):
    """AWQ's auto_clip per output channel in NumPy (float64): ``(out, len(ratios))`` errors
    mean_n (x w_c - x Q(clip(w_c, +-r max|w_c|)))^2, Q symmetric RTN (scale r max|w_c| /
    qmax; affine ranges of a kernel clipped on both sides put the zero point on a .5 tie,
    which float32 and float64 round apart); the search picks each row's argmin."""
    w, x = np.asarray(w, np.float64), np.asarray(x, np.float64)
    qmax = 2 ** (bits - 1) - 1
    errs = np.zeros((w.shape[1], len(ratios)))
    for c in range(w.shape[1]):
        m = np.abs(w[:, c]).max()
        for i, r in enumerate(ratios):
            scale = r * m / qmax
            q = scale * np.clip(np.round(np.clip(w[:, c], -r * m, r * m) / scale), -qmax - 1, qmax)
            errs[c, i] = np.mean((x @ w[:, c] - x @ q) ** 2)
    return errs


def test_awq_clip_per_channel_matches_a_numpy_auto_clip():
    rng = np.random.default_rng(6)
    w = jnp.asarray(rng.standard_t(3, size=(IN, OUT)), jnp.float32)  # heavy tails: clipping pays
    x = jnp.asarray(rng.normal(size=(128, IN)), jnp.float32)
    res = ptq.awq(w, x, jq.int3, group_size=None, grid=1, clip=True, symmetric=True)  # s = 1
    np.testing.assert_array_equal(res.scales, 1.0)
    ratios = 1.0 - np.arange(10) / 20  # the code's n_grid 20, max_shrink 0.5
    errs = _np_clip_errors(w, x, 3, ratios)
    picked = np.rint((1.0 - np.asarray(res.clip_ratio[0])) * 20).astype(int)
    np.testing.assert_array_equal(picked, np.argmin(errs, 1))
    assert float(jnp.min(res.clip_ratio)) < 1.0  # some channel is clipped
    # the kernel is RTN of the clipped kernel (on its grid)
    m = res.clip_ratio * jnp.max(jnp.abs(w), axis=0, keepdims=True)
    want = ptq.rtn(jnp.clip(w, -m, m), jq.int3, symmetric=True).kernel
    np.testing.assert_allclose(res.kernel, want, rtol=0, atol=1e-6)


@pytest.mark.slow  # ~15-20 s on the loaded 2-core machine; a sibling test stays default
def test_awq_clip_never_increases_the_layer_output_error():
    """After the scale search, on the calibration inputs: error(clip) <= error(no clip)."""
    rng = np.random.default_rng(7)
    for trial, (group_size, symmetric) in enumerate([(None, False), (16, False), (16, True)]):
        w = jnp.asarray(rng.standard_t(2 + trial, size=(IN, OUT)), jnp.float32)
        x = rng.normal(size=(96, IN)) * np.geomspace(0.2, 5.0, IN)
        x = jnp.asarray(rng.permutation(x, axis=1), jnp.float32)
        kw = {"group_size": group_size, "symmetric": symmetric, "grid": 3}
        plain, clipped = ptq.awq(w, x, jq.int3, **kw), ptq.awq(w, x, jq.int3, **kw, clip=True)
        np.testing.assert_array_equal(clipped.scales, plain.scales)  # clipping comes after
        err = float(jnp.mean((x @ w - (x / clipped.scales) @ clipped.kernel) ** 2))
        assert err == pytest.approx(float(clipped.error), rel=1e-4)
        assert err <= float(plain.error) * (1 + 1e-5)
        groups = IN // (group_size or IN)
        assert clipped.clip_ratio.shape == (groups, OUT)
        assert set(np.round(np.asarray(clipped.clip_ratio) * 20).ravel()) <= set(range(11, 21))
        np.testing.assert_array_equal(plain.clip_ratio, 1.0)


# ------------------------------------------------------------------------- SmoothQuant, rotation


def test_smoothquant_scales_balance_the_ranges():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(128, 8)) * np.array([1, 1, 50, 1, 1, 1, 0.01, 1])
    w = rng.normal(size=(8, 4))
    xa, wa = np.abs(x).max(0), np.abs(w).max(1)
    s = np.asarray(ptq.smoothquant_scales(xa, wa, alpha=0.5))
    np.testing.assert_allclose(np.abs(x / s).max(0), np.abs(w * s[:, None]).max(1), rtol=1e-5)
    np.testing.assert_allclose(ptq.smoothquant_scales(xa, wa, alpha=1.0), xa, rtol=1e-6)
    smoothed = ptq.scale_input(jnp.asarray(w, jnp.float32), s)
    np.testing.assert_allclose((x / s) @ smoothed, x @ w, rtol=1e-4, atol=1e-4)
    assert np.all(np.isfinite(ptq.smoothquant_scales(np.zeros(3), np.zeros(3))))


@pytest.mark.parametrize("n", [1, 2, 8, 64])
def test_hadamard_is_orthogonal_and_matches_scipy(n):
    h = np.asarray(ptq.hadamard(n))
    np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-6)
    np.testing.assert_allclose(h * np.sqrt(n), scipy.linalg.hadamard(n), atol=1e-5)
    r = np.asarray(ptq.random_hadamard(jax.random.key(0), n))
    np.testing.assert_allclose(r @ r.T, np.eye(n), atol=1e-6)


@pytest.mark.parametrize("n", [12, 20, 28, 40, 48, 96, 112])
def test_hadamard_of_a_factorisable_size_is_a_hadamard_matrix(n):
    """n = 2^k m (Paley I/II for m): orthogonal with entries +-1/sqrt(n), i.e. sqrt(n) H is a
    Hadamard matrix (H H^T = n I, the definition)."""
    h = np.asarray(ptq.hadamard(n), np.float64)
    np.testing.assert_allclose(np.abs(h) * np.sqrt(n), 1.0, atol=1e-6)
    np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-6)
    online = ptq.OnlineHadamard(n)
    x = jnp.asarray(np.random.default_rng(n).normal(size=(3, n)), jnp.float32)
    np.testing.assert_allclose(online(x, 0), x @ h, rtol=1e-5, atol=1e-5)
    assert online == ptq.OnlineHadamard(n) and hash(online) == hash(ptq.OnlineHadamard(n))


def test_rotated_linear_pair_with_rmsnorm_computes_the_same_function():
    """QuaRot: y = rmsnorm(x W1; g) W2 = rmsnorm(x W1 Q; 1) (Q^T diag(g) W2)."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(32, 16)), jnp.float32)
    w1, w2 = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((16, 16), (16, 8)))
    gain = jnp.asarray(rng.uniform(0.5, 2.0, 16), jnp.float32)

    def rms(h):
        return h / jnp.sqrt(jnp.mean(h**2, -1, keepdims=True) + 1e-6)

    want = (rms(x @ w1) * gain) @ w2
    q = ptq.random_hadamard(jax.random.key(1), 16)
    got = rms(x @ ptq.rotate_output(w1, q)) @ ptq.rotate_input(ptq.absorb_gain(gain, w2), q)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # the rotated activations are the originals times Q
    np.testing.assert_allclose(x @ ptq.rotate_output(w1, q), (x @ w1) @ q, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda w, x: ptq.gptq(w, x[:, :-1], jq.int4), "x must be the layer's inputs"),
        (lambda w, x: ptq.awq(w, x[:, :-1], jq.int4, group_size=None), "x must be"),
        (lambda w, x: ptq.gptq(w, x, jq.int4, group_size=24), "group_size must divide"),
        (lambda w, x: ptq.rtn(w, jq.int4, group_size=0), "group_size"),
        (lambda w, x: ptq.awq(w, x, jq.int4, group_size=7), "group_size must divide"),
        (lambda w, x: ptq.gptq(w, x, jq.int4, damp=0.0), "damp"),
        (lambda w, x: ptq.gptq(w, x, jq.int4, block=0), "block"),
        (lambda w, x: ptq.gptq(w[0], x, jq.int4), "kernel"),
        (lambda w, x: ptq.gptq_from_hessian(w, jnp.eye(3), jq.int4), "h must be"),
        (lambda w, x: ptq.hadamard(92), "power of 2 times a Paley size"),
        (lambda w, x: ptq.hadamard(6), "power of 2 times a Paley size"),
        (lambda w, x: ptq.OnlineHadamard(172), "OnlineHadamard.n"),
        (lambda w, x: ptq.OnlineHadamard(8)(x), "width 64"),
        (lambda w, x: ptq.awq(w, x, jq.int4, group_size=None, max_shrink=1.0), "max_shrink"),
        (lambda w, x: ptq.awq(w, x, jq.int4, group_size=None, clip_grid=2), ">= 2"),
        (lambda w, x: ptq.rotate_input(w, jnp.eye(OUT)), "q must be"),
        (lambda w, x: ptq.scale_input(w, jnp.ones(3)), "s must have shape"),
        (lambda w, x: ptq.smoothquant_scales(jnp.ones(3), jnp.ones(4)), "x_absmax"),
        (lambda w, x: ptq.smoothquant_scales(jnp.ones(3), jnp.ones(3), 1.5), "alpha"),
    ],
)
def test_bad_input_raises_naming_the_argument(layer, call, match):
    w, x = layer
    with pytest.raises(ValueError, match=match):
        call(w, x)


def test_non_finite_calibration_inputs_raise(layer):
    w, x = layer
    with pytest.raises(ValueError, match="positive definite"):
        ptq.gptq(w, x.at[0, 0].set(jnp.nan), jq.int4, block=BLOCK)


# ------------------------------------------------------------------ whole model: quantize_model

GPT_CFG = GPTConfig(vocab_size=13, context=16, num_layers=2, num_heads=2, width=32)


@pytest.fixture(scope="module")
def tiny_gpt():
    """A 2-layer width-32 GPT with non-trivial RMSNorm gains, calibration and eval tokens."""
    model = gpt.GPT(GPT_CFG)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))
    keys = iter(jax.random.split(jax.random.key(1), 16))
    variables = jax.tree_util.tree_map_with_path(
        lambda p, v: (
            v * jnp.exp(0.3 * jax.random.normal(next(keys), v.shape))
            if "scale" in jax.tree_util.keystr(p)
            else v
        ),
        variables,
    )
    calib = [jax.random.randint(jax.random.key(s), (4, 16), 0, 13) for s in (2, 3)]
    return model, variables, calib, jax.random.randint(jax.random.key(4), (4, 16), 0, 13)


def _norm_output(model, variables, tokens, path):
    """The RMSNorm at ``path``'s output, via Flax's capture_intermediates (N, width)."""
    _, state = model.apply(variables, tokens, capture_intermediates=True, mutable="intermediates")
    tree = state["intermediates"]
    for key in path.split("/"):
        tree = tree[key]
    return tree["__call__"][0].reshape(-1, GPT_CFG.width)


def test_outlier_injection_preserves_the_float_model_and_shows_in_activations(tiny_gpt):
    model, variables, _, tokens = tiny_gpt
    injected = ptq.inject_outlier(model, variables, "block1/norm1", 5, 30.0)
    np.testing.assert_allclose(
        model.apply(injected, tokens), model.apply(variables, tokens), rtol=1e-5, atol=1e-5
    )
    before = jnp.abs(_norm_output(model, variables, tokens, "block1/norm1"))
    after = jnp.abs(_norm_output(model, injected, tokens, "block1/norm1"))
    np.testing.assert_allclose(after[:, 5], 30.0 * before[:, 5], rtol=1e-5)
    assert float(jnp.max(after[:, 5])) > 5 * float(jnp.max(jnp.delete(after, 5, axis=1)))
    with pytest.raises(ValueError, match="norm must be"):
        ptq.inject_outlier(model, variables, "block1/attn", 0, 2.0)


def test_rotation_and_smoothing_preserve_the_float_model(tiny_gpt):
    model, variables, calib, tokens = tiny_gpt
    want = model.apply(variables, tokens)
    rotated, rvars = ptq.rotate_model(model, variables, seed=1)
    assert not rotated.config.tied_embeddings
    np.testing.assert_allclose(rotated.apply(rvars, tokens), want, rtol=1e-4, atol=1e-4)
    assert all(
        bool(jnp.all(leaf == 1.0))
        for path, leaf in jax.tree_util.tree_leaves_with_path(rvars)
        if "scale" in jax.tree_util.keystr(path)
    )
    smoothed = ptq.smooth_model(model, variables, calib, alpha=0.5)
    np.testing.assert_allclose(model.apply(smoothed, tokens), want, rtol=1e-4, atol=1e-4)


def _down_inputs(model, variables, tokens):
    """The input of every block's ``mlp/down`` Dense, (N, hidden), by Flax's method
    interception."""
    seen = {}

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and context.module.path[-1:] == ("down",):
            seen[context.module.path[0]] = args[0].reshape(-1, args[0].shape[-1])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        model.apply(variables, tokens)
    return seen


def test_online_hadamard_preserves_the_float_model_and_spreads_down_input_outliers(tiny_gpt):
    model, variables, _, tokens = tiny_gpt
    hidden = GPT_CFG.mlp_ratio * GPT_CFG.width
    # an outlier channel of the MLP hidden activation: up's column 7 times 30 in block 1
    up = variables["params"]["block1"]["mlp"]["up"]["kernel"]
    params = {**variables["params"]}
    params["block1"] = {**params["block1"], "mlp": {**params["block1"]["mlp"]}}
    params["block1"]["mlp"]["up"] = {"kernel": up.at[:, 7].multiply(30.0)}
    variables = {**variables, "params": params}
    want = model.apply(variables, tokens)
    before = _down_inputs(model, variables, tokens)["block1"]

    def peak(a):  # max |a| over the rms, per token, worst token
        return float(jnp.max(jnp.max(jnp.abs(a), -1) / jnp.sqrt(jnp.mean(a**2, -1))))

    peaks = {}
    for seed in (None, 3):
        rotated, rvars = ptq.rotate_mlp(model, variables, seed)
        assert rotated.mlp_transform == ptq.OnlineHadamard(hidden, seed)
        np.testing.assert_allclose(rotated.apply(rvars, tokens), want, rtol=1e-4, atol=1e-4)
        after = _down_inputs(rotated, rvars, tokens)["block1"]
        m = np.asarray(ptq.hadamard(hidden))
        if seed is not None:
            m = np.asarray(ptq.random_hadamard(jax.random.key(seed), hidden))
        np.testing.assert_allclose(after, before @ m, rtol=1e-4, atol=1e-4)
        peaks[seed] = peak(after)
    assert model.mlp_transform is None
    # measured 11.2 -> 6.3 with H (gelu's mean lands in channel 0), -> 3.3 with random signs
    assert peaks[None] < 0.6 * peak(before) and peaks[3] < 0.4 * peak(before)
    # the NNX twin, holding the same transform and variables, computes the same function
    nnx_model = gpt.NNXGPT(GPT_CFG, rngs=nnx.Rngs(0), mlp_transform=rotated.mlp_transform)
    nnx_model = nnx_models.linen_to_nnx(rvars, nnx_model)
    np.testing.assert_allclose(nnx_model(tokens), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="already has an mlp_transform"):
        ptq.rotate_mlp(rotated, rvars)
    bad = gpt.GPT(GPTConfig(vocab_size=5, context=4, num_layers=1, num_heads=1, width=23))
    with pytest.raises(ValueError, match="OnlineHadamard.n"):  # 92: no Hadamard built here
        ptq.rotate_mlp(bad, {})


def test_head_rotation_and_every_rotation_together_preserve_the_float_model(tiny_gpt):
    model, variables, _, tokens = tiny_gpt
    want = model.apply(variables, tokens)
    hv = ptq.rotate_heads(model, variables)
    np.testing.assert_allclose(model.apply(hv, tokens), want, rtol=1e-4, atol=1e-4)
    d = GPT_CFG.head_dim
    v0, v1 = _kernel(variables, 1, "attn/value"), _kernel(hv, 1, "attn/value")
    np.testing.assert_allclose(v1[:, d:], v0[:, d:] @ ptq.hadamard(d), rtol=1e-5, atol=1e-6)
    m, v = ptq.rotate_model(model, variables, seed=2)
    m, v = ptq.rotate_mlp(m, ptq.rotate_heads(m, v), seed=4)
    assert m.mlp_transform is not None and not m.config.tied_embeddings
    np.testing.assert_allclose(m.apply(v, tokens), want, rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # ~15-20 s on the loaded 2-core machine; a sibling test stays default
def test_online_hadamard_recipe_quantizes_the_rotated_down_kernel(tiny_gpt):
    model, variables, calib, _ = tiny_gpt
    recipe = ptq.Recipe("rtn", weight="int4", online_hadamard="hadamard", rotate_heads=True)
    out = ptq.quantize_model(model, variables, calib, recipe)
    assert out.model.mlp_transform == ptq.OnlineHadamard(GPT_CFG.mlp_ratio * GPT_CFG.width)
    rotated = ptq.rotate_input(_kernel(variables, 2, "mlp/down"), ptq.hadamard(128))
    want = ptq.rtn(rotated, jq.int4).kernel
    np.testing.assert_allclose(_kernel(out.variables, 2, "mlp/down"), want, rtol=0, atol=1e-6)
    random = dataclasses.replace(recipe, online_hadamard="random", seed=5)
    assert ptq.quantize_model(model, variables, calib, random).model.mlp_transform == (
        ptq.OnlineHadamard(128, seed=5)
    )


@pytest.mark.slow  # three W4A4 recipes (about 1 min at load ~20)
def test_online_hadamard_lowers_w4a4_error_with_a_hidden_outlier(tiny_gpt):
    """An outlier channel of the MLP hidden activation (up's column 7 times 30): W4A4 (act
    quantized per token) loses less with the online Hadamard before down."""
    model, variables, calib, tokens = tiny_gpt
    params = {**variables["params"]}
    for b in ("block1", "block2"):
        mlp = params[b]["mlp"]
        params[b] = {
            **params[b],
            "mlp": {**mlp, "up": {"kernel": mlp["up"]["kernel"].at[:, 7].multiply(30.0)}},
        }
    variables = {**variables, "params": params}
    want = model.apply(variables, tokens)
    errors = {}
    for online in (None, "hadamard", "random"):
        recipe = ptq.Recipe("rtn", weight="int8", act="int4", online_hadamard=online, seed=1)
        runner, rvars = ptq.quantize_model(model, variables, calib, recipe).runner(tokens)
        errors[online] = float(jnp.mean((runner.apply(rvars, tokens) - want) ** 2))
    assert errors["random"] < errors[None] and errors["hadamard"] < errors[None], errors


def _kernel(variables, block, name):
    return variables["params"][f"block{block}"][name.split("/")[0]][name.split("/")[1]]["kernel"]


@pytest.mark.slow  # GPTQ per kernel shape, 8 layer-input captures (47 s at load ~16)
def test_gptq_recipe_is_sequential_and_layerwise_gptq(tiny_gpt):
    """Block 1's query is ptq.gptq on the float model's norm1 output; block 2's on the norm1
    output of the model whose block 1 is already quantized (and block 2 still float)."""
    model, variables, calib, _ = tiny_gpt
    recipe = ptq.Recipe("gptq", weight=jq.IntFormat(3), group_size=8)
    out = ptq.quantize_model(model, variables, calib, recipe)
    x1 = jnp.concatenate([_norm_output(model, variables, t, "block1/norm1") for t in calib])
    want = ptq.gptq(_kernel(variables, 1, "attn/query"), x1, jq.IntFormat(3), group_size=8)
    np.testing.assert_allclose(_kernel(out.variables, 1, "attn/query"), want.kernel, atol=1e-5)
    partial = {"params": {**variables["params"], "block1": out.variables["params"]["block1"]}}
    x2 = jnp.concatenate([_norm_output(model, partial, t, "block2/norm1") for t in calib])
    want = ptq.gptq(_kernel(variables, 2, "attn/query"), x2, jq.IntFormat(3), group_size=8)
    np.testing.assert_allclose(_kernel(out.variables, 2, "attn/query"), want.kernel, atol=1e-5)
    rtn = ptq.quantize_model(model, variables, calib, dataclasses.replace(recipe, method="rtn"))
    np.testing.assert_allclose(
        _kernel(rtn.variables, 2, "mlp/down"),
        ptq.rtn(_kernel(variables, 2, "mlp/down"), jq.IntFormat(3), group_size=8).kernel,
    )


@pytest.mark.slow  # AWQ's grid search per group shape (18 s at load ~16)
def test_awq_recipe_folds_its_scales_into_the_norm_and_the_value_kernel(tiny_gpt):
    model, variables, calib, tokens = tiny_gpt
    recipe = ptq.Recipe("awq", weight=jq.IntFormat(3), group_size=8)
    out = ptq.quantize_model(model, variables, calib, recipe)
    p, q = variables["params"]["block1"], out.variables["params"]["block1"]
    s = p["norm1"]["scale"] / q["norm1"]["scale"]  # the scales AWQ folded into the gain
    assert float(jnp.max(jnp.abs(s - 1.0))) > 1e-3
    for name in ("query", "key"):  # value: also divided by the out layer's scales
        want = ptq.rtn(ptq.scale_input(p["attn"][name]["kernel"], s), jq.IntFormat(3), group_size=8)
        np.testing.assert_allclose(q["attn"][name]["kernel"], want.kernel, rtol=1e-5, atol=1e-6)
    # quantized logits stay finite and near the float model's
    qlogits = model.apply(out.variables, tokens)
    assert float(jnp.max(jnp.abs(qlogits - model.apply(variables, tokens)))) < 1.0


@pytest.mark.slow  # AWQ's grid search per group shape, with the clipping search
def test_awq_clip_recipe_clips_down_alone_on_its_sequential_inputs(tiny_gpt):
    """With awq_clip, block 1's down kernel is ptq.awq's clipping search alone (grid 1, s = 1)
    on down's input in the model whose earlier layers are quantized."""
    model, variables, calib, _ = tiny_gpt
    recipe = ptq.Recipe("awq", weight=jq.IntFormat(3), group_size=8, awq_clip=True)
    out = ptq.quantize_model(model, variables, calib, recipe)
    x = jnp.concatenate([_down_inputs(model, out.variables, t)["block1"] for t in calib])
    want = ptq.awq(
        _kernel(variables, 1, "mlp/down"), x, jq.IntFormat(3), group_size=8, grid=1, clip=True
    )
    np.testing.assert_allclose(_kernel(out.variables, 1, "mlp/down"), want.kernel, atol=1e-5)
    assert float(jnp.min(want.clip_ratio)) < 1.0
    plain = ptq.rtn(_kernel(variables, 1, "mlp/down"), jq.IntFormat(3), group_size=8).kernel
    assert float(jnp.max(jnp.abs(want.kernel - plain))) > 0.0


@pytest.mark.slow  # two W8A8 recipes (129 s measured at load average ~30)
def test_smoothquant_w8a8_recovers_naive_w8a8_on_an_outlier_model(tiny_gpt):
    model, variables, calib, tokens = tiny_gpt
    for block in (1, 2):
        for norm in ("norm1", "norm2"):
            variables = ptq.inject_outlier(model, variables, f"block{block}/{norm}", 3, 100.0)
    want = model.apply(variables, tokens)
    errors = {}
    for transform in (None, "smoothquant"):
        recipe = ptq.Recipe("rtn", weight="int8", act="int8", transform=transform, symmetric=True)
        runner, rvars = ptq.quantize_model(model, variables, calib, recipe).runner(tokens)
        errors[transform] = float(jnp.mean((runner.apply(rvars, tokens) - want) ** 2))
    assert errors["smoothquant"] < 0.5 * errors[None]


def test_quantize_model_bad_input(tiny_gpt):
    model, variables, calib, _ = tiny_gpt
    with pytest.raises(ValueError, match="Recipe.method"):
        ptq.Recipe("nearest")
    with pytest.raises(ValueError, match="group_size must divide"):
        ptq.quantize_model(model, variables, calib, ptq.Recipe(group_size=24))
    with pytest.raises(ValueError, match="calib_batches"):
        ptq.quantize_model(model, variables, [], ptq.Recipe("gptq"))
    with pytest.raises(TypeError, match="recipe"):
        ptq.quantize_model(model, variables, calib, "rtn")
    with pytest.raises(ValueError, match="Recipe.awq_clip needs method='awq'"):
        ptq.Recipe("gptq", awq_clip=True)
    with pytest.raises(ValueError, match="Recipe.online_hadamard must be one of"):
        ptq.Recipe(online_hadamard=True)
    with pytest.raises(TypeError, match="Recipe.rotate_heads must be a bool"):
        ptq.Recipe(rotate_heads=1)


@pytest.mark.slow  # two W4A4 recipes (51 s measured at load average ~30)
def test_rotation_beats_no_rotation_at_w4a4_on_an_outlier_model(tiny_gpt):
    model, variables, calib, tokens = tiny_gpt
    for block in (1, 2):
        for norm in ("norm1", "norm2"):
            variables = ptq.inject_outlier(model, variables, f"block{block}/{norm}", 3, 100.0)
    want = model.apply(variables, tokens)
    errors = {}
    for transform in (None, "rotate"):
        recipe = ptq.Recipe("rtn", weight="int4", act="int4", transform=transform, symmetric=True)
        runner, rvars = ptq.quantize_model(model, variables, calib, recipe).runner(tokens)
        errors[transform] = float(jnp.mean((runner.apply(rvars, tokens) - want) ** 2))
    assert errors["rotate"] < 0.5 * errors[None]


def _compiled_programs(caplog, fn) -> collections.Counter:
    """The programs XLA compiles while ``fn()`` runs, counted by name."""
    caplog.clear()
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        fn()
    text = "\n".join(caplog.messages)
    return collections.Counter(re.findall(r"Finished XLA compilation of (\S+) in", text))


def test_quantize_model_compiles_each_layer_step_once_per_shape_not_per_block(caplog):
    """Whole-model GPTQ compiles each layer's GPTQ step once per kernel shape and its input
    capture once per input width: a 2-block GPT of the same shapes, quantized after a
    1-block one, compiles only its own two capture programs (main's driver compiled a
    capture per layer group, 4 per block, on every call)."""
    jax.clear_caches()  # the 1-block count starts from nothing
    counts = []
    for blocks in (1, 2):
        cfg = GPTConfig(vocab_size=11, context=8, num_layers=blocks, num_heads=2, width=8)
        model = gpt.GPT(cfg)
        variables = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
        calib = [jax.random.randint(jax.random.key(2), (2, 8), 0, 11)]
        run = functools.partial(ptq.quantize_model, model, variables, calib, ptq.Recipe("gptq"))
        counts.append(_compiled_programs(caplog, run))
    assert counts[0]["jit(_gptq)"] == 3  # kernels (8, 8) [query, key, value, out], (8, 32), (32, 8)
    assert counts[0]["jit(_dense_input)"] == 2  # layer inputs of width 8 and 32
    assert counts[1] == {"jit(_dense_input)": 2}  # the 2-block model's captures, nothing else
