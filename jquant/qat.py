"""A QAT recipe: calibrate -> quantization-aware training -> evaluate, Linen and NNX.

The recipe (:func:`run_linen`, :func:`run_nnx`) takes float models, data and rules:

1. **calibrate** the quantized model on ``calib_batches`` training batches (PTQ ranges, and the
   learned step sizes' initialisation, see :class:`jquant.nn.QuantRule` ``learned_init``);
2. **PTQ** accuracy of that calibrated model (phase ``eval``);
3. **QAT**: phase ``train`` with Adam, the learned quantizer parameters (``*_scale``,
   ``*_zero_point``) on a *relative* rate (:func:`qat_optimizer`), optionally distilling the
   float model's logits (:func:`distillation_loss`);
   optionally lowering the width progressively (``schedule=(8, 4, 2)``, :func:`width_stages`);
4. optionally **re-estimate** batch-norm statistics on training batches (``bn_batches``,
   :func:`reestimate_batch_stats`);
5. **eval**: test accuracy, one row per seed, and a table (:func:`format_table`).

Every option can be switched off (``distill=0``, ``bn_batches=0``, ``schedule=None``,
``quant_lr=None`` to train learned parameters at the weights' rate). Seeds (one float model
each) train in one ``jax.vmap``-ed program: the same compile serves all of them.

Two named recipes (:class:`Recipe`) bundle the rule and the config: :data:`STATIC_RECIPE`, the
deployable one (calibrated per-tensor activation ranges whose steps are then learned, as an
integer runtime runs them), and :data:`DYNAMIC_RECIPE` (each activation's own range per example
and position, as Qwix's and AQT's defaults; not what ``jquant.convert`` deploys).

Learned-parameter rates without hand tuning. Adam's step has the size of the learning rate
whatever the gradient, so LSQ's gradient scale ``1/sqrt(N Q_P)`` cancels out under Adam
(it matters for SGD), and a rate that suits weights (1e-3) is 10% of an 8-bit step (~1e-2)
per step, while 1e-5 hardly moves a 2-bit step (~0.5). :func:`qat_optimizer` therefore scales
the Adam direction of each learned quantizer parameter by that parameter's RMS
(``optax.scale_by_param_block_rms``): ``s <- s - lr * rms(s) * adam(g)``, a relative step
that is the same fraction of the step size at every width. :func:`param_partition` labels
the leaves (``"quant"`` / ``"weight"``) for ``optax.multi_transform``, in Linen trees and NNX
states alike.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jquant.models import train as T
from jquant.nn import linen as ql
from jquant.nn.rules import QuantRule, check_rules
from jquant.nn.state import STATS

__all__ = [
    "QUANT_PARAM_SUFFIXES",
    "QATConfig",
    "Recipe",
    "STATIC_RECIPE",
    "DYNAMIC_RECIPE",
    "Stage",
    "width_stages",
    "rules_at_width",
    "param_partition",
    "qat_optimizer",
    "distillation_loss",
    "make_qat_step",
    "batch_indices",
    "fit_seeds",
    "reestimate_batch_stats",
    "run_linen",
    "run_nnx",
    "format_table",
]

QUANT_PARAM_SUFFIXES = ("_scale", "_zero_point")


def _leaf_name(path) -> str:
    last = path[-1]
    for attr in ("key", "name", "idx"):
        if hasattr(last, attr):
            return str(getattr(last, attr))
    return str(last)


def _is_quant_path(path) -> bool:
    """Whether a leaf path names a learned quantizer parameter (``input_scale``, ...).

    NNX states put the variable's name before a final ``value`` key; Linen's leaf is the name.
    """
    names = [_leaf_name(path[: i + 1]) for i in range(len(path))]
    names = [n for n in names if n not in ("value", "raw_value")]
    return bool(names) and names[-1].endswith(QUANT_PARAM_SUFFIXES)


def param_partition(params: Any) -> Any:
    """Labels for ``optax.multi_transform``: ``"quant"`` on every learned quantizer parameter
    (a leaf named ``*_scale`` / ``*_zero_point``: LSQ, LSQ+, PACT), ``"weight"`` elsewhere.

    Works on Linen ``params`` dicts and on NNX states (``nnx.state(model, nnx.Param)``).

    >>> param_partition({"conv": {"kernel": 0.0, "input_scale": 1.0}})
    {'conv': {'input_scale': 'quant', 'kernel': 'weight'}}
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "quant" if _is_quant_path(path) else "weight", params
    )


