"""Float training: an optax train step for any apply function, a scanned loop, evaluation, and
a cache of trained weights.

The step is framework neutral. A model is an :data:`ApplyFn`::

    apply_fn(params, model_state, x, train) -> (logits, new_model_state)

where ``params`` are the trained leaves and ``model_state`` the rest (Linen collections such
as ``batch_stats`` or ``quant_stats``; NNX ``BatchStat`` and other non-``Param`` variables),
updated in training mode. :func:`linen_apply_fn` and :func:`nnx_apply_fn` adapt models; a
quantized model is trained (QAT) by the same :func:`make_train_step`.

>>> import jax, optax
>>> from jquant.models import linen
>>> model = linen.make_model("mlp", (8, 8, 1), 10)
>>> params, model_state = split_linen(model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1))))
>>> opt = optax.adam(1e-3)
>>> state = TrainState.create(params, model_state, opt)
>>> step = jax.jit(make_train_step(linen_apply_fn(model), opt))
>>> state, metrics = step(state, jnp.zeros((4, 8, 8, 1)), jnp.zeros(4, jnp.int32))
>>> int(state.step), sorted(metrics)
(1, ['accuracy', 'loss'])
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import pathlib
import time
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, serialization, traverse_util

from jquant.models import config as config_lib
from jquant.models import linen as linen_models

__all__ = [
    "ApplyFn",
    "RECOMMENDED_STEPS",
    "TrainState",
    "TrainConfig",
    "Trained",
    "cross_entropy",
    "linen_apply_fn",
    "split_linen",
    "nnx_apply_fn",
    "split_nnx",
    "make_optimizer",
    "make_train_step",
    "fit",
    "evaluate",
    "cache_path",
    "train_or_load",
]

ApplyFn = Callable[[Any, Any, jax.Array, bool], tuple[jax.Array, Any]]
SCHEDULES = ("cosine", "constant")
CACHE_ENV = "JQUANT_CACHE"
# Bump when training code changes in a way that changes trained weights.
CACHE_VERSION = 1
# Steps at which the zoo's CNNs pass their accuracy targets with the default batch size 128
# and cosine learning rate 1e-2 (MNIST-1D >= 90%, digits >= 95%; tests/test_models.py, slow).
RECOMMENDED_STEPS = {"mnist1d": 600, "digits": 300}


class TrainState(NamedTuple):
    """Everything a train step carries: a pytree, so it passes through ``jit`` and ``scan``."""

    params: Any
    model_state: Any
    opt_state: optax.OptState
    step: jax.Array

    @classmethod
    def create(
        cls, params: Any, model_state: Any, optimizer: optax.GradientTransformation
    ) -> TrainState:
        """A state at step 0 with ``optimizer.init(params)``."""
        return cls(params, model_state, optimizer.init(params), jnp.zeros((), jnp.int32))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy ``mean_n(logsumexp(z_n) - z_n[y_n])`` with integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def split_linen(variables: dict) -> tuple[dict, dict]:
    """``(variables["params"], {other collections})`` of Linen variables."""
    rest = {k: v for k, v in variables.items() if k != "params"}
    return variables["params"], rest


def linen_apply_fn(model: nn.Module) -> ApplyFn:
    """Adapts a Linen module called as ``model(x, train=...)`` to an :data:`ApplyFn`.

    In training mode every collection in ``model_state`` is mutable and returned updated; in
    evaluation mode ``model_state`` is returned as it is.
    """

    def apply(params, model_state, x, train):
        variables = {"params": params, **model_state}
        if train and model_state:
            logits, updates = model.apply(variables, x, train=True, mutable=list(model_state))
            return logits, {**model_state, **updates}
        return model.apply(variables, x, train=train), model_state

    return apply


def split_nnx(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """``(graphdef, params, model_state)``: the ``nnx.Param`` s and every other variable."""
    return nnx.split(model, nnx.Param, ...)


def nnx_apply_fn(graphdef: nnx.GraphDef) -> ApplyFn:
    """Adapts an NNX module (from :func:`split_nnx`) called as ``model(x, train=...)``."""

    def apply(params, model_state, x, train):
        model = nnx.merge(graphdef, params, model_state, copy=True)
        logits = model(x, train=train)
        return logits, nnx.split(model, nnx.Param, ...)[2]

    return apply


def make_optimizer(
    learning_rate: float,
    steps: int,
    *,
    schedule: str = "cosine",
    weight_decay: float = 0.0,
) -> optax.GradientTransformation:
    """Adam(W) with a constant or cosine learning rate.

    cosine: ``lr_t = learning_rate * (1 + cos(pi * min(t, steps) / steps)) / 2``.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate!r}")
    if schedule == "cosine":
        lr = optax.cosine_decay_schedule(learning_rate, max(int(steps), 1))
    else:
        lr = learning_rate
    if weight_decay:
        return optax.adamw(lr, weight_decay=weight_decay)
    return optax.adam(lr)


def make_train_step(
    apply_fn: ApplyFn,
    optimizer: optax.GradientTransformation,
    loss_fn: Callable[[jax.Array, jax.Array], jax.Array] = cross_entropy,
    *,
    overwrite_with_gradient: tuple[str, ...] = (),
) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """A pure (un-jitted) step ``(state, x, y) -> (state, {"loss", "accuracy"})``.

    ``g = grad_params loss_fn(apply_fn(params, model_state, x, True), y)``; the optimizer
    turns ``g`` into an update ``params + u``; the model state (BN running averages, observer
    statistics) comes from the same forward pass. Metrics are those of the batch before the
    update.

    ``overwrite_with_gradient`` names collections of a dict ``model_state`` (Linen) that are
    updated as "overwrite with gradient" (Flax's ``fp8_ops`` idiom; e.g. the amax histories
    of delayed scaling, ``"scaling_history"``): the loss is differentiated with respect to
    them too, ``(g, c') = grad_(params, c) loss``, and each is replaced by its "gradient"
    ``c'`` (its next value), not passed to the optimizer.
    """
    names = tuple(overwrite_with_gradient)
    if any(not isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise TypeError(
            "overwrite_with_gradient must be a tuple of distinct collection names (str), "
            f"got {overwrite_with_gradient!r}"
        )

    def step(state: TrainState, x: jax.Array, y: jax.Array):
        held = state.model_state
        if names and (not isinstance(held, dict) or not set(names) <= set(held)):
            have = sorted(held) if isinstance(held, dict) else type(held).__name__
            raise ValueError(
                f"overwrite_with_gradient={names}: the model state must be a dict of Linen "
                f"collections holding these, got {have}"
            )
        carried = {n: state.model_state[n] for n in names}

        def objective(params, carried):
            model_state = {**state.model_state, **carried} if names else state.model_state
            logits, model_state = apply_fn(params, model_state, x, True)
            return loss_fn(logits, y), (logits, model_state)

        (loss, (logits, model_state)), (grads, next_carried) = jax.value_and_grad(
            objective, (0, 1), has_aux=True
        )(state.params, carried)
        if names:
            model_state = {**model_state, **next_carried}
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == y)
        new_state = TrainState(params, model_state, opt_state, state.step + 1)
        return new_state, {"loss": loss, "accuracy": accuracy}

    return step


