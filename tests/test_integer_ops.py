"""Tests for the int8 kernels of jquant.integer: conv2d, dense, pooling, add, requantization.

Oracles:
- golden TFLite outputs (``tests/data/tflite_int8_ops.npz``): 0 mismatches, ``double``
  against the reference kernels, ``fp32`` against XNNPACK;
- onnxruntime ``QLinearConv`` / ``QLinearMatMul`` on random data == ``fp32``, bit for bit;
- NumPy int64 convolutions and window loops, requantized by the big-integer C reference of
  ``test_fixed_point`` (``double`` / ``single``) or NumPy float32 (``fp32``);
- jaxpr assertions: int8 x int8 -> int32, no 64-bit types.
"""

import functools
import hashlib
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from test_fixed_point import c_div, c_mbqm, c_quantize_multiplier, c_round_half_away

from jquant import integer as qi

GOLDEN = pathlib.Path(__file__).resolve().parent / "data" / "tflite_int8_ops.npz"
GOLDEN_CASES = [
    "avgpool2x2",
    "avgpool3x3_same_s1",
    "conv1x1",
    "conv3x3_same_relu",
    "conv3x3_valid_s2",
    "dense",
    "dense_relu",
    "dwconv3x3_same",
    "maxpool2x2",
    "maxpool3x3_same_s2",
]
MODES = ("double", "single", "fp32")


@pytest.fixture(scope="module")
def golden():
    if not GOLDEN.exists():
        pytest.fail(f"golden TFLite vectors missing: expected {GOLDEN} (tests/data/README.md)")
    with np.load(GOLDEN) as f:
        return dict(f)


# ------------------------------------------------------------------------------ oracles


def np_conv_acc(x, w, x_zp, strides, pads, dilation, groups):
    """int64 ``sum (x_pad - x_zp) w`` with padding holding real 0, by explicit taps."""
    xp = np.pad(x.astype(np.int64) - int(x_zp), ((0, 0), *pads, (0, 0)))
    kh, kw, ci, co = w.shape
    (sh, sw), (dh, dw) = strides, dilation
    oh = (xp.shape[1] - (kh - 1) * dh - 1) // sh + 1
    ow = (xp.shape[2] - (kw - 1) * dw - 1) // sw + 1
    acc = np.zeros((x.shape[0], oh, ow, co), np.int64)
    og = co // groups
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, i * dh : i * dh + (oh - 1) * sh + 1 : sh, j * dw :: sw][:, :, :ow]
            for g in range(groups):
                acc[..., g * og : (g + 1) * og] += (
                    patch[..., g * ci : (g + 1) * ci] @ w[i, j, :, g * og : (g + 1) * og]
                )
    return acc


def np_act_range(activation, out_scale, out_zp, mode):
    lo, hi = -128, 127
    if activation is not None:
        lo = max(lo, int(out_zp))
    if activation == "relu6":
        v = np.float32(6) / np.float32(out_scale)
        r = int(np.rint(v)) if mode == "fp32" else c_round_half_away(float(v))
        hi = min(hi, int(out_zp) + r)
    return lo, hi


def np_requantize(acc, x_scale, w_scale, out_scale, out_zp, mode, act=(-128, 127)):
    """Requantizes int64 ``acc`` (channels last) per element with the C / NumPy references."""
    w_scale = np.broadcast_to(np.asarray(w_scale, np.float32), acc.shape[-1:])
    if mode == "fp32":
        m = (np.float32(x_scale) * w_scale) / np.float32(out_scale)
        y = np.rint(acc.astype(np.float32) * m) + int(out_zp)
    else:
        real = [float(x_scale) * float(s) / float(out_scale) for s in w_scale]
        qm = [c_quantize_multiplier(r, single=mode == "single") for r in real]
        flat = acc.reshape(-1, acc.shape[-1])
        y = np.array([[c_mbqm(int(v), *qm[c], mode) for c, v in enumerate(row)] for row in flat])
        y = y.reshape(acc.shape) + int(out_zp)
    return np.clip(y, *act).astype(np.int8)


