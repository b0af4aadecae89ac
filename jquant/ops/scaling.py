"""Per-tensor scaling recipes for fp8 (and int) training: current and delayed scaling.

Our scale divides (``x = scale * code``), Transformer Engine's multiplies, so TE's
``scale_TE = (fmt_max / amax) / 2^margin`` is our ``1 / scale``::

    current scaling:  scale_t = amax(x_t) * 2^margin / fmt.max           (this step's amax)
    delayed scaling:  scale_t = max(h_{t-1}) * 2^margin / fmt.max        (amax history h)
                      h_t     = (amax(x_t), h_{t-1}[0], ..., h_{t-1}[H-2])

An all-zero history (the first step) gives ``scale = 1`` (as TE keeps its initial scale).
The history is state (a NamedTuple, an Optax-style ``init`` / ``update``): layers keep it in a
Flax variable collection, and a gradient's amax comes out of the backward pass through
``grad_amax_sink`` (:func:`jquant.ops.train_dot_general`).

Inside a model the update runs as "overwrite with gradient" (Flax's ``fp8_ops`` collection
``_overwrite_with_gradient``; TE writes the amax into its meta from the custom VJP):
:func:`record_amax` and :func:`record_grad_amax` are the identity on a tensor, and under
``jax.grad`` the cotangent of their history argument is the *next* history ``h_t``, pushed with
the forward tensor's amax or with the amax of the gradient arriving at it. Differentiating the
loss with respect to the histories therefore returns their next values, and the step replaces
the histories by those "gradients". The scales themselves read the history through
``stop_gradient`` (:meth:`DelayedScaling.qparams`), so nothing else reaches the cotangent.

Micikevicius et al. 2022, "FP8 Formats for Deep Learning" (e4m3 forward, e5m2 gradients,
per-tensor scales); NVIDIA Transformer Engine ``DelayedScaling(margin, amax_history_len,
amax_compute_algo="max")``.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jquant.formats import Format
from jquant.quant import QParams, qparams_from_data_range

__all__ = [
    "AmaxHistory",
    "DelayedScaling",
    "delayed_scaling",
    "current_scaling",
    "record_amax",
    "record_grad_amax",
]


class AmaxHistory(NamedTuple):
    """The last ``H`` per-tensor amaxes, newest first (``history[0]``)."""

    history: jax.Array


class DelayedScaling(NamedTuple):
    """Transformer Engine's delayed scaling as pure functions over :class:`AmaxHistory`.

    ``init() -> AmaxHistory`` (zeros), ``qparams(state, fmt) -> QParams`` (from the max of
    the history and the margin), ``update(state, amax) -> AmaxHistory`` (push this step's
    amax, drop the oldest).
    """

    init: Callable[[], AmaxHistory]
    qparams: Callable[[AmaxHistory, Format], QParams]
    update: Callable[[AmaxHistory, jax.Array], AmaxHistory]


def _check_margin(margin) -> None:
    if isinstance(margin, bool) or not isinstance(margin, numbers.Real) or margin < 0:
        raise ValueError(f"margin must be a real number >= 0, got {margin!r}")


def _scale_from_amax(amax, fmt: Format, margin: float) -> QParams:
    amax = jnp.asarray(amax, jnp.float32) * 2.0**margin
    return qparams_from_data_range(-amax, amax, fmt, symmetric=True)


def current_scaling(x: jax.Array, fmt: Format, margin: float = 0) -> QParams:
    """Per-tensor QParams from this step's amax: ``scale = max|x| * 2^margin / fmt.max``.

    >>> from jquant.formats import fp8_e4m3
    >>> float(current_scaling(jnp.array([-896.0, 1.0]), fp8_e4m3, margin=1).scale)
    4.0
    """
    _check_margin(margin)
    return _scale_from_amax(jnp.max(jnp.abs(jax.lax.stop_gradient(x))), fmt, margin)


def delayed_scaling(history_len: int = 16, margin: float = 0) -> DelayedScaling:
    """Delayed scaling with an amax history of ``history_len`` steps (see the module docs).

    Args:
      history_len: ``H >= 1`` (TE's ``amax_history_len``; 1 is the previous step's amax).
      margin: ``scale *= 2^margin`` (headroom against growth between steps).

    >>> from jquant.formats import fp8_e4m3
    >>> ds = delayed_scaling(history_len=2)
    >>> st = ds.update(ds.update(ds.init(), 448.0), 4.0)
    >>> st.history.tolist(), float(ds.qparams(st, fp8_e4m3).scale)
    ([4.0, 448.0], 1.0)
    """
    if (
        isinstance(history_len, bool)
        or not isinstance(history_len, numbers.Integral)
        or history_len < 1
    ):
        raise ValueError(f"history_len must be an int >= 1, got {history_len!r}")
    _check_margin(margin)

    def init() -> AmaxHistory:
        return AmaxHistory(jnp.zeros((history_len,), jnp.float32))

    def qparams(state: AmaxHistory, fmt: Format) -> QParams:
        return _scale_from_amax(jnp.max(jax.lax.stop_gradient(state.history)), fmt, margin)

    def update(state: AmaxHistory, amax: jax.Array) -> AmaxHistory:
        return AmaxHistory(_push(state.history, amax))

    return DelayedScaling(init, qparams, update)


def _push(history: jax.Array, amax: jax.Array) -> jax.Array:
    """``(amax, h[0], ..., h[H-2])``: the newest amax first, the oldest dropped."""
    amax = jnp.asarray(jax.lax.stop_gradient(amax), jnp.float32).reshape(1)
    return jnp.concatenate([amax, history[:-1]])


def _amax(x: jax.Array) -> jax.Array:
    return jnp.max(jnp.abs(x)).astype(jnp.float32)


@jax.custom_vjp
def _record_forward(x, history):
    return x


def _record_forward_fwd(x, history):
    return x, (_amax(x), history)


def _record_forward_bwd(res, g):
    amax, history = res
    return g, _push(history, amax)


_record_forward.defvjp(_record_forward_fwd, _record_forward_bwd)


@jax.custom_vjp
def _record_backward(y, history):
    return y


def _record_backward_fwd(y, history):
    return y, history


def _record_backward_bwd(history, g):
    return g, _push(history, _amax(g))


_record_backward.defvjp(_record_backward_fwd, _record_backward_bwd)


def _check_history(state) -> None:
    if not isinstance(state, AmaxHistory) or jnp.ndim(state.history) != 1:
        raise TypeError(f"state must be an AmaxHistory of one axis, got {state!r}")


def record_amax(x: jax.Array, state: AmaxHistory) -> jax.Array:
    """``x`` unchanged; under ``jax.grad`` the cotangent of ``state`` is the next history.

    Forward: ``y = x``. Backward: ``dL/dx = dL/dy`` and, in place of a gradient,
    ``"dL/dstate" = (max|x|, h[0], ..., h[H-2])`` ("overwrite with gradient", see the module
    docs), so ``jax.grad`` with respect to the history of the forward operands of a delayed-
    scaled product (Transformer Engine's recipe) returns the history of the next step.

    >>> h = AmaxHistory(jnp.array([4.0, 2.0]))
    >>> jax.grad(lambda h: record_amax(jnp.array([-3.0, 1.0]), h).sum())(h).history.tolist()
    [3.0, 4.0]
    """
    _check_history(state)
    return _record_forward(x, state.history)


def record_grad_amax(y: jax.Array, state: AmaxHistory) -> jax.Array:
    """``y`` unchanged; under ``jax.grad`` the cotangent of ``state`` is the history pushed
    with the amax of the gradient that reaches ``y``.

    Forward: ``out = y``. Backward: ``dL/dy = g`` and ``"dL/dstate" = (max|g|, h[0], ...,
    h[H-2])`` with ``g = dL/dout``: wrapped around a product's output, it records the amax of
    the gradient that the product's backward pass quantizes (e5m2 in Micikevicius et al. 2022).

    >>> h = AmaxHistory(jnp.zeros(2))
    >>> jax.grad(lambda h: (-5.0 * record_grad_amax(jnp.ones(3), h)).sum())(h).history.tolist()
    [5.0, 0.0]
    """
    _check_history(state)
    return _record_backward(y, state.history)
