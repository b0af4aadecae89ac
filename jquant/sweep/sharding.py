"""One compiled program for a whole sweep over bit widths: chunked, and sharded over devices.

``map_over_bits(fn, bits, args)`` evaluates ``fn(b, *args)`` for every width ``b`` in ``bits``:

- the widths are a traced int32 array (``IntFormat(bits=b)`` accepts a tracer), so the program
  is compiled once for all of them;
- on each device, ``lax.map(..., batch_size=chunk_size)`` vmaps ``chunk_size`` widths at a time
  and loops over the chunks, so the working memory is about ``chunk_size`` copies of one
  width's work instead of ``len(bits)`` copies (``chunk_size=None``: all local widths at once);
- over a :class:`jax.sharding.Mesh` with more than one device, the widths are split along the
  mesh axis ``"bits"`` with ``jax.shard_map`` (``args`` are replicated), padded to a multiple
  of the device count with copies of the last width and trimmed afterwards. The default mesh is
  all local devices (several GPUs, a TPU host, or forced host devices on CPU); a multi-host run
  initialises ``jax.distributed`` and passes ``bits_mesh(jax.devices())``.

``fn`` must be hashable and compare equal across calls that should share a compilation (a
module-level function or a frozen dataclass with ``__call__``); ``args`` is any pytree of arrays.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jquant.formats import MAX_BITS, MIN_BITS

__all__ = ["BITS_AXIS", "bits_mesh", "check_bits_list", "map_over_bits", "peak_bytes"]

BITS_AXIS = "bits"


def bits_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A one-dimensional mesh with axis ``"bits"`` over ``devices`` (default: all local ones)."""
    devices = list(jax.local_devices() if devices is None else devices)
    if not devices:
        raise ValueError("devices must name at least one device, got an empty sequence")
    return Mesh(np.array(devices), (BITS_AXIS,))


def check_bits_list(bits: Any, name: str = "bits") -> np.ndarray:
    """``bits`` as a 1-D int32 array of widths in ``[MIN_BITS, MAX_BITS]``; raises otherwise."""
    if isinstance(bits, int) and not isinstance(bits, bool):
        bits = [bits]
    arr = np.asarray(bits)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty sequence of ints, got {bits!r}")
    if arr.dtype.kind not in "iu" and not (arr.dtype.kind == "f" and np.all(arr == np.round(arr))):
        raise TypeError(f"{name} must hold integers, got {bits!r} (dtype {arr.dtype})")
    if arr.min() < MIN_BITS or arr.max() > MAX_BITS:
        raise ValueError(f"{name} must be integers in [{MIN_BITS}, {MAX_BITS}], got {arr.tolist()}")
    return arr.astype(np.int32)


def _check_bits_rows(bits: Any) -> np.ndarray:
    """Widths of shape ``(n,)`` (one per evaluation) or ``(n, k)`` (a row of ``k`` per
    evaluation, e.g. one per layer), each in ``[MIN_BITS, MAX_BITS]``, as int32."""
    arr = np.asarray(bits)
    if arr.ndim == 2 and arr.shape[0] > 0 and arr.shape[1] > 0:
        return check_bits_list(arr.reshape(-1)).reshape(arr.shape)
    return check_bits_list(bits)


def _local_sweep(fn: Callable, batch_size: int | None, bits: jax.Array, args: Any) -> Any:
    size = bits.shape[0]
    batch = size if batch_size is None else min(batch_size, size)
    return jax.lax.map(lambda b: fn(b, *args), bits, batch_size=batch)


def _sweep_body(fn: Callable, batch_size: int | None, mesh: Mesh | None, bits, args):
    local = functools.partial(_local_sweep, fn, batch_size)
    if mesh is None:
        return local(bits, args)
    replicated = jax.tree_util.tree_map(lambda _: P(), args)
    sharded = jax.shard_map(
        local, mesh=mesh, in_specs=(P(BITS_AXIS), replicated), out_specs=P(BITS_AXIS)
    )
    return sharded(bits, args)


def _shardings(mesh: Mesh, args: Any):
    return (
        NamedSharding(mesh, P(BITS_AXIS)),
        jax.tree_util.tree_map(lambda _: NamedSharding(mesh, P()), args),
    )