def _step_indices(key: jax.Array, n: int, batch_size: int, steps: int) -> np.ndarray:
    """``(steps, batch_size)`` example indices: shuffled epochs, each dropping its remainder."""
    per_epoch = n // batch_size
    epochs = -(-steps // per_epoch)
    keys = jax.random.split(key, epochs)
    perms = [np.asarray(jax.random.permutation(k, n))[: per_epoch * batch_size] for k in keys]
    return np.concatenate(perms).reshape(-1, batch_size)[:steps]


@functools.partial(jax.jit, static_argnums=0)
def _run_step(step_fn, state, x, y, i):
    # step_fn is static (hashed by identity): fit calls that pass the same step share a compile.
    return step_fn(state, x[i], y[i])


def fit(
    step_fn: Callable,
    state: TrainState,
    x: jax.Array,
    y: jax.Array,
    *,
    steps: int,
    batch_size: int,
    key: jax.Array,
    log_every: int = 100,
) -> tuple[TrainState, list[dict[str, float]]]:
    """Runs ``steps`` steps of ``step_fn`` over shuffled mini-batches of ``(x, y)``.

    One jitted call per step, gathering its batch on device from the step's indices. (A
    ``lax.scan`` over steps would dispatch less, but XLA:CPU runs convolution gradients inside
    loops many times slower than at top level.) Each epoch is a fresh permutation drawn from
    ``key``; the last incomplete batch of an epoch is dropped.

    Returns:
      The final state and a history: every ``log_every`` steps (and at the end),
      ``{"step", "loss", "accuracy"}`` averaged over the steps since the previous entry.
    """
    for name, value in (("steps", steps), ("batch_size", batch_size), ("log_every", log_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if batch_size > len(x):
        raise ValueError(f"batch_size must be <= the number of examples {len(x)}, got {batch_size}")
    idx = jnp.asarray(_step_indices(key, len(x), batch_size, steps))
    history, pending = [], []
    for t in range(steps):
        state, metrics = _run_step(step_fn, state, x, y, idx[t])
        pending.append(metrics)
        if (t + 1) % log_every == 0 or t + 1 == steps:
            means = jax.tree.map(lambda *m: float(np.mean(m)), *pending)
            history.append({"step": t + 1, **means})
            pending = []
    return state, history


@functools.partial(jax.jit, static_argnums=0)
def _eval_sums(apply_fn, params, model_state, x, y, mask):
    logits, _ = apply_fn(params, model_state, x, False)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    mask = mask.reshape(mask.shape + (1,) * (y.ndim - 1))  # labels per position (sequences)
    return jnp.sum(losses * mask), jnp.sum((jnp.argmax(logits, -1) == y) * mask)


def evaluate(
    apply_fn: ApplyFn,
    params: Any,
    model_state: Any,
    x: jax.Array,
    y: jax.Array,
    *,
    batch_size: int = 1024,
) -> dict[str, float]:
    """``{"loss": mean cross-entropy, "accuracy": mean(argmax logits == y)}`` in eval mode.

    The last batch is padded to ``batch_size`` and masked, so everything compiles once.
    Labels ``(N, *positions)`` (a language model's next tokens) are averaged over every
    position of every example.
    """
    n = len(x)
    pad = -n % batch_size
    xp = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)])
    yp = jnp.concatenate([y, jnp.zeros((pad, *y.shape[1:]), y.dtype)])
    mask = jnp.arange(n + pad) < n
    loss = correct = 0.0
    for s in range(0, n + pad, batch_size):
        batch = (xp[s : s + batch_size], yp[s : s + batch_size], mask[s : s + batch_size])
        batch_loss, batch_correct = _eval_sums(apply_fn, params, model_state, *batch)
        loss, correct = loss + float(batch_loss), correct + float(batch_correct)
    labels = n * math.prod(y.shape[1:])
    return {"loss": loss / labels, "accuracy": correct / labels}