def qat_optimizer(
    learning_rate: float = 1e-3,
    *,
    quant_lr: float | None = 1e-2,
    steps: int | None = None,
) -> optax.GradientTransformation:
    """Adam for the weights; relative Adam for the learned quantizer parameters.

    weights: ``w <- w - lr_t * adam(g_w)``;
    quantizer parameters: ``s <- s - quant_lr_t * rms(s) * adam(g_s)`` (each leaf's RMS), so a
    step moves ``s`` by the same fraction at every bit width (see the module docstring).

    Args:
      learning_rate: Adam rate of the weights.
      quant_lr: relative rate of the quantizer parameters (1e-2: at most about 1% of the step
        size per step); None trains them with the weights' plain Adam.
      steps: a cosine decay of both rates over ``steps``; None keeps them constant.
    """
    for name, v in (("learning_rate", learning_rate), ("quant_lr", quant_lr)):
        if v is not None and not (isinstance(v, int | float) and v > 0):
            raise ValueError(f"{name} must be a positive float, got {v!r}")

    def sched(lr):
        return lr if steps is None else optax.cosine_decay_schedule(lr, int(steps))

    weight = optax.adam(sched(learning_rate))
    if quant_lr is None:
        return weight
    quant = optax.chain(
        optax.scale_by_adam(),
        optax.scale_by_param_block_rms(),
        optax.scale_by_learning_rate(sched(quant_lr)),
    )
    return optax.multi_transform({"weight": weight, "quant": quant}, param_partition)


def distillation_loss(
    logits: jax.Array,
    labels: jax.Array,
    teacher_logits: jax.Array,
    *,
    weight: float = 0.5,
    temperature: float = 1.0,
) -> jax.Array:
    """Hinton et al. (2015): ``(1 - a) CE(z, y) + a T^2 KL(softmax(z_t / T) || softmax(z / T))``.

    ``a = weight`` (0: plain cross-entropy), ``T = temperature``; the teacher is held fixed.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be in [0, 1], got {weight!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    ce = T.cross_entropy(logits, labels)
    if weight == 0:
        return ce
    t = jax.lax.stop_gradient(teacher_logits) / temperature
    p_t = jax.nn.softmax(t)
    kl = jnp.sum(p_t * (jax.nn.log_softmax(t) - jax.nn.log_softmax(logits / temperature)), -1)
    return (1.0 - weight) * ce + weight * temperature**2 * jnp.mean(kl)


def make_qat_step(
    apply_fn: T.ApplyFn,
    optimizer: optax.GradientTransformation,
    *,
    distill: float = 0.0,
    temperature: float = 1.0,
) -> Callable:
    """A pure step ``(state, x, y, teacher_logits) -> (state, {"loss", "accuracy"})``.

    The loss is :func:`distillation_loss` (``teacher_logits`` unused when ``distill == 0``).
    """

    def step(state: T.TrainState, x, y, teacher_logits):
        def objective(params):
            logits, model_state = apply_fn(params, state.model_state, x, True)
            loss = distillation_loss(
                logits, y, teacher_logits, weight=distill, temperature=temperature
            )
            return loss, (logits, model_state)

        (loss, (logits, model_state)), grads = jax.value_and_grad(objective, has_aux=True)(
            state.params
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        acc = jnp.mean(jnp.argmax(logits, -1) == y)
        return T.TrainState(params, model_state, opt_state, state.step + 1), {
            "loss": loss,
            "accuracy": acc,
        }

    return step


def _stack(trees: Sequence[Any]) -> Any:
    return jax.tree.map(lambda *a: jnp.stack(a), *trees)


def _unstack(tree: Any, n: int) -> list[Any]:
    return [jax.tree.map(lambda a, i=i: a[i], tree) for i in range(n)]


def batch_indices(key: jax.Array, n: int, batch_size: int, steps: int) -> np.ndarray:
    """``(steps, batch_size)`` indices: shuffled epochs of ``n`` examples, remainders dropped."""
    per_epoch = n // batch_size
    keys = jax.random.split(key, -(-steps // per_epoch))
    perms = [np.asarray(jax.random.permutation(k, n))[: per_epoch * batch_size] for k in keys]
    return np.concatenate(perms).reshape(-1, batch_size)[:steps]


def fit_seeds(
    step: Callable,
    states: Sequence[T.TrainState],
    x: jax.Array,
    y: jax.Array,
    *,
    steps: int,
    batch_size: int,
    keys: Sequence[jax.Array],
    teacher_fn: Callable[[int, jax.Array], jax.Array] | None = None,
    log: Callable[[str], None] | None = None,
    start: int = 0,
) -> list[T.TrainState]:
    """Trains one state per seed in one ``vmap``-ed, jitted step (one compile for all seeds).

    Seed ``i`` draws its batches with ``keys[i]`` (:func:`batch_indices`), steps
    ``start .. start + steps - 1`` of that order (a later stage continues where the previous
    one stopped). ``teacher_fn(i, xb)`` gives seed ``i``'s teacher logits of a batch (None:
    zeros, unused by the loss).
    """
    n = len(states)
    idx = np.stack([batch_indices(k, len(x), batch_size, start + steps) for k in keys])[:, start:]
    stacked = _stack(states)
    vstep = jax.jit(jax.vmap(step))
    for t in range(steps):
        xb, yb = x[idx[:, t]], y[idx[:, t]]
        if teacher_fn is None:
            tl = jnp.zeros((n, batch_size, 1), jnp.float32)
        else:
            tl = jnp.stack([teacher_fn(i, xb[i]) for i in range(n)])
        stacked, metrics = vstep(stacked, xb, yb, tl)
        if log is not None and ((t + 1) % 100 == 0 or t + 1 == steps):
            log(f"  step {start + t + 1}: loss {np.asarray(metrics['loss']).round(3).tolist()}")
    return _unstack(stacked, n)


def _map_batch_stats(model_state: Any, fn: Callable[[jax.Array], jax.Array]) -> Any:
    """``model_state`` with ``fn`` applied to every batch-norm statistic: the leaves of Linen's
    ``batch_stats`` collection, or the ``nnx.BatchStat`` variables of an NNX state."""
    if isinstance(model_state, nnx.State):

        def one(v):
            return v.replace(fn(v.value)) if isinstance(v, nnx.BatchStat) else v

        return jax.tree.map(one, model_state, is_leaf=lambda v: isinstance(v, nnx.Variable))
    if isinstance(model_state, Mapping) and "batch_stats" in model_state:
        return {**model_state, "batch_stats": jax.tree.map(fn, model_state["batch_stats"])}
    return model_state


def _batch_stat_leaves(model_state: Any) -> list[jax.Array]:
    found: list[jax.Array] = []
    _map_batch_stats(model_state, lambda a: found.append(a) or a)
    return found


def reestimate_batch_stats(
    apply_fn: T.ApplyFn, params: Any, model_state: Any, batches: Sequence[jax.Array]
) -> Any:
    """Batch-norm re-estimation after QAT: every running mean / variance becomes the average,
    over ``batches``, of the quantized network's batch statistics there (parameters and every
    other state unchanged):

    ``mu = (1/K) sum_k mean_k(z)``, ``var = (1/K) sum_k var_k(z)``, ``z`` a BatchNorm's input
    in training mode, ``K = len(batches)`` (PyTorch's cumulative average, ``momentum=None``).

    A BatchNorm's running update is affine in its old value, ``new = m old + (1 - m) b`` with
    ``b`` the batch statistic, whatever its momentum ``m``: one forward pass from ``old = 0``
    and one from ``old = 1`` give ``m = new_1 - new_0`` and ``b = new_0 / (1 - m)``. Works on
    Linen (``batch_stats``) and NNX (``nnx.BatchStat``) states.

    Raises:
      ValueError: when the model has no BatchNorm statistics, or ``batches`` is empty.
    """
    if not _batch_stat_leaves(model_state):
        raise ValueError(
            "reestimate_batch_stats: the model has no BatchNorm statistics (no 'batch_stats' "
            "collection, no nnx.BatchStat) to re-estimate; set bn_batches=0"
        )
    batches = list(batches)
    if not batches:
        raise ValueError("reestimate_batch_stats: batches must hold at least one batch")

    def batch_stats(p, s, xb):
        new0 = apply_fn(p, _map_batch_stats(s, jnp.zeros_like), xb, True)[1]
        new1 = apply_fn(p, _map_batch_stats(s, jnp.ones_like), xb, True)[1]
        a0, a1 = _batch_stat_leaves(new0), _batch_stat_leaves(new1)
        return [n0 / (1.0 - (n1 - n0)) for n0, n1 in zip(a0, a1, strict=True)]

    fwd = jax.jit(batch_stats)
    per_batch = [fwd(params, model_state, xb) for xb in batches]
    mean = iter([sum(col) / len(batches) for col in zip(*per_batch, strict=True)])
    return _map_batch_stats(model_state, lambda _: next(mean))


class Stage(NamedTuple):
    """A stage of progressive lowering: steps ``start .. stop - 1`` at ``width`` bits (None:
    the rules' own widths)."""

    start: int
    stop: int
    width: int | None


def width_stages(steps: int, schedule: Sequence[int] | None) -> tuple[Stage, ...]:
    """Progressive lowering of the width: ``k = len(schedule)`` stages over ``steps``, stage
    ``i`` covering steps ``floor(i steps / k) .. floor((i + 1) steps / k) - 1`` at width
    ``schedule[i]``; None: one stage at the rules' own widths.

    >>> [tuple(s) for s in width_stages(10, (8, 4, 2))]
    [(0, 3, 8), (3, 6, 4), (6, 10, 2)]
    """
    if schedule is None:
        return (Stage(0, steps, None),)
    k = len(schedule)
    return tuple(Stage(i * steps // k, (i + 1) * steps // k, w) for i, w in enumerate(schedule))


def _widen(fmt: Any, width: int | None) -> Any:
    if width is None or not getattr(fmt, "integer_grid", False) or fmt.bits >= width:
        return fmt
    return fmt.with_bits(width)


def rules_at_width(rules: Sequence[QuantRule], width: int | None) -> tuple[QuantRule, ...]:
    """The rules of a lowering stage: every integer weight / activation format of ``b`` bits
    runs at ``max(b, width)`` bits (a first layer kept at 8 bits stays at 8); other formats,
    and everything when ``width`` is None, unchanged."""
    return tuple(
        dataclasses.replace(r, weight=_widen(r.weight, width), act=_widen(r.act, width))
        for r in check_rules(rules)
    )


def _int_widths(rules: Sequence[QuantRule]) -> list[int]:
    return [
        f.bits
        for r in rules
        if not r.keep_float
        for f in (r.weight, r.act)
        if getattr(f, "integer_grid", False) and f.is_static
    ]


@dataclasses.dataclass(frozen=True)
class QATConfig:
    """Options of :func:`run_linen`; each can be switched off.

    Args:
      steps: QAT steps (0: PTQ only).
      batch_size: examples per step.
      learning_rate: Adam rate of the weights (constant; ``cosine=True`` decays it).
      quant_lr: relative rate of learned quantizer parameters (:func:`qat_optimizer`); None:
        the weights' plain Adam.
      distill: weight ``a`` of the float model's soft targets (0: off).
      temperature: distillation temperature.
      calib_batches: calibration batches (of ``batch_size`` training examples, in order).
      bn_batches: batch-norm re-estimation batches after QAT (:func:`reestimate_batch_stats`,
        the first ``bn_batches`` training batches; 0: off). A model without BatchNorm raises.
      cosine: cosine decay of both rates over ``steps`` (over each stage's steps with a
        ``schedule``).
      schedule: progressive lowering, strictly decreasing widths such as ``(8, 4, 2)``
        (:func:`width_stages`, :func:`rules_at_width`); at each stage the quantizers are
        re-calibrated at the new width on the current weights (the learned steps restart from
        their initialisation) and Adam restarts. The last width must not exceed the rules'
        smallest integer width, so the last stage trains the rules themselves. None: off.
        Linen only (:func:`run_nnx` raises).
    """

    steps: int = 300
    batch_size: int = 128
    learning_rate: float = 1e-3
    quant_lr: float | None = 1e-2
    distill: float = 0.5
    temperature: float = 1.0
    calib_batches: int = 8
    bn_batches: int = 0
    cosine: bool = False
    schedule: tuple[int, ...] | None = None

    def __post_init__(self):
        for name in ("steps", "calib_batches", "bn_batches"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"QATConfig.{name} must be an int >= 0, got {v!r}")
        if self.calib_batches < 1:
            raise ValueError(f"QATConfig.calib_batches must be >= 1, got {self.calib_batches}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int):
            raise ValueError(f"QATConfig.batch_size must be a positive int, got {self.batch_size}")
        if self.batch_size < 1:
            raise ValueError(f"QATConfig.batch_size must be a positive int, got {self.batch_size}")
        if not 0.0 <= self.distill <= 1.0:
            raise ValueError(f"QATConfig.distill must be in [0, 1], got {self.distill!r}")
        if self.schedule is not None:
            sch = self.schedule
            ok = isinstance(sch, tuple) and len(sch) >= 1
            ok = ok and all(isinstance(w, int) and not isinstance(w, bool) for w in sch)
            ok = ok and all(2 <= w <= 16 for w in sch)
            if not ok or any(a <= b for a, b in zip(sch, sch[1:], strict=False)):
                raise ValueError(
                    "QATConfig.schedule must be None or a tuple of strictly decreasing int "
                    f"widths in [2, 16], such as (8, 4, 2); got {sch!r}"
                )
            if self.steps and self.steps < len(sch):
                raise ValueError(
                    f"QATConfig.steps={self.steps} is fewer than the {len(sch)} stages of "
                    f"schedule={sch!r}"
                )


@dataclasses.dataclass(frozen=True)
class Recipe:
    """jquant's QAT recipe: a rule and a :class:`QATConfig`, each part a field that can be
    switched off with ``dataclasses.replace``.

    Args:
      act_scale: ``"static"`` (calibrated per-tensor activation ranges, what an integer runtime
        deploys) or a dynamic range (``"dynamic_per_token"``, ...: each activation's own
        range, see :class:`jquant.nn.QuantRule`).
      estimator: weight (and static activation) estimator: ``"lsq"`` learns the step
        ``s`` with ``dL/ds`` of Esser et al. (2020), ``"ste"`` keeps the calibrated one.
      act_estimator: activation estimator: ``"lsq"`` / ``"lsq_plus"`` (learned step, and
        offset for LSQ+) for static ranges, ``"ste"`` for dynamic ones; None: ``estimator``.
      learned_init: ``"paper"`` (LSQ's ``2 mean|v| / sqrt(Q_P)``) or ``"calibration"``.
      quant_lr: relative rate of the learned steps (:func:`qat_optimizer`); None: plain Adam.
      distill: weight of the float model's soft targets (:func:`distillation_loss`; 0: off).
      schedule: progressive lowering: the widths to pass through on the way down, e.g.
        ``(8, 4)``; :meth:`config` keeps those above its ``target_bits`` and ends at it
        (``(8, 4, 2)`` for 2 bits, ``(8, 3)`` for 3, none for 8). None: off.
      bn_batches: batch-norm re-estimation batches after QAT (0: off; a model with BatchNorm).
      cosine: cosine decay of the rates (False: Adam's constant rate, as the peers').
    """

    act_scale: str = "static"
    estimator: str = "lsq"
    act_estimator: str | None = "lsq_plus"
    learned_init: str = "paper"
    quant_lr: float | None = 1e-2
    distill: float = 0.5
    schedule: tuple[int, ...] | None = None
    bn_batches: int = 0
    cosine: bool = False

    def __post_init__(self):
        # fail at construction: a rule and a config built from these fields validate them
        self.rule(".*", "int8", "int8")
        self.config(0, target_bits=2)

    def rule(self, pattern: str, weight: Any, act: Any, **overrides: Any) -> QuantRule:
        """The :class:`jquant.nn.QuantRule` of ``pattern`` with this recipe's quantizers
        (``overrides``: any other QuantRule field, such as ``weight_granularity``)."""
        fields = dict(
            estimator=self.estimator,
            act_estimator=self.act_estimator,
            act_scale=self.act_scale,
            learned_init=self.learned_init,
        )
        return QuantRule(pattern, weight=weight, act=act, **{**fields, **overrides})

    def config(self, steps: int, *, target_bits: int | None = None, **overrides: Any) -> QATConfig:
        """The :class:`QATConfig` of ``steps`` QAT steps with this recipe's training options
        (``overrides``: any other QATConfig field, such as ``batch_size``).

        ``target_bits``: the rules' smallest width, where a ``schedule`` ends:
        ``QATConfig.schedule = (w for w in schedule if w > target_bits) + (target_bits,)``
        (None when no width is above it). Needed when the recipe has a schedule.
        """
        schedule = None
        if self.schedule is not None:
            if target_bits is None:
                raise ValueError(
                    f"Recipe.schedule={self.schedule!r}: config() needs target_bits, the "
                    "width the lowering ends at"
                )
            above = tuple(w for w in self.schedule if w > target_bits)
            schedule = above + (target_bits,) if above else None
        fields = dict(
            quant_lr=self.quant_lr,
            distill=self.distill,
            schedule=schedule,
            bn_batches=self.bn_batches,
            cosine=self.cosine,
        )
        return QATConfig(steps=steps, **{**fields, **overrides})


#: The deployable recipe: static per-tensor activation ranges, every step learned (LSQ weights,
#: LSQ+ activations: a learned step and offset), distillation from the float model.
STATIC_RECIPE = Recipe()

#: Dynamic per-example-and-position activation ranges (Qwix's and AQT's default is dynamic).
DYNAMIC_RECIPE = Recipe(act_scale="dynamic_per_token", act_estimator="ste")


def _check_seeds(seeds, n: int) -> list[int]:
    seeds = list(range(n)) if seeds is None else list(seeds)
    if len(seeds) != n:
        raise ValueError(f"seeds has {len(seeds)} entries for {n} models")
    return seeds


def _evaluate(apply_fn, variables, x, y) -> float:
    params, state = T.split_linen(variables)
    return T.evaluate(apply_fn, params, state, x, y)["accuracy"]


def run_linen(
    model: fnn.Module,
    float_variables: Sequence[dict],
    rules: QuantRule | Sequence[QuantRule],
    data: Any,
    config: QATConfig = QATConfig(),
    *,
    seeds: Sequence[int] | None = None,
    log: Callable[[str], None] | None = print,
) -> list[dict[str, float]]:
    """calibrate -> PTQ eval -> QAT -> [BN re-estimation] -> eval, for each float model.

    Args:
      model: the plain Linen model, called as ``model(x, train=...)``.
      float_variables: one trained variable tree per seed.
      rules: quantization rules (:class:`jquant.nn.QuantRule`).
      data: ``x_train, y_train, x_test, y_test`` attributes (``jquant.data.Dataset``).
      config: :class:`QATConfig`.
      seeds: seed of each float model (QAT batch order ``jax.random.key(seed)``); default
        ``0 .. n-1``.
      log: progress lines (None: silent).

    Returns:
      One dict per seed: ``{"float", "ptq", "qat"}`` test accuracies (``qat`` only when
      ``config.steps > 0``).
    """
    rules = check_rules(rules)
    _check_schedule(rules, config)
    float_variables = list(float_variables)
    if not float_variables:
        raise ValueError("float_variables must hold at least one variable tree")
    seeds = _check_seeds(seeds, len(float_variables))
    say = log or (lambda _: None)
    x_tr = data.x_train
    x0 = x_tr[:2]
    bs = config.batch_size
    calib = [x_tr[i * bs : (i + 1) * bs] for i in range(config.calib_batches)]
    qmodel, _ = ql.quantize_model(model, rules, x0, on_unused="ignore")
    ev = T.linen_apply_fn(qmodel.with_phase("eval"))
    float_apply = T.linen_apply_fn(model)
    results, starts = [], []
    for fv in float_variables:
        acc = _evaluate(float_apply, fv, data.x_test, data.y_test)
        v = qmodel.calibrate(qmodel.attach(fv, x0), calib)
        results.append({"float": acc, "ptq": _evaluate(ev, v, data.x_test, data.y_test)})
        starts.append(T.split_linen(v))
    say(f"float {[r['float'] for r in results]}; ptq {[r['ptq'] for r in results]}")
    if config.steps == 0:
        return results
    logits = jax.jit(lambda v, xb: model.apply(v, xb, train=False))
    train_apply = T.linen_apply_fn(qmodel.with_phase("train"))

    def teacher(i, xb):
        return logits(float_variables[i], xb)

    def stage(width, pms):
        """The train step's model at a lowering stage's width, every seed re-calibrated."""
        if width is None:
            return train_apply, pms
        qm, _ = ql.quantize_model(model, rules_at_width(rules, width), x0, on_unused="ignore")
        out = []
        for p, ms in pms:
            v = {**{k: c for k, c in ms.items() if k != STATS}, "params": p}
            out.append(T.split_linen(qm.calibrate(qm.attach(v, x0), calib)))
        return T.linen_apply_fn(qm.with_phase("train")), out

    return _train_and_eval(results, starts, stage, ev, teacher, data, config, seeds, say)


def _check_schedule(rules: Sequence[QuantRule], config: QATConfig) -> None:
    widths = _int_widths(rules)
    if config.schedule is not None and widths and config.schedule[-1] > min(widths):
        raise ValueError(
            f"QATConfig.schedule={config.schedule!r} ends at {config.schedule[-1]} bits, above "
            f"the rules' smallest integer width {min(widths)}: the last stage must train the "
            "rules themselves (end the schedule at that width or lower)"
        )


def _train_and_eval(results, starts, stage_fn, eval_apply, teacher, data, config, seeds, say):
    """QAT of every seed's start (one vmapped program per lowering stage), BN re-estimation,
    eval: ``qat``. ``stage_fn(width, [(params, model_state)])`` gives a stage's train apply
    function and its re-calibrated starts (``width`` None: the rules' own)."""
    x_tr, y_tr, bs = data.x_train, data.y_train, config.batch_size
    start = time.perf_counter()
    pms = list(starts)
    for st in width_stages(config.steps, config.schedule):
        train_apply, pms = stage_fn(st.width, pms)
        if st.width is not None:
            say(f"stage: steps {st.start}..{st.stop - 1} at widths >= {st.width} bits")
        n = st.stop - st.start
        opt = qat_optimizer(
            config.learning_rate, quant_lr=config.quant_lr, steps=n if config.cosine else None
        )
        step = make_qat_step(
            train_apply, opt, distill=config.distill, temperature=config.temperature
        )
        states = fit_seeds(
            step,
            [T.TrainState.create(p, ms, opt) for p, ms in pms],
            x_tr,
            y_tr,
            steps=n,
            batch_size=bs,
            keys=[jax.random.key(s) for s in seeds],
            teacher_fn=teacher if config.distill > 0 else None,
            log=say,
            start=st.start,
        )
        pms = [(s.params, s.model_state) for s in states]
    for res, (params, ms) in zip(results, pms, strict=True):
        if config.bn_batches:
            bn = [x_tr[i * bs : (i + 1) * bs] for i in range(config.bn_batches)]
            ms = reestimate_batch_stats(train_apply, params, ms, bn)
        res["qat"] = T.evaluate(eval_apply, params, ms, data.x_test, data.y_test)["accuracy"]
    say(f"qat {[r['qat'] for r in results]} ({time.perf_counter() - start:.0f} s)")
    return results


def run_nnx(
    models: Sequence[Any],
    rules: QuantRule | Sequence[QuantRule],
    data: Any,
    config: QATConfig = QATConfig(),
    *,
    seeds: Sequence[int] | None = None,
    log: Callable[[str], None] | None = print,
) -> list[dict[str, float]]:
    """:func:`run_linen` for NNX: one trained float ``nnx.Module`` per seed (same architecture,
    called as ``model(x, train=...)``), quantized by ``jquant.nn.nnx.quantize_model`` (the
    float models are left unchanged). Returns ``{"float", "ptq", "qat"}`` per seed.

    Raises:
      ValueError: for ``config.schedule`` (progressive lowering is Linen only).
    """
    from jquant.nn import nnx as qn

    rules = check_rules(rules)
    if config.schedule is not None:
        raise ValueError(
            "run_nnx: QATConfig.schedule (progressive lowering) is supported by run_linen "
            "only; set schedule=None"
        )
    models = list(models)
    if not models:
        raise ValueError("models must hold at least one nnx.Module")
    seeds = _check_seeds(seeds, len(models))
    say = log or (lambda _: None)
    bs = config.batch_size
    calib = [data.x_train[i * bs : (i + 1) * bs] for i in range(config.calib_batches)]
    results, starts, floats = [], [], []
    for m in models:
        g_f, p_f, s_f = T.split_nnx(m)
        floats.append((T.nnx_apply_fn(g_f), p_f, s_f))
        acc = T.evaluate(floats[-1][0], p_f, s_f, data.x_test, data.y_test)["accuracy"]
        qm, _ = qn.quantize_model(m, rules, on_unused="ignore")
        qn.calibrate(qm, calib)
        g_e, p, ms = T.split_nnx(qn.with_phase(qm, "eval"))
        ptq = T.evaluate(T.nnx_apply_fn(g_e), p, ms, data.x_test, data.y_test)["accuracy"]
        g_t, _, _ = T.split_nnx(qn.with_phase(qm, "train"))
        results.append({"float": acc, "ptq": ptq})
        starts.append((p, ms))
    say(f"float {[r['float'] for r in results]}; ptq {[r['ptq'] for r in results]}")
    if config.steps == 0:
        return results

    def teacher(i, xb):
        apply, p_f, s_f = floats[i]
        return apply(p_f, s_f, xb, False)[0]

    train_apply = T.nnx_apply_fn(g_t)
    return _train_and_eval(
        results,
        starts,
        lambda _, pms: (train_apply, pms),
        T.nnx_apply_fn(g_e),
        teacher,
        data,
        config,
        seeds,
        say,
    )


def format_table(rows: dict[str, list[dict[str, float]]]) -> str:
    """A markdown table: per row name, each column's mean +- standard error over seeds,
    ``se = std(a, ddof=1) / sqrt(n)`` (0 for one seed), in percent."""
    names = list(rows)
    cols = list(rows[names[0]][0]) if names else []
    lines = ["| config | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name in names:
        cells = []
        for c in cols:
            a = 100 * np.array([r[c] for r in rows[name]], np.float64)
            se = a.std(ddof=1) / np.sqrt(len(a)) if len(a) > 1 else 0.0
            cells.append(f"{a.mean():.1f} ± {se:.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