@functools.lru_cache(maxsize=256)
def _compiled(fn: Callable, batch_size: int | None, mesh: Mesh | None, bits_shape: tuple, abstract):
    """The compiled sweep for one (fn, chunking, mesh, input shapes); compiled once, reused."""
    treedef, avals = abstract
    args = jax.tree_util.tree_unflatten(treedef, avals)
    body = functools.partial(_sweep_body, fn, batch_size, mesh)
    jitted = jax.jit(body) if mesh is None else jax.jit(body, in_shardings=_shardings(mesh, args))
    return jitted.lower(jax.ShapeDtypeStruct(bits_shape, jnp.int32), args).compile()


def _prepare(fn, bits, args, chunk_size, mesh):
    """Validated widths, padded widths and args on their devices, and the compiled program."""
    bits = _check_bits_rows(bits)
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")
    if mesh is not None and not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh or None, got {type(mesh).__name__}")
    if mesh is not None and mesh.axis_names != (BITS_AXIS,):
        raise ValueError(f"mesh must have the single axis {BITS_AXIS!r}, got {mesh.axis_names}")
    mesh = None if mesh is None or mesh.size == 1 else mesh
    n_dev = 1 if mesh is None else mesh.size
    n = bits.shape[0]
    padded = math.ceil(n / n_dev) * n_dev
    bits_p = jnp.asarray(np.concatenate([bits, np.repeat(bits[-1:], padded - n, axis=0)]))
    args = jax.tree_util.tree_map(jnp.asarray, args)
    leaves, treedef = jax.tree_util.tree_flatten(args)
    abstract = (treedef, tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in leaves))
    compiled = _compiled(fn, chunk_size, mesh, bits_p.shape, abstract)
    if mesh is not None:
        bits_p, args = jax.device_put((bits_p, args), _shardings(mesh, args))
    return bits, bits_p, args, compiled


def map_over_bits(
    fn: Callable[..., Any],
    bits: Sequence[int] | np.ndarray,
    args: tuple = (),
    *,
    chunk_size: int | None = None,
    mesh: Mesh | None = None,
) -> Any:
    """``[fn(b, *args) for b in bits]`` stacked along a new leading axis, in one program.

    Args:
      fn: ``fn(bits, *args) -> pytree of arrays``; ``bits`` is a traced int32 scalar (or a
        row of ``k`` widths when ``bits`` is two-dimensional).
      bits: widths in ``[2, 16]``, shape ``(n,)``, or ``(n, k)`` for ``n`` evaluations that
        each take ``k`` widths (e.g. one per layer, for mixed precision).
      args: tuple (pytree) of arrays, the same for every width (replicated over devices).
      chunk_size: widths vmapped at once on each device (memory ~ chunk_size single widths);
        None vmaps all of a device's widths at once.
      mesh: a ``bits_mesh(...)``; None runs on the default device.

    Returns:
      ``fn``'s output pytree with a leading axis of length ``len(bits)`` (NumPy arrays).

    >>> import jquant as jq
    >>> map_over_bits(lambda b, x: jq.IntFormat(b).qmax * x, [2, 8], (1.0,)).tolist()
    [1.0, 127.0]
    """
    bits, bits_p, args, compiled = _prepare(fn, bits, args, chunk_size, mesh)
    out = compiled(bits_p, args)
    return jax.tree_util.tree_map(lambda o: np.asarray(o)[: bits.shape[0]], out)


def peak_bytes(
    fn: Callable[..., Any],
    bits: Sequence[int] | np.ndarray,
    args: tuple = (),
    *,
    chunk_size: int | None = None,
    mesh: Mesh | None = None,
) -> int:
    """Peak device memory of :func:`map_over_bits`' compiled program, from XLA's own analysis.

    ``argument + output + temp - alias`` bytes of ``compiled.memory_analysis()`` (per device
    when sharded): the buffers live at once at the program's high-water mark; -1 when the
    backend does not report it. The program is the one ``map_over_bits`` runs (cached).
    """
    compiled = _prepare(fn, bits, args, chunk_size, mesh)[3]
    m = compiled.memory_analysis()
    if m is None:
        return -1
    return int(
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )
