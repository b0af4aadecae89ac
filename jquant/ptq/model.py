"""Whole-model post-training quantization of the GPT (``jquant.models.gpt``): the driver.

:func:`quantize_model` applies a :class:`Recipe` to a Linen GPT's float variables:

1. an optional function-preserving ``transform`` of the float model:

   - ``"smoothquant"`` (Xiao et al. 2022): per input channel ``s_j = max|x_j|^alpha /
     max|W_j|^(1-alpha)`` at the inputs of ``query/key/value`` and of ``mlp/up`` (the RMSNorm
     outputs, maxima over the calibration data), folded as ``gain / s`` and ``diag(s) W``;
   - ``"rotate"`` (QuaRot, Ashkboos et al. 2024): every RMSNorm gain absorbed into the
     kernels that read it (gains become 1; a tied model is untied: ``head = diag(g) E^T``),
     then the residual stream rotated by a random Hadamard ``Q``: embeddings ``E Q``,
     ``pos Q``; kernels reading the stream ``Q^T W``, kernels writing it ``W Q``. RMSNorm
     without gain commutes with ``Q`` (``||x Q|| = ||x||``), so the float model computes the
     same function (up to float rounding);
   - ``Recipe.online_hadamard`` (QuaRot's online Hadamard before the down projection,
     :func:`rotate_mlp`): the GPT rotates each MLP's hidden activation ``gelu(x W_up)`` by
     ``M`` at run time (its ``mlp_transform``, :class:`~jquant.ptq.OnlineHadamard`) and
     ``W_down <- M^T W_down``, so ``down``'s input loses its outlier channels; ``M = H``
     (``"hadamard"``, the paper's) or ``diag(d) H`` (``"random"``, signs by ``seed``);
   - ``Recipe.rotate_heads`` (QuaRot's per-head rotation of V and O, :func:`rotate_heads`):
     the value kernel's columns ``W_v (I (x) H_d)``, the out kernel's rows
     ``(I (x) H_d)^T W_o``, offline (attention mixes each head's values linearly).

2. weight quantization, layer by layer and block by block, each layer's calibration inputs
   taken from the model whose earlier layers are already quantized (sequential, as GPTQ's
   code does), in the groups ``[query, key, value]`` (one input), ``[out]``, ``[up]``,
   ``[down]`` of each block (the capture of a layer's inputs and its GPTQ step are compiled
   once per shape, whichever block the layer is in):

   - ``"rtn"``: :func:`jquant.ptq.rtn` (no data needed);
   - ``"gptq"``: :func:`jquant.ptq.gptq_from_hessian` with ``H = 2 X^T X`` summed over the
     calibration batches;
   - ``"awq"``: :func:`jquant.ptq.awq`'s scale search, one scale vector per group sharing an
     input (``query/key/value`` searched on their concatenation), folded into the op before
     it: the RMSNorm gain (``query/key/value``, ``up``) or the value projection's output
     channels (``out``: attention is linear in ``v``). ``down`` reads ``gelu(.)``, which no
     scale passes through, so it is RTN, or, with ``Recipe.awq_clip``, AWQ's clipping
     search alone (``s = 1``); ``awq_clip`` runs the clipping search after every scale
     search (``jquant.ptq.awq(..., clip=True)``).

The embeddings (and a tied head) stay float. With ``Recipe.act`` set, every Dense input is
also fake-quantized at run time with dynamic per-token ranges (W/A, e.g. SmoothQuant's W8A8
or QuaRot's W4A4): :class:`PTQModel` carries those rules (``jquant.nn.linen``).

:func:`inject_outlier` scales an RMSNorm gain channel by ``c`` and divides the matching rows
of the kernels that read the norm by ``c``: the float model is unchanged, but the norm's
output (the quantized layers' input) gets an outlier channel, which tiny models lack.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jquant.formats import Format, get_format
from jquant.models import gpt
from jquant.nn.linen import quantize_model as quantize_linen
from jquant.nn.rules import QuantRule
from jquant.ptq.awq import awq
from jquant.ptq.gptq import gptq_from_hessian, hessian
from jquant.ptq.rtn import check_group_size, rtn
from jquant.ptq.smoothquant import smoothquant_scales
from jquant.ptq.transforms import (
    OnlineHadamard,
    absorb_gain,
    hadamard,
    random_hadamard,
    rotate_input,
    rotate_output,
    scale_input,
    scale_output,
)

__all__ = [
    "METHODS",
    "ONLINE",
    "TRANSFORMS",
    "PTQModel",
    "Recipe",
    "act_rules",
    "inject_outlier",
    "quantize_model",
    "rotate_heads",
    "rotate_mlp",
    "rotate_model",
    "smooth_model",
]

METHODS = ("rtn", "gptq", "awq")
TRANSFORMS = (None, "smoothquant", "rotate")
ONLINE = (None, "hadamard", "random")  # Recipe.online_hadamard
QKV = ("attn/query", "attn/key", "attn/value")
# the layer groups of a block, in the order they are quantized (those of a group share an input)
GROUPS = (QKV, ("attn/out",), ("mlp/up",), ("mlp/down",))
# the norm of each block -> the kernels that read its output
READERS = {"norm1": QKV, "norm2": ("mlp/up",)}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How :func:`quantize_model` quantizes a GPT.

    Args:
      method: weight rounding, one of ``METHODS``: ``"rtn"``, ``"gptq"``, ``"awq"``.
      weight: weight format (``"int4"``, ``jquant.IntFormat(3)``, ...).
      group_size: inputs per weight group (dividing every kernel's input width), or None for
        one range per output channel.
      act: None (weight-only) or the format of every Dense input, quantized with dynamic
        per-token ranges at run time (symmetric).
      transform: None, ``"smoothquant"`` or ``"rotate"`` (module docstring).
      alpha: SmoothQuant's migration strength in ``[0, 1]``.
      symmetric: symmetric weight ranges (zero point 0).
      damp: GPTQ's dampening.
      seed: the random Hadamard's signs (``"rotate"``).
      online_hadamard: None, or QuaRot's online Hadamard before every ``down``
        (:func:`rotate_mlp`): ``"hadamard"`` (``H``) or ``"random"`` (``diag(d) H``, signs
        by ``seed``), one of ``ONLINE``.
      rotate_heads: QuaRot's per-head Hadamard of V and O (:func:`rotate_heads`).
      awq_clip: AWQ's clipping search after its scale search (``method="awq"`` only).
    """

    method: str = "rtn"
    weight: str | Format = "int4"
    group_size: int | None = None
    act: str | Format | None = None
    transform: str | None = None
    alpha: float = 0.5
    symmetric: bool = False
    damp: float = 0.01
    seed: int = 0
    online_hadamard: str | None = None
    rotate_heads: bool = False
    awq_clip: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"Recipe.method must be one of {METHODS}, got {self.method!r}")
        if self.transform not in TRANSFORMS:
            raise ValueError(
                f"Recipe.transform must be one of {TRANSFORMS}, got {self.transform!r}"
            )
        for name in ("weight", "act"):
            value = getattr(self, name)
            if value is None and name == "act":
                continue
            try:
                object.__setattr__(self, name, get_format(value))
            except (TypeError, ValueError) as e:
                raise type(e)(f"Recipe.{name}: {e}") from None
        if self.group_size is not None:
            check_group_size(self.group_size, self.group_size)
        if not isinstance(self.alpha, int | float) or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"Recipe.alpha must be a number in [0, 1], got {self.alpha!r}")
        if self.transform == "smoothquant" and self.method == "awq":
            raise ValueError("Recipe: smoothquant and awq both rescale input channels; pick one")
        if self.online_hadamard not in ONLINE:
            raise ValueError(
                f"Recipe.online_hadamard must be one of {ONLINE}, got {self.online_hadamard!r}"
            )
        for name in ("rotate_heads", "awq_clip"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"Recipe.{name} must be a bool, got {getattr(self, name)!r}")
        if self.awq_clip and self.method != "awq":
            raise ValueError(
                f"Recipe.awq_clip needs method='awq' (AWQ's clipping search), got "
                f"method={self.method!r}"
            )