class DatasetLike(Protocol):
    """What :func:`train_or_load` needs of a data set (``jquant.data.Dataset`` has it)."""

    name: str
    x_train: jax.Array
    y_train: jax.Array
    x_test: jax.Array
    y_test: jax.Array
    num_classes: int
    input_shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of :func:`train_or_load`; see :func:`make_optimizer` and :func:`fit`."""

    steps: int
    batch_size: int = 128
    learning_rate: float = 1e-2
    schedule: str = "cosine"
    weight_decay: float = 0.0


class Trained(NamedTuple):
    """A trained Linen model, its variables and ``{"test_loss", "test_accuracy", ...}``."""

    model: nn.Module
    variables: dict
    metrics: dict[str, float]


def _cache_dir(path: str | os.PathLike | None) -> pathlib.Path:
    # Same rule as jquant.data.cache_dir (models must not import data: DESIGN.md's layers).
    return pathlib.Path(path or os.environ.get(CACHE_ENV) or "~/.cache/jquant").expanduser()


def _weights_digest(variables: Any, metrics: dict) -> str:
    """sha256 over every variable (path, dtype, shape, bytes) and the metrics' JSON: a cache
    file stores it, so its metrics are those of its weights."""
    h = hashlib.sha256()
    for name, leaf in sorted(traverse_util.flatten_dict(dict(variables), sep="/").items()):
        a = np.ascontiguousarray(leaf)
        h.update(f"{name}|{a.dtype}|{a.shape}|".encode())
        h.update(a.tobytes())
    h.update(json.dumps(metrics, sort_keys=True).encode())
    return h.hexdigest()


class _CorruptCache(ValueError):
    """A weights cache file that cannot be trusted (the message says why)."""


def _read_cache(path: pathlib.Path, abstract: Any) -> tuple[dict, dict[str, float]]:
    """``(variables, metrics)`` of a cache file written by :func:`train_or_load`, checked: it
    parses, its variables have ``abstract``'s paths, shapes and dtypes and are finite, and its
    stored sha256 (:func:`_weights_digest`) matches. Raises :class:`_CorruptCache` otherwise."""
    try:
        restored = serialization.msgpack_restore(path.read_bytes())
    except (ValueError, TypeError, OverflowError, RecursionError) as e:
        raise _CorruptCache(f"unreadable ({e})") from None
    if not isinstance(restored, dict) or not {"variables", "metrics"} <= set(restored):
        raise _CorruptCache("not a weights cache with variables and metrics")
    if "sha256" not in restored:
        raise _CorruptCache("no sha256 of its weights (written by a jquant before checksums)")
    variables, metrics = restored["variables"], restored["metrics"]
    if not isinstance(variables, dict) or not isinstance(metrics, dict):
        raise _CorruptCache("variables and metrics must be maps")
    want = traverse_util.flatten_dict(dict(abstract), sep="/")
    got = traverse_util.flatten_dict(variables, sep="/")
    if sorted(got) != sorted(want):
        raise _CorruptCache(f"variables {sorted(got)} do not match the model's {sorted(want)}")
    for name, leaf in got.items():
        if not isinstance(leaf, np.ndarray) or (leaf.shape, leaf.dtype) != (
            want[name].shape,
            want[name].dtype,
        ):
            raise _CorruptCache(f"variable {name} is not a {want[name].dtype}{want[name].shape}")
        if not np.all(np.isfinite(leaf)):
            raise _CorruptCache(f"variable {name} holds non-finite values")
    if not all(isinstance(v, float) for v in metrics.values()):
        raise _CorruptCache("metrics must be floats")
    if restored["sha256"] != _weights_digest(variables, metrics):
        raise _CorruptCache("sha256 does not match its weights and metrics")
    return variables, metrics


def _fingerprint(*arrays: jax.Array) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


@functools.partial(jax.jit, static_argnums=0)
def _init_variables(model: nn.Module, key: jax.Array, x: jax.Array) -> dict:
    # Linen modules hash by their config: one compile per architecture and input shape.
    return model.init(key, x)


def cache_path(
    model_name: str,
    data: DatasetLike,
    seed: int,
    config: TrainConfig,
    *,
    cache: str | os.PathLike | None = None,
) -> pathlib.Path:
    """Where :func:`train_or_load` keeps these trained weights.

    ``<cache>/models/<model>-<data>-<hash>.msgpack``, the hash covering the model config, the
    data's name and a fingerprint of its arrays, the seed, the :class:`TrainConfig` and
    :data:`CACHE_VERSION`.
    """
    model_config = config_lib.model_config(model_name, data.input_shape, data.num_classes)
    key_fields = {
        "version": CACHE_VERSION,
        "model": model_name,
        "model_config": repr(model_config),
        "data": data.name,
        "data_fingerprint": _fingerprint(data.x_train, data.y_train, data.x_test, data.y_test),
        "seed": int(seed),
        "train": dataclasses.asdict(config),
    }
    digest = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
    return _cache_dir(cache) / "models" / f"{model_name}-{data.name}-{digest}.msgpack"


def train_or_load(
    model_name: str,
    data: DatasetLike,
    seed: int,
    steps: int,
    *,
    batch_size: int = 128,
    learning_rate: float = 1e-2,
    schedule: str = "cosine",
    weight_decay: float = 0.0,
    cache: str | os.PathLike | None = None,
    retrain: bool = False,
) -> Trained:
    """Trains zoo model ``model_name`` on ``data`` in float, or loads the cached result.

    The weights are kept in flax msgpack (no pickle) at :func:`cache_path`, keyed by the
    model config, the data's name and content fingerprint, the seed and the
    :class:`TrainConfig`; ``cache`` defaults to ``$JQUANT_CACHE`` or ``~/.cache/jquant``;
    ``retrain=True`` trains and overwrites the file even if it exists.
    ``seed`` draws both the initial weights and the batch order.

    The file stores a sha256 of its weights and metrics; a file that does not parse (e.g.
    truncated), whose variables do not fit the model or are not finite, or whose sha256 is
    missing (written before jquant stored one) or does not match is never used: a
    ``RuntimeWarning`` names it, and the model is retrained and the file replaced (written to
    a temporary file, then renamed). The metrics returned are thus always those the returned
    weights gave.

    Raises:
      ValueError: training diverged (non-finite weights); nothing is cached.

    Returns:
      :class:`Trained` with a Linen model (copy to NNX with
      :func:`jquant.models.nnx.linen_to_nnx`), its variables and test metrics.
    """
    model = linen_models.make_model(model_name, data.input_shape, data.num_classes)
    config = TrainConfig(steps, batch_size, learning_rate, schedule, weight_decay)
    path = cache_path(model_name, data, seed, config, cache=cache)
    init_key, data_key = jax.random.split(jax.random.key(seed))
    if path.exists() and not retrain:
        abstract = jax.eval_shape(model.init, init_key, data.x_train[:1])
        try:
            variables, metrics = _read_cache(path, abstract)
        except _CorruptCache as e:
            warnings.warn(f"{path}: weights cache not used, retraining: {e}", RuntimeWarning, 2)
        else:
            return Trained(model, jax.tree.map(jnp.asarray, variables), metrics)

    variables = _init_variables(model, init_key, data.x_train[:1])
    params, model_state = split_linen(variables)
    optimizer = make_optimizer(learning_rate, steps, schedule=schedule, weight_decay=weight_decay)
    apply_fn = linen_apply_fn(model)
    start = time.perf_counter()
    state, history = fit(
        make_train_step(apply_fn, optimizer),
        TrainState.create(params, model_state, optimizer),
        data.x_train,
        data.y_train,
        steps=steps,
        batch_size=batch_size,
        key=data_key,
    )
    jax.block_until_ready(state.params)
    seconds = time.perf_counter() - start
    test = evaluate(apply_fn, state.params, state.model_state, data.x_test, data.y_test)
    metrics = {
        "test_loss": test["loss"],
        "test_accuracy": test["accuracy"],
        "train_loss": history[-1]["loss"],
        "train_seconds": seconds,  # wall time of fit, compilation included
    }
    variables = {"params": state.params, **state.model_state}
    host = jax.tree.map(np.asarray, variables)
    if not all(np.all(np.isfinite(a)) for a in jax.tree.leaves(host)):
        raise ValueError(
            f"training {model_name} on {data.name} diverged (non-finite weights after {steps} "
            f"steps at learning_rate={learning_rate}); try a lower learning_rate"
        )
    record = {"variables": host, "metrics": metrics, "sha256": _weights_digest(host, metrics)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(serialization.msgpack_serialize(record))
    os.replace(tmp, path)  # atomic: concurrent runs never read a partial file
    return Trained(model, variables, metrics)