def np_pool(x, window, strides, pads, kind):
    """TFLite pooling by explicit windows over the valid (unpadded) elements."""
    n, h, w, c = x.shape
    oh = (h + sum(pads[0]) - window[0]) // strides[0] + 1
    ow = (w + sum(pads[1]) - window[1]) // strides[1] + 1
    y = np.zeros((n, oh, ow, c), np.int64)
    for i in range(oh):
        for j in range(ow):
            r0, c0 = i * strides[0] - pads[0][0], j * strides[1] - pads[1][0]
            r = slice(max(r0, 0), min(r0 + window[0], h))
            cc = slice(max(c0, 0), min(c0 + window[1], w))
            win = x[:, r, cc, :].astype(np.int64)
            if kind == "max":
                y[:, i, j] = win.max(axis=(1, 2))
            else:
                cnt = win.shape[1] * win.shape[2]
                acc = win.sum(axis=(1, 2))
                y[:, i, j] = [
                    [c_div(a + cnt // 2 if a > 0 else a - cnt // 2, cnt) for a in row]
                    for row in acc
                ]
    return y


def _rand_int8(rng, shape, lo=-128):
    return rng.integers(lo, 128, shape).astype(np.int8)


# ------------------------------------------------------------------------------ golden


def test_golden_file_has_the_expected_cases(golden):
    assert sorted({k.split("/")[0] for k in golden}) == GOLDEN_CASES


@pytest.mark.parametrize(
    "name, sha256",
    [
        ("tflite_int8_ops.npz", "bd89846bb87faf4124916aee8dba67634cde9c0453cdf77411270cdb42fe70c1"),
        (
            "tflite_int8_ops_v2.npz",
            "2bd49915fd2bd3d71a45d08732d04ea4eb5fe034ac1e185520df3f126384c071",
        ),
    ],
)
def test_golden_copies_are_the_published_files(name, sha256):
    """The in-repo copies are byte for byte the golden set (tests/data/README.md)."""
    assert hashlib.sha256((GOLDEN.parent / name).read_bytes()).hexdigest() == sha256


def _golden_call(d, name, mode):
    """Runs case ``name`` through our kernel under jit; returns (ours, x)."""

    def g(k):
        return d[f"{name}/{k}"]

    op, x = str(g("ops")[0]), g("x")[:, 0]
    if "POOL" in op:
        fn = qi.avg_pool if op == "AVERAGE_POOL_2D" else qi.max_pool
        kw = dict(
            window=tuple(g("cfg/pool_size").tolist()),
            strides=tuple(g("cfg/strides").tolist()),
            padding=str(g("cfg/padding")).upper(),
            x_scale=g("input_scale"),
            x_zp=g("input_zp"),
            mode=mode,
        )
        return jax.jit(functools.partial(fn, **kw))(x)
    act = str(g("cfg/activation"))
    common = dict(
        x_scale=g("input_scale"),
        x_zp=g("input_zp"),
        w_scale=g("w_scales"),
        out_scale=g("output_scale"),
        out_zp=g("output_zp"),
        activation=None if act == "linear" else act,
        requant=mode,
    )
    w = g("w")
    if op == "FULLY_CONNECTED":
        return jax.jit(functools.partial(qi.dense, **common))(x, w.T, g("b"))
    if op == "CONV_2D":
        w_hwio, groups = w.transpose(1, 2, 3, 0), 1  # OHWI -> HWIO
    else:
        w_hwio, groups = w[0][:, :, None, :], x.shape[-1]  # 1HWO -> HW1O, depthwise
    fn = functools.partial(
        qi.conv2d,
        strides=tuple(g("cfg/strides").tolist()),
        padding=str(g("cfg/padding")).upper(),
        dilation=tuple(g("cfg/dilation_rate").tolist()),
        groups=groups,
        **common,
    )
    return jax.jit(fn)(x, w_hwio, g("b"))


@pytest.mark.parametrize("mode, key", [("double", "y_ref"), ("fp32", "y_xnn")])
@pytest.mark.parametrize("name", GOLDEN_CASES)
def test_golden_tflite_bit_exact(golden, name, mode, key):
    ours = np.asarray(_golden_call(golden, name, mode))
    want = golden[f"{name}/{key}"][:, 0]
    assert ours.dtype == np.int8 and ours.shape == want.shape
    mismatches = int(np.sum(ours != want))
    assert mismatches == 0, f"{name} ({mode} vs {key}): {mismatches} of {want.size} differ"


# ------------------------------------------------------------------------------ conv / dense

CONV_CASES = {
    # name: (x shape, (KH, KW, I, O), strides, padding, dilation, groups, activation)
    "strided_dilated_explicit": ((2, 9, 8, 3), (3, 2, 3, 5), (2, 1), ((1, 2), (0, 1)), (1, 2), 1,
                                 None),
    "grouped_same_relu": ((1, 6, 7, 4), (3, 3, 2, 6), (1, 1), "SAME", (1, 1), 2, "relu"),
    "depthwise_x2_same_relu6": ((2, 7, 7, 3), (3, 3, 1, 6), (2, 2), "SAME", (1, 1), 3, "relu6"),
}  # fmt: skip


def _conv_case(rng, name):
    xs, ws, strides, padding, dilation, groups, act = CONV_CASES[name]
    x = _rand_int8(rng, xs)
    w = _rand_int8(rng, ws, lo=-127)
    b = rng.integers(-5000, 5000, ws[-1]).astype(np.int32)
    q = dict(
        x_scale=np.float32(0.03),
        x_zp=np.int32(rng.integers(-20, 20)),
        w_scale=rng.uniform(0.002, 0.02, ws[-1]).astype(np.float32),
        out_scale=np.float32(rng.uniform(0.05, 0.3)),
        out_zp=np.int32(rng.integers(-10, 10)),
    )
    cfg = dict(strides=strides, padding=padding, dilation=dilation, groups=groups, activation=act)
    return x, w, b, q, cfg


def _same_pads(in_hw, kernel, strides, dilation):
    pads = []
    for n, k, s, d in zip(in_hw, kernel, strides, dilation, strict=True):
        total = max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
        pads.append((total // 2, total - total // 2))
    return pads


@pytest.mark.parametrize(
    "name, mode",  # fp32 is also checked on every case against onnxruntime below
    [
        ("strided_dilated_explicit", "double"),
        ("strided_dilated_explicit", "single"),
        ("grouped_same_relu", "double"),
        ("depthwise_x2_same_relu6", "single"),
        ("depthwise_x2_same_relu6", "fp32"),
    ],
)
def test_conv2d_matches_numpy_reference(rng, name, mode):
    x, w, b, q, cfg = _conv_case(rng, name)
    ours = jax.jit(functools.partial(qi.conv2d, requant=mode, **q, **cfg))(x, w, b)
    pads = cfg["padding"]
    if pads == "SAME":
        pads = _same_pads(x.shape[1:3], w.shape[:2], cfg["strides"], cfg["dilation"])
    acc = np_conv_acc(x, w, q["x_zp"], cfg["strides"], pads, cfg["dilation"], cfg["groups"]) + b
    act = np_act_range(cfg["activation"], q["out_scale"], q["out_zp"], mode)
    want = np_requantize(acc, q["x_scale"], q["w_scale"], q["out_scale"], q["out_zp"], mode, act)
    np.testing.assert_array_equal(np.asarray(ours), want)
    if cfg["activation"] is not None:  # the clamp binds somewhere, so the check has teeth
        assert np.any(want == act[0]) and (cfg["activation"] == "relu" or np.any(want == act[1]))


@pytest.mark.parametrize("mode", MODES)
def test_dense_matches_numpy_reference(rng, mode):
    x = _rand_int8(rng, (3, 2, 20))
    w = _rand_int8(rng, (20, 7), lo=-127)
    b = rng.integers(-3000, 3000, 7).astype(np.int32)
    q = dict(x_scale=0.05, x_zp=-7, w_scale=np.float32(0.01), out_scale=0.2, out_zp=5)
    ours = jax.jit(functools.partial(qi.dense, requant=mode, **q))(x, w, b)
    acc = (x.astype(np.int64) + 7) @ w.astype(np.int64) + b
    want = np_requantize(acc, 0.05, 0.01, 0.2, 5, mode)
    np.testing.assert_array_equal(np.asarray(ours), want)


def test_same_padding_puts_the_extra_row_after():
    # TFLite SAME on 8 inputs, kernel 3, stride 2: total padding 1, all of it after
    rng = np.random.default_rng(1)
    x, w = _rand_int8(rng, (1, 8, 8, 2)), _rand_int8(rng, (3, 3, 2, 2), lo=-127)
    q = dict(x_scale=0.1, x_zp=3, w_scale=0.01, out_scale=0.05, out_zp=0)
    same, explicit, shifted = jax.jit(
        lambda x, w: [
            qi.conv2d(x, w, strides=2, padding=p, **q)
            for p in ("SAME", ((0, 1), (0, 1)), ((1, 0), (1, 0)))
        ]
    )(x, w)
    np.testing.assert_array_equal(same, explicit)
    assert np.any(np.asarray(same) != np.asarray(shifted))


# ------------------------------------------------------------------------------ onnxruntime


def _ort_run(node, feeds, opset=21, domains=()):
    inputs = [
        helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
        for k, v in feeds.items()
    ]
    graph = helper.make_graph(
        [node], "g", inputs, [helper.make_tensor_value_info("y", TensorProto.INT8, None)]
    )
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, 1) for d in domains)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


@pytest.mark.parametrize("name", list(CONV_CASES))
def test_conv2d_fp32_equals_onnxruntime_qlinearconv(rng, name):
    x, w, b, q, cfg = _conv_case(rng, name)
    cfg = dict(cfg, activation=None)  # QLinearConv has no fused activation
    pads = cfg["padding"]
    if pads == "SAME":
        pads = _same_pads(x.shape[1:3], w.shape[:2], cfg["strides"], cfg["dilation"])
    node = helper.make_node(
        "QLinearConv",
        ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"],
        ["y"],
        strides=list(cfg["strides"]),
        pads=[pads[0][0], pads[1][0], pads[0][1], pads[1][1]],
        dilations=list(cfg["dilation"]),
        group=cfg["groups"],
    )
    feeds = dict(
        x=np.ascontiguousarray(x.transpose(0, 3, 1, 2)),
        xs=np.array(q["x_scale"], np.float32),
        xz=np.array(q["x_zp"], np.int8),
        w=np.ascontiguousarray(w.transpose(3, 2, 0, 1)),  # HWIO -> OIHW
        ws=q["w_scale"],
        wz=np.zeros(w.shape[-1], np.int8),
        ys=np.array(q["out_scale"], np.float32),
        yz=np.array(q["out_zp"], np.int8),
        b=b,
    )
    want = _ort_run(node, feeds).transpose(0, 2, 3, 1)
    ours = jax.jit(functools.partial(qi.conv2d, requant="fp32", **q, **cfg))(x, w, b)
    np.testing.assert_array_equal(np.asarray(ours), want)


def test_dense_fp32_equals_onnxruntime_qlinearmatmul(rng):
    x, w = _rand_int8(rng, (6, 24)), _rand_int8(rng, (24, 9), lo=-127)
    ws = rng.uniform(0.002, 0.02, 9).astype(np.float32)
    q = dict(x_scale=np.float32(0.04), x_zp=np.int8(-9), w_scale=ws)
    q.update(out_scale=np.float32(0.07), out_zp=np.int8(4))
    node = helper.make_node("QLinearMatMul", ["a", "as", "az", "b", "bs", "bz", "ys", "yz"], ["y"])
    feeds = {
        "a": x,
        "as": np.array(q["x_scale"]),
        "az": np.array(q["x_zp"]),
        "b": w,
        "bs": ws,
        "bz": np.zeros(9, np.int8),
        "ys": np.array(q["out_scale"]),
        "yz": np.array(q["out_zp"]),
    }
    want = _ort_run(node, feeds)
    ours = jax.jit(functools.partial(qi.dense, requant="fp32", **q))(x, w)
    np.testing.assert_array_equal(np.asarray(ours), want)


def _ort_qlinear_add(a, b, sa, za, sb, zb, sy, zy):
    """onnxruntime ``com.microsoft.QLinearAdd`` (CPU provider, MLAS kernel)."""
    names = ["a", "as", "az", "b", "bs", "bz", "ys", "yz"]
    node = helper.make_node("QLinearAdd", names, ["y"], domain="com.microsoft")
    f32, i8 = (lambda v: np.array(v, np.float32)), (lambda v: np.array(v, np.int8))
    values = [a, f32(sa), i8(za), b, f32(sb), i8(zb), f32(sy), i8(zy)]
    feeds = dict(zip(names, values, strict=True))
    return _ort_run(node, feeds, opset=13, domains=("com.microsoft",))


def np_mlas_add(a, b, sa, za, sb, zb, sy, zy, fused):
    """MLAS ``QLinearAdd`` (onnxruntime/core/mlas/lib/qladd*.cpp) in NumPy: float32 ratios
    ``r_a = s_a / s_y``, ``r_b = s_b / s_y``, the zero points folded into a float32 constant
    ``c = z_y - (r_a z_a + r_b z_b)`` and the raw codes (not ``a - z_a``) scaled::

        y = clamp(round_half_even(c + a r_a + b r_b))

    ``fused``: with fused multiply-adds ``fma(a, r_a, fma(b, r_b, c))`` (the AVX2 kernel),
    else each product and sum rounded to float32 (the SSE2 kernel). float64 evaluates each
    fma exactly (an int8 times a float32 plus a float32 fits 53 bits here), then rounds once.
    """
    f32 = np.float32
    ra, rb = f32(sa) / f32(sy), f32(sb) / f32(sy)
    c = f32(f32(zy) - f32(f32(ra * f32(za)) + f32(rb * f32(zb))))
    av, bv = a.astype(np.float64), b.astype(np.float64)
    if fused:
        inner = (bv * np.float64(rb) + np.float64(c)).astype(f32)
        y = (av * np.float64(ra) + inner.astype(np.float64)).astype(f32)
    else:
        y = (c + a.astype(f32) * ra) + b.astype(f32) * rb
    return np.clip(np.rint(y), -128, 127).astype(np.int8)


_ADD_SCALES = [  # (s_a, z_a, s_b, z_b, s_y, z_y)
    (0.03, 7, 0.011, -9, 0.05, 3),
    (0.0311, 0, 0.0173, 0, 0.047, -7),
    (0.1, -3, 0.2, 5, 0.3, 9),
    (0.02, 12, 0.05, -30, 0.06, -20),
]


def test_add_fp32_vs_onnxruntime_qlinearadd(rng):
    # ONNX Runtime's QLinearAdd does not compute the XNNPACK formula of our fp32 mode
    # (round(f32((a - z_a) m_a) + f32((b - z_b) m_b)) + z_y): MLAS scales the raw codes and
    # folds the zero points into one float32 constant, with FMAs on AVX2 (np_mlas_add). The
    # two round the same real number differently only near a tie: what holds is checked.
    a, b = _rand_int8(rng, (4096,)), _rand_int8(rng, (4096,))
    fn = jax.jit(lambda a, b, rq, za, zb, zy: qi.add(a, b, a_zp=za, b_zp=zb, out_zp=zy, requant=rq))
    for sa, za, sb, zb, sy, zy in _ADD_SCALES:
        want = _ort_qlinear_add(a, b, sa, za, sb, zb, sy, zy)
        # 1. onnxruntime is the documented MLAS formula, bit for bit (AVX2 or SSE2 kernel)
        kernels = [np_mlas_add(a, b, sa, za, sb, zb, sy, zy, fused) for fused in (True, False)]
        assert any(np.array_equal(want, k) for k in kernels), (sa, sb, sy)
        # 2. our fp32 mode is within one code, and differs only at near-ties of the real value
        rq = qi.add_requant(sa, sb, sy, "fp32")
        ours = np.asarray(fn(a, b, rq, np.int32(za), np.int32(zb), np.int32(zy)))
        diff = ours.astype(int) - want
        # (0.02, 0.05, 0.06): ratios 1/3 and 5/6 put many real values exactly on .5
        assert np.abs(diff).max() <= 1 and np.mean(diff != 0) < 0.05
        real = (a.astype(np.float64) - za) * np.float32(sa) + (b - np.float64(zb)) * np.float32(sb)
        real = real / np.float32(sy)
        frac = np.abs(real - np.floor(real) - 0.5)
        assert np.all(frac[diff != 0] < 1e-4)
        np.testing.assert_array_equal(ours, np_add_fp32(a, b, sa, za, sb, zb, sy, zy))
    # 3. power-of-two ratios: every product and sum is exact in float32 in both formulas,
    # so both round the exact value half to even: bit for bit, many ties included
    rq = qi.add_requant(0.5, 0.25, 1.0, "fp32")
    ours = np.asarray(fn(a, b, rq, np.int32(3), np.int32(-5), np.int32(2)))
    np.testing.assert_array_equal(ours, _ort_qlinear_add(a, b, 0.5, 3, 0.25, -5, 1.0, 2))


# ------------------------------------------------------------------------------ pooling


@pytest.mark.parametrize(
    "window, strides, padding",
    [((3, 3), (2, 2), "SAME"), ((2, 3), (1, 2), ((1, 0), (2, 1))), ((4, 2), None, "VALID")],
)
def test_pools_match_numpy_reference(rng, window, strides, padding):
    x = _rand_int8(rng, (2, 7, 6, 3))
    s = window if strides is None else strides
    pads = _same_pads(x.shape[1:3], window, s, (1, 1)) if padding == "SAME" else padding
    if padding == "VALID":
        pads = ((0, 0), (0, 0))
    for fn, kind in ((qi.avg_pool, "avg"), (qi.max_pool, "max")):
        ours = jax.jit(functools.partial(fn, window=window, strides=strides, padding=padding))(x)
        np.testing.assert_array_equal(np.asarray(ours), np_pool(x, window, s, pads, kind))


def test_avg_pool_rounds_half_away_from_zero():
    # windows of 2 summing to +-3 and +-1: averages +-1.5 -> +-2, +-0.5 -> +-1
    x = np.array([1, 2, -1, -2, 0, 1, 0, -1], np.int8).reshape(1, 1, 8, 1)
    y = jax.jit(qi.avg_pool, static_argnums=1)(x, (1, 2))
    np.testing.assert_array_equal(np.asarray(y).ravel(), [2, -2, 1, -1])


def test_global_avg_pool_and_activation(rng):
    x = _rand_int8(rng, (3, 5, 4, 6))
    acc = x.astype(np.int64).sum(axis=(1, 2))
    want = np.array([[c_div(a + 10 if a > 0 else a - 10, 20) for a in row] for row in acc])
    y, y_keep, y_relu6 = jax.jit(
        lambda x: (
            qi.global_avg_pool(x),
            qi.global_avg_pool(x, keepdims=True),
            qi.global_avg_pool(x, x_scale=0.2, x_zp=-4, activation="relu6"),
        )
    )(x)
    np.testing.assert_array_equal(np.asarray(y), want)
    np.testing.assert_array_equal(np.asarray(y_keep), want[:, None, None, :])
    # relu6 on the input grid: clamp to [zp, zp + round(6 / s)] = [-4, 26]
    np.testing.assert_array_equal(np.asarray(y_relu6), np.clip(want, -4, 26))


# ------------------------------------------------------------------------------ add


def np_add(a, b, sa, za, sb, zb, sy, zy, mode):
    """TFLite ADD (add.cc, left_shift 20) with big integers."""
    da, db = a.astype(np.int64) - za, b.astype(np.int64) - zb
    single = mode == "single"
    twice = 2.0 * float(max(np.float32(sa), np.float32(sb)))
    qa = c_quantize_multiplier(float(np.float32(sa)) / twice, single)
    qb = c_quantize_multiplier(float(np.float32(sb)) / twice, single)
    qy = c_quantize_multiplier(twice / float(np.float32(2**20) * np.float32(sy)), single)
    out = []
    for u, v in zip(da.ravel().tolist(), db.ravel().tolist(), strict=True):
        raw = c_mbqm(u << 20, *qa, mode) + c_mbqm(v << 20, *qb, mode)
        out.append(c_mbqm(raw, *qy, mode) + zy)
    return np.clip(np.array(out).reshape(a.shape), -128, 127).astype(np.int8)


@pytest.mark.parametrize("mode", ["double", "single"])
def test_add_matches_reference(rng, mode):
    a, b = _rand_int8(rng, (4, 3, 50)), _rand_int8(rng, (4, 3, 50))
    # precomputed constants and zero points are traced: one compiled program for both cases
    fn = jax.jit(lambda a, b, rq, za, zb, zy: qi.add(a, b, a_zp=za, b_zp=zb, out_zp=zy, requant=rq))
    for sa, za, sb, zb, sy, zy in [(0.03, 7, 0.011, -9, 0.05, 3), (0.1, 0, 0.1, 0, 0.07, -128)]:
        rq = qi.add_requant(sa, sb, sy, mode)
        ours = fn(a, b, rq, np.int32(za), np.int32(zb), np.int32(zy))
        np.testing.assert_array_equal(np.asarray(ours), np_add(a, b, sa, za, sb, zb, sy, zy, mode))


def np_add_fp32(a, b, sa, za, sb, zb, sy, zy, lo=-128, hi=127):
    """XNNPACK-style float32 add in NumPy: each product and the sum rounded to float32, then
    clamped and rounded half to even."""
    ma, mb = np.float32(sa) / np.float32(sy), np.float32(sb) / np.float32(sy)
    pa = (a.astype(np.int32) - za).astype(np.float32) * ma
    pb = (b.astype(np.int32) - zb).astype(np.float32) * mb
    y = np.clip(pa + pb, np.float32(lo - zy), np.float32(hi - zy))
    assert y.dtype == np.float32
    return (np.rint(y).astype(np.int32) + zy).astype(np.int8)


def test_add_fp32_matches_numpy_float32():
    a = np.arange(-128, 128, dtype=np.int8).reshape(16, 16)
    b = np.flip(a.T, 0).copy()
    fn = jax.jit(
        lambda a, b, rq, zy: (
            qi.add(a, b, a_zp=3, b_zp=-5, out_zp=zy, requant=rq),
            qi.add(a, b, a_zp=3, b_zp=-5, out_zp=zy, requant=rq, activation="relu"),
        )
    )
    # (0.5, 0.25, 1.0): exact float32 products, many sums exactly on .5 (half-even ties)
    for sa, sb, sy, zy in [(0.5, 0.25, 1.0, 0), (0.0311, 0.0173, 0.047, -7), (0.1, 0.2, 0.3, 9)]:
        rq = qi.add_requant(sa, sb, sy, "fp32")
        plain, relu = fn(a, b, rq, np.int32(zy))
        want = np_add_fp32(a, b, sa, 3, sb, -5, sy, zy)
        np.testing.assert_array_equal(np.asarray(plain), want)
        np.testing.assert_array_equal(
            np.asarray(relu), np_add_fp32(a, b, sa, 3, sb, -5, sy, zy, zy)
        )
        assert np.any(want < zy) and np.any((want > -128) & (want < 127))
    # half to even, not half away: (a - 3) * 0.5 + (b + 5) * 0.25 on exact ties
    ties = (a.astype(int) - 3) * 0.5 + (b.astype(int) + 5) * 0.25
    tie = np.abs(ties - np.floor(ties) - 0.5) == 0
    assert tie.sum() > 10
    even = np.asarray(fn(a, b, qi.add_requant(0.5, 0.25, 1.0, "fp32"), np.int32(0))[0])
    np.testing.assert_array_equal(even[tie], np.clip(np.rint(ties[tie]), -128, 127))


def test_add_precomputed_constants_and_relu():
    a = np.arange(-128, 128, dtype=np.int8).reshape(16, 16)
    b = a.T.copy()
    rq = qi.add_requant(0.02, 0.05, 0.06, "double")
    zps = dict(a_zp=1, b_zp=-3, out_zp=-20)
    plain, relu = jax.jit(
        lambda a, b, rq: (
            qi.add(a, b, requant=rq, **zps),
            qi.add(a, b, requant=rq, activation="relu", **zps),
        )
    )(a, b, rq)
    np.testing.assert_array_equal(plain, np_add(a, b, 0.02, 1, 0.05, -3, 0.06, -20, "double"))
    np.testing.assert_array_equal(relu, np.maximum(np.asarray(plain), -20))
    assert np.any(np.asarray(plain) < -20)  # the clamp binds


# ------------------------------------------------------------------------------ requant API


def test_precomputed_requant_under_jit_equals_mode_name(rng):
    x, w, b, q, cfg = _conv_case(rng, "grouped_same_relu")
    for mode in ("double", "fp32"):
        rq = qi.requant_from_scales(q["x_scale"], q["w_scale"], q["out_scale"], mode)
        fn = jax.jit(
            lambda x, rq: qi.conv2d(x, w, b, x_zp=q["x_zp"], out_zp=q["out_zp"], requant=rq, **cfg)
        )
        by_name = jax.jit(lambda x, mode=mode: qi.conv2d(x, w, b, requant=mode, **q, **cfg))
        np.testing.assert_array_equal(fn(x, rq), by_name(x))


@pytest.mark.parametrize("mode", MODES)
def test_traced_scales_need_a_precomputed_requant(mode):
    x, w = jnp.zeros((1, 4, 4, 2), jnp.int8), jnp.ones((3, 3, 2, 3), jnp.int8)
    q = dict(x_zp=2, w_scale=np.float32(0.01), out_scale=np.float32(0.05), out_zp=1)
    with pytest.raises(TypeError, match="concrete"):
        jax.make_jaxpr(lambda xs: qi.conv2d(x, w, x_scale=xs, requant=mode, **q))(0.03)


def test_kernels_run_int8_x_int8_to_int32_without_64_bit_types():
    x8, w4 = jnp.zeros((1, 5, 5, 2), jnp.int8), jnp.ones((3, 3, 2, 4), jnp.int8)
    q = dict(x_scale=0.1, x_zp=3, w_scale=0.01, out_scale=0.05, out_zp=-2)
    conv = jax.make_jaxpr(lambda x, w: qi.conv2d(x, w, padding="SAME", **q))(x8, w4)
    w2 = jnp.ones((2, 4), jnp.int8)
    dense = jax.make_jaxpr(lambda x, w: qi.dense(x, w, **q))(x8, w2)
    for jaxpr, prim in ((conv, "conv_general_dilated"), (dense, "dot_general")):
        eqns = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == prim]
        assert len(eqns) == 1
        assert [v.aval.dtype for v in eqns[0].invars] == [jnp.int8, jnp.int8]
        assert eqns[0].outvars[0].aval.dtype == jnp.int32
        assert not re.search(r"\b[iuf]64\[", str(jaxpr)), jaxpr


def test_activation_range():
    assert [int(v) for v in qi.activation_range(None, 0.1, 5)] == [-128, 127]
    assert [int(v) for v in qi.activation_range("relu", 0.1, 5)] == [5, 127]
    # 6 / 0.048 = 125: 125 - 100 = 25; 6 / 0.0096 = 625 -> capped at 127
    assert [int(v) for v in qi.activation_range("relu6", 0.048, -100)] == [-100, 25]
    assert [int(v) for v in qi.activation_range("relu6", 0.0096, 0)] == [0, 127]
    # a tie: 6 / 2.4 = 2.5 (in float32: 2.5) -> 3 half away (TFLite), 2 half even (XNNPACK)
    assert int(qi.activation_range("relu6", 2.4, 0, "double")[1]) == 3
    assert int(qi.activation_range("relu6", 2.4, 0, "fp32")[1]) == 2


# ------------------------------------------------------------------------------ bad input


def _bad_calls():
    x, w = np.zeros((1, 4, 4, 2), np.int8), np.zeros((3, 3, 2, 3), np.int8)
    q = dict(x_scale=0.1, x_zp=0, w_scale=0.01, out_scale=0.05, out_zp=0)
    a = np.zeros((2, 3), np.int8)
    aq = dict(a_scale=0.1, b_scale=0.1, out_scale=0.1)
    return [
        (TypeError, "x must be an int8", lambda: qi.conv2d(x.astype(np.uint8), w, **q)),
        (TypeError, "w must be an int8", lambda: qi.dense(x, w.astype(np.float32), **q)),
        (ValueError, "x_scale", lambda: qi.conv2d(x, w, **dict(q, x_scale=0.0))),
        (ValueError, "w_scale", lambda: qi.conv2d(x, w, **dict(q, w_scale=-np.ones(3)))),
        (ValueError, "w_scale", lambda: qi.conv2d(x, w, **dict(q, w_scale=np.ones(2)))),
        (ValueError, "out_scale", lambda: qi.conv2d(x, w, **dict(q, out_scale=np.inf))),
        (ValueError, "x_zp", lambda: qi.conv2d(x, w, **dict(q, x_zp=128))),
        (ValueError, "out_zp", lambda: qi.conv2d(x, w, **dict(q, out_zp=-129))),
        (ValueError, "x_zp", lambda: qi.dense(x, w[0, 0], **dict(q, x_zp=1.5))),
        (TypeError, "b must be an int32", lambda: qi.conv2d(x, w, np.zeros(3), **q)),
        (ValueError, "groups", lambda: qi.conv2d(x, w, groups=2, **q)),
        (ValueError, "padding", lambda: qi.conv2d(x, w, padding="FULL", **q)),
        (ValueError, "strides", lambda: qi.conv2d(x, w, strides=0, **q)),
        (ValueError, "activation", lambda: qi.conv2d(x, w, activation="gelu", **q)),
        (ValueError, "requant", lambda: qi.conv2d(x, w, requant="float", **q)),
        (ValueError, "same shape", lambda: qi.add(a, a[:1], **aq)),
        (ValueError, "a_scale", lambda: qi.add(a, a, **dict(aq, a_scale=0))),
        (ValueError, "requant", lambda: qi.add(a, a, requant="float", **aq)),
        (TypeError, "b must be an int8", lambda: qi.add(a, a.astype(np.int32), **aq)),
        (ValueError, "window", lambda: qi.avg_pool(x, 5)),
        (TypeError, "x must be an int8", lambda: qi.max_pool(x.astype(np.int16), 2)),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_input_raises_at_trace_time(case):
    exc, match, call = _bad_calls()[case]
    with pytest.raises(exc, match=match):
        call()


# ------------------------------------------------------------------------------ accumulator


def test_accumulator_bound_is_reached_and_overflow_raises():
    rng = np.random.default_rng(2)
    w = rng.integers(0, 128, (3, 3, 4, 2)).astype(np.int8)  # non-negative: the bound is tight
    b = np.array([100, -7], np.int32)
    bound = qi.check_accumulator(w, b)
    # x = 127 with x_zp = -128 gives x - x_zp = 255 everywhere: the worst case
    acc = np_conv_acc(np.full((1, 3, 3, 4), 127, np.int8), w, -128, (1, 1), [(0, 0)] * 2, (1, 1), 1)
    np.testing.assert_array_equal(bound, acc[0, 0, 0] + np.abs(b))
    big = np.full((1, 1, 67000, 1), -127, np.int8)  # 255 * 127 * 67000 > 2^31 - 1
    assert qi.accumulator_bound(big)[0] == 255 * 127 * 67000
    with pytest.raises(ValueError, match="overflow"):
        qi.check_accumulator(big)
    qi.check_accumulator(big[:, :, : 67000 // 2])  # fits: no error


# ------------------------------------------------------------------------------ mean / concat (v2)

GOLDEN_V2 = GOLDEN.parent / "tflite_int8_ops_v2.npz"


@pytest.fixture(scope="module")
def golden_v2():
    with np.load(GOLDEN_V2) as d:
        return dict(d)


def _qp(d, name, prefix="input"):
    return d[f"{name}/{prefix}_scale"], d[f"{name}/{prefix}_zp"]


@pytest.mark.parametrize("mode, key", [("double", "y_ref"), ("fp32", "y_xnn")])
def test_mean_golden_tflite_bit_exact(golden_v2, mode, key):
    """LiteRT's reference MEAN and XNNPACK's round differently (99 of 512 codes differ): each
    mode matches its runtime exactly."""
    (sx, zx), (sy, zy) = _qp(golden_v2, "mean_hw"), _qp(golden_v2, "mean_hw", "output")
    fn = functools.partial(
        qi.mean, x_scale=sx, x_zp=zx, out_scale=sy, out_zp=zy, axis=(1, 2), requant=mode
    )
    ours = np.asarray(jax.jit(fn)(golden_v2["mean_hw/x"][:, 0]))
    want = golden_v2[f"mean_hw/{key}"][:, 0]
    assert ours.dtype == np.int8 and ours.shape == want.shape
    assert int(np.sum(ours != want)) == 0
    other = golden_v2["mean_hw/y_xnn" if key == "y_ref" else "mean_hw/y_ref"][:, 0]
    assert int(np.sum(ours != other)) > 0  # the golden case separates the modes


def np_mean(x, sx, zx, sy, zy, axes, mode):
    """TFLite MEAN from the formulas of jquant/integer/mean.py's docstring, in Python ints."""
    n = int(np.prod([x.shape[a] for a in axes]))
    tot = x.astype(np.int64).sum(axis=axes)
    if mode == "fp32":
        m = np.float32(np.float32(sx / sy) * np.float32(np.float32(1) / np.float32(n)))
        y = np.rint((tot - n * zx).astype(np.float64) * np.float64(m)) + zy  # exact product
    else:
        m0, shift = c_quantize_multiplier(float(np.float64(sx) / np.float64(sy)), mode == "single")
        k = max(0, min(n.bit_length() - 1, 32, 31 + shift))
        m0, shift = (m0 << k) // n, shift - k
        y = np.vectorize(lambda a: c_mbqm(int(a), m0, shift, mode))(tot - n * zx) + zy
    return np.clip(y, -128, 127).astype(np.int8)


@pytest.mark.parametrize("mode", ["double", "single", "fp32"])
@pytest.mark.parametrize("same", [False, True])
def test_mean_matches_the_integer_formula(rng, mode, same):
    x = _rand_int8(rng, (3, 5, 7, 4))
    sx, zx, sy, zy = (0.05, 3, 0.05, 3) if same else (0.05, 3, 0.011, -7)
    ours = qi.mean(x, x_scale=sx, x_zp=zx, out_scale=sy, out_zp=zy, axis=(1, 2), requant=mode)
    np.testing.assert_array_equal(np.asarray(ours), np_mean(x, sx, zx, sy, zy, (1, 2), mode))
    # a precomputed MeanRequant under jit gives the same codes
    mr = qi.mean_requant(sx, zx, sy, zy, 35, mode)
    jitted = jax.jit(lambda x, mr: qi.mean(x, x_zp=zx, out_zp=zy, axis=(1, 2), requant=mr))
    np.testing.assert_array_equal(np.asarray(jitted(x, mr)), np.asarray(ours))


def test_mean_fp32_rounds_the_exact_product_as_xnnpack_fma():
    """XNNPACK rounds ``acc * m`` with an FMA: 799 * float32(0.16833542) = 134.50000288 rounds to
    135, where the float32 product (134.5, a tie) would round to 134 (found with LiteRT 2.3 on
    a converted model)."""
    m = np.float32("0.16833542")
    assert np.rint(np.float32(799) * m) == 134 and np.rint(799 * np.float64(m)) == 135
    mr = qi.MeanRequant(qi.Requant(np.asarray(m), np.zeros((), np.int32), "fp32"), 7)
    x = np.array([[100] * 6 + [101]], np.int8)  # sum 701; acc = 701 - 7 * (-14) = 799
    assert int(qi.mean(x, x_zp=-14, out_zp=-128, axis=1, requant=mr)[0]) == 135 - 128


def test_mean_bad_input():
    x = np.zeros((2, 3, 3, 4), np.int8)
    q = dict(x_scale=0.1, x_zp=0, out_scale=0.2, out_zp=0)
    with pytest.raises(ValueError, match="axis"):
        qi.mean(x, axis=4, **q)
    with pytest.raises(ValueError, match="axis"):
        qi.mean(x, axis=(1, 1), **q)
    with pytest.raises(ValueError, match="requant"):
        qi.mean(x, axis=1, requant="float", **q)
    with pytest.raises(ValueError, match="averages 9"):
        qi.mean(x, axis=(1, 2), requant=qi.mean_requant(0.1, 0, 0.2, 0, 3), **q)
    with pytest.raises(TypeError, match="x must be an int8"):
        qi.mean(x.astype(np.int32), axis=1, **q)


def test_concat_golden_tflite_bit_exact(golden_v2):
    d = golden_v2
    (s1, z1), (s2, z2) = _qp(d, "concat_channels"), _qp(d, "concat_channels", "input2")
    sy, zy = _qp(d, "concat_channels", "output")
    ours = qi.concatenate(
        [d["concat_channels/x"][:, 0], d["concat_channels/x2"][:, 0]],
        scales=[s1, s2],
        zero_points=[z1, z2],
        out_scale=sy,
        out_zp=zy,
        axis=-1,
    )
    for key in ("y_ref", "y_xnn"):
        np.testing.assert_array_equal(np.asarray(ours), d[f"concat_channels/{key}"][:, 0])


def test_concat_refuses_inputs_quantized_unlike_the_output():
    a = np.zeros((1, 2), np.int8)
    q = dict(out_scale=0.1, out_zp=0, axis=1)
    with pytest.raises(ValueError, match="input 1 has scale 0.2"):
        qi.concatenate([a, a], scales=[0.1, 0.2], zero_points=[0, 0], **q)
    with pytest.raises(ValueError, match="input 0 has scale 0.1 and zero point 4"):
        qi.concatenate([a, a], scales=[0.1, 0.1], zero_points=[4, 0], **q)
    with pytest.raises(ValueError, match="scales must be a sequence of 2"):
        qi.concatenate([a, a], scales=[0.1], zero_points=[0, 0], **q)
    with pytest.raises(TypeError, match="non-empty sequence"):
        qi.concatenate([], scales=[], zero_points=[], **q)


def _golden_program(d, name):
    """A one-layer program (Dense or Conv 3x3 SAME) holding the golden case's constants."""
    from jquant import convert as C

    w, op = d[f"{name}/w"], str(d[f"{name}/ops"][0])
    (sx, zx), (sy, zy) = _qp(d, name), _qp(d, name, "output")
    common = dict(
        path=name,
        b=d[f"{name}/b"],
        x_zp=np.int32(zx[0]),
        out_zp=np.int32(zy[0]),
        requant=qi.requant_from_scales(sx, d[f"{name}/w_scales"], sy, "double"),
        x_scale=np.float32(sx[0]),
        w_scale=d[f"{name}/w_scales"],
        out_scale=np.float32(sy[0]),
        activation="relu" if "relu" in name else None,
    )
    if op == "FULLY_CONNECTED":
        layer = C.Dense(w=w.T, **common)
    else:
        layer = C.Conv(w=w.transpose(1, 2, 3, 0), padding=((1, 1), (1, 1)), **common)
    x = d[f"{name}/x"][:, 0]
    return C.Program((layer,), np.float32(sx[0]), np.int32(zx[0]), np.float32(sy[0]),
                     np.int32(zy[0]), x.shape[1:]), x  # fmt: skip


@pytest.mark.parametrize("name", ["dense_256x128", "dense_relu_512x64", "conv3x3_same_16x32"])
@pytest.mark.parametrize("target, key", [("litert_ref", "y_ref"), ("xnnpack", "y_xnn")])
def test_retarget_matches_each_runtime_op_by_op(golden_v2, name, target, key):
    """retarget picks LiteRT's per-op rounding: reference FULLY_CONNECTED single, CONV_2D
    double; XNNPACK fp32 everywhere. 0 mismatches on the v2 golden cases."""
    from jquant import convert as C

    program, x = _golden_program(golden_v2, name)
    prog = C.retarget(program, target)
    ours = np.asarray(jax.jit(C.run)(prog, x))
    assert int(np.sum(ours != golden_v2[f"{name}/{key}"][:, 0])) == 0