class PTQModel(NamedTuple):
    """The result of :func:`quantize_model`: a GPT (untied by ``"rotate"``, with the online
    Hadamard as its ``mlp_transform`` by ``online_hadamard``), its variables with
    fake-quantized kernels, and the activation rules it runs with (empty: weight-only).
    """

    model: gpt.GPT
    variables: dict
    rules: tuple[QuantRule, ...]

    def runner(self, example: jax.Array):
        """``(model, variables)`` to call as ``model.apply(variables, tokens)``: the GPT
        itself (weight-only) or its ``jquant.nn.linen.QuantizedModel`` in the eval phase."""
        if not self.rules:
            return self.model, self.variables
        qmodel, _ = quantize_linen(self.model, self.rules, example, phase="eval")
        return qmodel, qmodel.attach(self.variables, example)


def _get(tree: dict, path: str):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def _set(tree: dict, path: str, value) -> dict:
    """A copy of ``tree`` (nested dicts) with ``value`` at ``path``."""
    key, _, rest = path.partition("/")
    out = dict(tree)
    out[key] = _set(tree[key], rest, value) if rest else value
    return out


def _kernel(params: dict, block: int, name: str) -> jax.Array:
    return _get(params, f"block{block}/{name}/kernel")


def _set_kernel(params: dict, block: int, name: str, kernel: jax.Array) -> dict:
    return _set(params, f"block{block}/{name}/kernel", kernel)


