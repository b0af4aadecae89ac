"""Registry test: the public contract of DESIGN.md over every named format and estimator."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant as jq

CONTRACT = [
    "IntFormat", "FloatFormat", "BinaryFormat", "QParams", "qparams_from_range", "quantize",
    "dequantize", "fake_quant", "int8", "uint8", "int4", "int2", "int16", "fp8_e4m3", "fp8_e5m2",
    "ESTIMATORS", "ROUNDING_MODES", "NAMED_FORMATS", "to_blocks", "from_blocks",
]  # fmt: skip


def test_public_names():
    missing = [n for n in CONTRACT if not hasattr(jq, n)]
    assert not missing
    assert set(jq.ESTIMATORS) == {"ste", "clipped_ste", "lsq", "lsq_plus", "pact"}
    assert set(jq.ROUNDING_MODES) == {"nearest_even", "half_away", "half_up", "floor", "stochastic"}
    assert set(jq.NAMED_FORMATS) >= {
        "int2",
        "int4",
        "int8",
        "int16",
        "uint8",
        "fp8_e4m3",
        "fp8_e5m2",
    }


def _estimators_for(fmt):
    if isinstance(fmt, jq.IntFormat):
        return [e for e in jq.ESTIMATORS if e != "pact" or not fmt.signed]
    return ["ste", "clipped_ste"]


@pytest.mark.parametrize("name", list(jq.NAMED_FORMATS))
def test_every_format_with_every_estimator(name):
    fmt = jq.NAMED_FORMATS[name]
    ests = _estimators_for(fmt)
    x = jnp.concatenate([jnp.linspace(-3.0, 3.0, 13), jnp.array([jnp.nan, jnp.inf, -jnp.inf])])

    @jax.jit
    def run(x):
        finite = jnp.where(jnp.isfinite(x), x, 0.0)
        qp = jq.qparams_from_range(jnp.min(finite) / 2, jnp.max(finite) / 2, fmt, symmetric=True)
        out = {}
        for e in ests:
            f = lambda x, s, z, e=e: jq.fake_quant(x, jq.QParams(s, z), fmt, estimator=e)
            y, vjp = jax.vjp(f, x, qp.scale, qp.zero_point)
            out[e] = (y, *vjp(jnp.ones_like(x)))
        out["again"] = jq.fake_quant(out["ste"][0], qp, fmt)
        q = jq.quantize(x, qp, fmt)
        return out, q, jq.dequantize(q, qp, fmt), qp

    out, q, deq, qp = run(x)
    assert q.dtype == fmt.dtype and q.shape == x.shape
    assert np.isfinite(float(qp.scale)) and float(qp.scale) > 0
    ref = np.asarray(out.pop("again"))
    for e, (y, dx, ds, dz) in out.items():
        y = np.asarray(y)
        assert y.shape == x.shape and y.dtype == np.float32, e
        assert np.isnan(y[-3]), e  # NaN kept
        if isinstance(fmt, jq.FloatFormat) and fmt.inf == "ieee":  # ml_dtypes: inf stays inf
            np.testing.assert_array_equal(y[-2:], [np.inf, -np.inf])
        elif isinstance(fmt, jq.FloatFormat):  # E4M3FN has no inf: ml_dtypes gives NaN
            assert np.all(np.isnan(y[-2:])), e
        else:  # integer and binary grids saturate
            assert y[-2] == y[:-3].max() and y[-1] == y[:-3].min(), e
        # every estimator has the same forward, the integer path's values, idempotent
        np.testing.assert_array_equal(y, ref, err_msg=e)
        np.testing.assert_array_equal(y[:-3], np.asarray(deq)[:-3], err_msg=e)
        assert dx.shape == x.shape and ds.shape == () and dz.shape == (), e
        assert np.all(np.isfinite(np.asarray(dx)[:-3])), e


@pytest.mark.parametrize("name", list(jq.NAMED_FORMATS))
def test_learned_estimators_need_an_int_format(name):
    fmt = jq.NAMED_FORMATS[name]
    for e in set(jq.ESTIMATORS) - set(_estimators_for(fmt)) - {"pact"}:
        with pytest.raises(ValueError, match="IntFormat"):
            jq.fake_quant(jnp.ones(2), jq.QParams(1.0), fmt, estimator=e)


@pytest.mark.parametrize("dtype", [jnp.bfloat16])
def test_fake_quant_keeps_low_precision_dtype(dtype):
    x = jnp.linspace(-1, 1, 8, dtype=dtype)
    f = jax.jit(lambda x: jq.fake_quant(x, jq.QParams(0.125), jq.int4, estimator="lsq"))
    y = f(x)
    assert y.dtype == dtype
    g = jax.grad(lambda x: jnp.sum(f(x).astype(jnp.float32)))(x)
    assert g.dtype == dtype


def test_help_of_quantized_layers_starts_with_jquant_docs():
    """pydoc shows each quantized layer's own docs (class, then its own methods) before any
    inherited Flax text."""
    import pydoc

    from jquant.nn import linen as ql
    from jquant.nn import nnx as qn
    from jquant.nn.einsum import QEinsum as LinenQEinsum

    layers = (ql.QDense, ql.QConv, LinenQEinsum, qn.QLinear, qn.QConv, qn.QLinearGeneral)
    for cls in (*layers, qn.QEinsum):
        text = pydoc.render_doc(cls, renderer=pydoc.plaintext)
        head = text[: text.index("Method resolution order")]
        assert "jquant: " in head, cls
        own = text[text.index("Methods defined here") :]
        own = own[: own.index("-" * 20)]  # up to the first inherited section
        assert "Applies a linear transformation" not in own, cls  # Flax's __call__ doc
        if cls.__module__ == "jquant.nn.nnx":  # an __init__ of ours (Linen's is a dataclass's)
            assert "Initialize self." not in own, cls
        assert "fq_in(x)" in own or "quantized by ``rule``" in own, cls