def inject_outlier(model: gpt.GPT, variables: dict, norm: str, channel: int, factor: float) -> dict:
    """Function-preserving outlier: ``g_c <- factor * g_c`` of the RMSNorm at ``norm``
    (``"block1/norm1"``, ``"block2/norm2"``) and ``W_c <- W_c / factor`` for row ``c`` of every
    kernel that reads it (``query/key/value`` or ``mlp/up``), so ``norm(h) W`` is unchanged
    while channel ``c`` of the norm's output is ``factor`` times larger.

    Raises:
      ValueError: ``norm`` is not a block's ``norm1`` / ``norm2``; ``channel`` out of range;
        ``factor`` not positive.
    """
    cfg = model.config
    block, _, which = norm.partition("/")
    blocks = [f"block{i + 1}" for i in range(cfg.num_layers)]
    if block not in blocks or which not in READERS:
        raise ValueError(
            f"norm must be '<block>/norm1' or '<block>/norm2' of {blocks}, got {norm!r}"
        )
    if isinstance(channel, bool) or not isinstance(channel, int) or not 0 <= channel < cfg.width:
        raise ValueError(f"channel must be an int in [0, {cfg.width}), got {channel!r}")
    if not isinstance(factor, int | float) or not factor > 0:
        raise ValueError(f"factor must be a number > 0, got {factor!r}")
    params = variables["params"]
    gain = _get(params, f"{norm}/scale")
    params = _set(params, f"{norm}/scale", gain.at[channel].multiply(factor))
    for name in READERS[which]:
        path = f"{block}/{name}/kernel"
        params = _set(params, path, _get(params, path).at[channel].divide(factor))
    return {**variables, "params": params}


def _dense_inputs(model: gpt.GPT, paths: tuple[str, ...], variables: dict, tokens) -> dict:
    """``{path: x}``: the inputs ``x`` ``(B n, in)`` of the Dense layers at ``paths`` in one
    forward pass of ``tokens`` (traceable)."""
    seen = {}

    def record(next_fun, args, kwargs, context):
        path = "/".join(context.module.path)
        if context.method_name == "__call__" and path in paths:
            seen[path] = args[0].reshape(-1, args[0].shape[-1])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        model.apply(variables, tokens)
    return seen


def _dense_input(
    model: gpt.GPT, paths: tuple[str, ...], variables: dict, tokens, which: jax.Array
) -> jax.Array:
    """The input of the Dense at ``paths[which]``: ``select_n(which, x_0, ..., x_k)`` over
    the inputs of every layer in ``paths`` (all of one input width). ``which`` is traced, so
    the program is the same for every layer of ``paths``: one compilation per input width
    instead of one per layer, for the price of running the forward pass up to the last
    layer of ``paths`` at every capture (a program per layer stops at that layer)."""
    seen = _dense_inputs(model, paths, variables, tokens)
    return jax.lax.select_n(which, *(seen[p] for p in paths))


# compiled once per (model, paths) and argument shapes: jit's own cache (a GPT and its
# mlp_transform hash by value)
_dense_inputs_jit = jax.jit(_dense_inputs, static_argnums=(0, 1))
_dense_input_jit = jax.jit(_dense_input, static_argnums=(0, 1))


def _capture(model: gpt.GPT, variables: dict, batches: list, paths: tuple[str, ...]) -> dict:
    """The inputs ``(N, in)`` of the Dense layers at ``paths`` over ``batches``."""
    outs = [_dense_inputs_jit(model, paths, variables, t) for t in batches]
    return {p: jnp.concatenate([o[p] for o in outs]) for p in paths}


def _capture_one(
    model: gpt.GPT, variables: dict, batches: list, paths: tuple[str, ...], path: str
) -> jax.Array:
    """The input ``(N, in)`` of the Dense at ``path`` over ``batches``; ``paths``: the layers
    that share its program (:func:`_dense_input`), ``path`` among them."""
    which = jnp.int32(paths.index(path))
    return jnp.concatenate([_dense_input_jit(model, paths, variables, t, which) for t in batches])


def smooth_model(
    model: gpt.GPT, variables: dict, calib_batches: Iterable[jax.Array], alpha: float = 0.5
) -> dict:
    """SmoothQuant (Xiao et al. 2022, Eq. 4) on a GPT: per block and norm,
    ``s_j = max|x_j|^alpha / max_k |W_jk|^(1 - alpha)`` over the norm's output ``x`` on
    ``calib_batches`` and the kernels reading it (``query/key/value`` concatenated, or
    ``up``); then ``gain <- gain / s``, ``W <- diag(s) W``: the same function, with the
    activation outliers migrated into the weights."""
    batches = [jnp.asarray(b) for b in calib_batches]
    if not batches:
        raise ValueError("calib_batches yielded no batch; SmoothQuant needs data")
    params = variables["params"]
    first = {
        (i, norm): f"block{i}/{readers[0]}"
        for i in range(1, model.config.num_layers + 1)
        for norm, readers in READERS.items()
    }
    xs = _capture(model, variables, batches, tuple(first.values()))  # one pass: same function
    for (i, norm), path in first.items():
        kernels = [_kernel(params, i, r) for r in READERS[norm]]
        w_absmax = jnp.max(jnp.abs(jnp.concatenate(kernels, axis=1)), axis=1)
        s = smoothquant_scales(jnp.max(jnp.abs(xs[path]), axis=0), w_absmax, alpha)
        gain = f"block{i}/{norm}/scale"
        params = _set(params, gain, _get(params, gain) / s)
        for r, k in zip(READERS[norm], kernels, strict=True):
            params = _set_kernel(params, i, r, scale_input(k, s))
    return {**variables, "params": params}


def rotate_model(model: gpt.GPT, variables: dict, seed: int = 0) -> tuple[gpt.GPT, dict]:
    """QuaRot's computational invariance on a GPT (Ashkboos et al. 2024, Section 4): gains
    absorbed (``W <- diag(g) W``, ``g <- 1``), then with ``Q = diag(d) H / sqrt(n)``
    (random signs ``d`` from ``seed``): ``E <- E Q``, ``pos <- pos Q``, readers of the
    residual stream ``W <- Q^T W``, writers ``W <- W Q``, ``head = Q^T diag(g) E^T``.

    Returns the untied GPT (``tied_embeddings=False``) and its variables: the same function.

    Raises:
      ValueError: the width has no Hadamard matrix (``jquant.ptq.hadamard``).
    """
    cfg = model.config
    q = random_hadamard(jax.random.key(seed), cfg.width)
    p = variables["params"]
    embed = p["embed"]["embedding"]
    gain = p["norm"]["scale"]
    head = p["head"]["kernel"] if not cfg.tied_embeddings else embed.T
    new = {
        "embed": {"embedding": rotate_output(embed, q)},
        "pos_embed": rotate_output(p["pos_embed"], q),
        "norm": {"scale": jnp.ones_like(gain)},
        "head": {"kernel": rotate_input(absorb_gain(gain, head), q)},
    }
    for i in range(1, cfg.num_layers + 1):
        b = p[f"block{i}"]
        blk = {"norm1": {"scale": jnp.ones_like(b["norm1"]["scale"])}}
        blk["norm2"] = {"scale": jnp.ones_like(b["norm2"]["scale"])}
        attn = {
            n: {"kernel": rotate_input(absorb_gain(b["norm1"]["scale"], b["attn"][n]["kernel"]), q)}
            for n in ("query", "key", "value")
        }
        attn["out"] = {"kernel": rotate_output(b["attn"]["out"]["kernel"], q)}
        up = rotate_input(absorb_gain(b["norm2"]["scale"], b["mlp"]["up"]["kernel"]), q)
        mlp = {
            "up": {"kernel": up},
            "down": {"kernel": rotate_output(b["mlp"]["down"]["kernel"], q)},
        }
        new[f"block{i}"] = {**blk, "attn": attn, "mlp": mlp}
    untied = model.clone(config=dataclasses.replace(cfg, tied_embeddings=False))
    return untied, {**variables, "params": new}


def rotate_mlp(model: gpt.GPT, variables: dict, seed: int | None = None) -> tuple[gpt.GPT, dict]:
    """QuaRot's online Hadamard before the down projection (Ashkboos et al. 2024, Section 4):
    the returned GPT computes ``down(gelu(x W_up) M)`` (``mlp_transform =
    OnlineHadamard(n, seed)``, ``n = mlp_ratio * width``, ``M = H_n`` or, with ``seed``,
    ``diag(d) H_n``) with ``W_down <- M^T W_down`` in every block: ``(h M)(M^T W) = h W``,
    the same function, and ``down``'s input ``h M`` has its outlier channels spread over all
    channels (with ``M = H_n`` its mean goes to channel 0: :class:`OnlineHadamard`).

    Raises:
      ValueError: the model already has an ``mlp_transform``; ``n`` has no Hadamard matrix
        (``jquant.ptq.hadamard``: a power of 2 times a Paley size).
    """
    if model.mlp_transform is not None:
        raise ValueError(
            f"model already has an mlp_transform ({model.mlp_transform!r}); rotate_mlp "
            "rotates a GPT without one"
        )
    cfg = model.config
    transform = OnlineHadamard(cfg.mlp_ratio * cfg.width, seed)
    h = transform.matrix()
    params = variables["params"]
    for i in range(1, cfg.num_layers + 1):
        params = _set_kernel(params, i, "mlp/down", rotate_input(_kernel(params, i, "mlp/down"), h))
    return model.clone(mlp_transform=transform), {**variables, "params": params}


def rotate_heads(model: gpt.GPT, variables: dict) -> dict:
    """QuaRot's per-head rotation of V and O (Ashkboos et al. 2024, Section 4): with
    ``B = I_heads (x) H_d`` (``H_d = jquant.ptq.hadamard(head_dim)``, block diagonal),
    ``W_v <- W_v B`` and ``W_o <- B^T W_o`` in every block. Each head's values come rotated,
    ``P (v H_d) = (P v) H_d``, so ``out`` computes the same function; its input and the
    value cache have each head's outliers spread over the head.

    Raises:
      ValueError: ``head_dim`` has no Hadamard matrix (``jquant.ptq.hadamard``).
    """
    cfg = model.config
    b = jnp.kron(jnp.eye(cfg.num_heads, dtype=jnp.float32), hadamard(cfg.head_dim))
    params = variables["params"]
    for i in range(1, cfg.num_layers + 1):
        params = _set_kernel(
            params, i, "attn/value", rotate_output(_kernel(params, i, "attn/value"), b)
        )
        params = _set_kernel(params, i, "attn/out", rotate_input(_kernel(params, i, "attn/out"), b))
    return {**variables, "params": params}


def _quantize_group(
    recipe: Recipe, kernels: list, x: jax.Array | None, scaled: bool = True
) -> tuple[list, Any]:
    """Quantized kernels of layers sharing the input ``x`` (and AWQ's scales, else None);
    ``scaled=False``: AWQ's clipping search alone (``s = 1``, no scales returned)."""
    fmt, g, sym = recipe.weight, recipe.group_size, recipe.symmetric
    if recipe.method == "rtn" or x is None:
        return [rtn(k, fmt, group_size=g, symmetric=sym).kernel for k in kernels], None
    if recipe.method == "gptq":
        h = hessian(x)
        return [
            gptq_from_hessian(k, h, fmt, group_size=g, damp=recipe.damp, symmetric=sym).kernel
            for k in kernels
        ], None
    widths = [k.shape[1] for k in kernels]
    grid = {} if scaled else {"grid": 1}  # grid 1: alpha = 0, s = 1
    res = awq(
        jnp.concatenate(kernels, axis=1), x, fmt, group_size=g, symmetric=sym,
        clip=recipe.awq_clip, **grid,
    )  # fmt: skip
    splits = jnp.split(res.kernel, jnp.cumsum(jnp.asarray(widths))[:-1].tolist(), axis=1)
    return list(splits), res.scales if scaled else None


def _readers_by_width(params: dict, num_layers: int) -> dict[int, tuple[str, ...]]:
    """``{in: paths}``: the first layer of every group (:data:`GROUPS`) of every block, by
    input width; each tuple shares one capture program (:func:`_capture_one`)."""
    out: dict[int, tuple[str, ...]] = {}
    for i in range(1, num_layers + 1):
        for group in GROUPS:
            n_in = _kernel(params, i, group[0]).shape[0]
            out[n_in] = (*out.get(n_in, ()), f"block{i}/{group[0]}")
    return out


def _quantize_weights(model: gpt.GPT, variables: dict, batches: list, recipe: Recipe) -> dict:
    """Quantizes the groups of every block in order, each on its inputs in the model whose
    earlier groups are quantized; the work of one layer (its input capture, GPTQ, AWQ) is
    compiled once per shape, whichever block it is in."""
    params = variables["params"]
    needs_data = recipe.method != "rtn"
    readers = _readers_by_width(params, model.config.num_layers)
    for i in range(1, model.config.num_layers + 1):
        for group in GROUPS:
            x = None
            # AWQ: no scale passes gelu, so down is RTN, or clipped alone with awq_clip
            scaled = not (recipe.method == "awq" and group == ("mlp/down",))
            if needs_data and (scaled or recipe.awq_clip):
                first = f"block{i}/{group[0]}"
                paths = readers[_kernel(params, i, group[0]).shape[0]]
                x = _capture_one(model, {**variables, "params": params}, batches, paths, first)
            kernels, scales = _quantize_group(
                recipe, [_kernel(params, i, n) for n in group], x, scaled
            )
            for n, k in zip(group, kernels, strict=True):
                params = _set_kernel(params, i, n, k)
            if scales is None:
                continue
            if group == QKV:  # fold 1/s into norm1's gain
                path = f"block{i}/norm1/scale"
            elif group == ("mlp/up",):
                path = f"block{i}/norm2/scale"
            else:  # attn/out reads P v: v's output channels divided by s
                v = _kernel(params, i, "attn/value")
                params = _set_kernel(params, i, "attn/value", scale_output(v, scales))
                continue
            params = _set(params, path, _get(params, path) / scales)
    return {**variables, "params": params}


def quantize_model(
    model: gpt.GPT, variables: dict, calib_batches: Iterable[jax.Array], recipe: Recipe
) -> PTQModel:
    """Post-training quantization of a Linen GPT by ``recipe`` (module docstring).

    For ``"awq"`` the ``out`` layer's scales go into the value kernel, quantized one group
    earlier: ``Q(W_v) diag(1/s)`` divides each output column by a constant, so every column
    (and each group of it) stays on a grid, its scale divided by ``s_j``.

    Args:
      model: a ``jquant.models.gpt.GPT``.
      variables: its float variables.
      calib_batches: token ids ``(B, n)`` (materialized once; used by GPTQ, AWQ and
        SmoothQuant).
      recipe: a :class:`Recipe`.

    Returns:
      :class:`PTQModel`.

    Raises:
      TypeError: not a Linen GPT or not a Recipe.
      ValueError: no calibration batch when the recipe needs data; a group size that does not
        divide a kernel's input width; a width with no Hadamard matrix (``"rotate"``,
        ``online_hadamard``, ``rotate_heads``; ``jquant.ptq.hadamard``).
    """
    if not isinstance(model, gpt.GPT):
        raise TypeError(f"model must be a jquant.models.gpt.GPT, got {type(model).__name__}")
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be a jquant.ptq.Recipe, got {type(recipe).__name__}")
    batches = [jnp.asarray(b) for b in calib_batches]
    needs_data = recipe.method != "rtn" or recipe.transform == "smoothquant"
    if needs_data and not batches:
        raise ValueError("calib_batches yielded no batch; GPTQ, AWQ and SmoothQuant need data")
    cfg = model.config
    for width in (cfg.width, cfg.mlp_ratio * cfg.width):
        check_group_size(recipe.group_size, width)
    if recipe.transform == "smoothquant":
        variables = smooth_model(model, variables, batches, recipe.alpha)
    elif recipe.transform == "rotate":
        model, variables = rotate_model(model, variables, recipe.seed)
    if recipe.rotate_heads:
        variables = rotate_heads(model, variables)
    if recipe.online_hadamard is not None:
        seed = recipe.seed if recipe.online_hadamard == "random" else None
        model, variables = rotate_mlp(model, variables, seed)
    variables = _quantize_weights(model, variables, batches, recipe)
    return PTQModel(model, variables, act_rules(recipe.act))


def act_rules(act: str | Format | None) -> tuple[QuantRule, ...]:
    """Rules quantizing every Dense input of a GPT block (``query, key, value, out, up,
    down``) to ``act`` with symmetric dynamic per-token ranges, weights left as they are
    (``()`` when ``act`` is None: weight-only)."""
    if act is None:
        return ()
    return (
        QuantRule(
            r"block\d+/(attn/(query|key|value|out)|mlp/(up|down))",
            weight=None,
            act=act,
            act_symmetric=True,
            act_scale="dynamic_per_token",
        ),
    )
