"""One compiled program for a whole sweep over bit widths: chunked, and sharded over devices.

``map_over_bits(fn, bits, args)`` evaluates ``fn(b, *args)`` for every width ``b`` in ``bits``:

- the widths are a traced int32 array (``IntFormat(bits=b)`` accepts a tracer), so the program
  is compiled once for all of them;
- on each device, ``lax.map(..., batch_size=chunk_size)`` vmaps ``chunk_size`` widths at a time
  and loops over the chunks, so the working memory is about ``chunk_size`` copies of one
  width's work instead of ``len(bits)`` copies (``chunk_size=None``: all local widths at once);
- over a :class:`jax.sharding.Mesh` with more than one device, the widths are split along the
  mesh axis ``"bits"`` with ``jax.shard_map`` (``args`` are replicated), padded to a multiple
  of the device count with copies of the last width and trimmed afterwards. ``mesh=None`` (the
  default everywhere in :mod:`jquant.sweep`) is :func:`bits_mesh` over ``jax.devices()``: all
  local devices on one host (several GPUs, a TPU host, or forced host devices on CPU), and
  one device runs the plain program, unsharded.

Several hosts (multi-controller JAX): every process runs the same script, the same calls with
the same arguments (SPMD); the default mesh then spans the devices of all processes, each
process evaluates the widths on its own devices, and the results are gathered to every process
(``jax.experimental.multihost_utils.process_allgather``, only when an output is not fully
addressable, i.e. only when ``jax.process_count() > 1``). Write files on one process only
(:func:`is_main_process`; ``jquant sweep`` does)::

    # on every host, e.g. `python sweep.py` launched by SLURM / mpirun / a TPU pod runner
    import jax
    jax.distributed.initialize()       # coordinator address, process count and id from the
                                       # cluster environment, or pass them explicitly
    from jquant.sweep import model_vs_bits
    from jquant.sweep.sharding import bits_mesh, is_main_process
    table = model_vs_bits(model, variables, x, y, bits=range(2, 9), mesh=bits_mesh())
    if is_main_process():
        table.to_csv("model.csv")

``bits_mesh()`` is the global mesh (``jax.devices()``, every process's devices); pass
``bits_mesh(jax.local_devices())`` to keep a sweep on one host's devices, or
``bits_mesh(jax.devices()[:1])`` to run it unsharded. Inputs (``args``) are host NumPy or
JAX arrays with the same value on every process; they are replicated onto the mesh.

``fn`` must be hashable and compare equal across calls that should share a compilation (a
module-level function or a frozen dataclass with ``__call__``); ``args`` is any pytree of arrays.
Inside the sharded program the width varies per device: a loop in ``fn`` whose carry starts
from a constant but depends on the width must start it with
:func:`jquant.calibration.grouping.varying_like` (else ``lax.scan`` rejects the carry, and
``jax.grad`` with respect to it sums over the devices), as the calibration searches do.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jquant.formats import MAX_BITS, MIN_BITS

__all__ = [
    "BITS_AXIS",
    "bits_mesh",
    "check_bits_list",
    "compiled_sweep",
    "is_main_process",
    "map_over_bits",
    "peak_bytes",
    "sweep_mesh",
]

BITS_AXIS = "bits"


def bits_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A one-dimensional mesh with axis ``"bits"`` over ``devices`` (default: ``jax.devices()``,
    all local devices on one host, every process's devices after ``jax.distributed``)."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("devices must name at least one device, got an empty sequence")
    return Mesh(np.array(devices), (BITS_AXIS,))


def sweep_mesh(mesh: Mesh | None = None) -> Mesh:
    """The mesh a sweep runs on: ``mesh``, or :func:`bits_mesh` for None; its ``size`` is the
    number of devices the widths are split over (1: the unsharded program). Raises on anything
    but a mesh with the single axis ``"bits"``."""
    if mesh is None:
        mesh = bits_mesh()
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh or None, got {type(mesh).__name__}")
    if mesh.axis_names != (BITS_AXIS,):
        raise ValueError(f"mesh must have the single axis {BITS_AXIS!r}, got {mesh.axis_names}")
    return mesh


def is_main_process() -> bool:
    """True on the process that writes results: process 0 (always true on a single host)."""
    return jax.process_index() == 0


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


def _put(args: Any, shardings: Any) -> Any:
    """``args`` placed with ``shardings``; across processes, each supplies its own devices'
    shards (``device_put`` of one host's array cannot reach other hosts' devices)."""
    if jax.process_count() == 1:
        return jax.device_put(args, shardings)
    return jax.tree_util.tree_map(
        lambda a, s: jax.make_array_from_callback(a.shape, s, np.asarray(a).__getitem__),
        args,
        shardings,
    )


def _to_host(x: jax.Array) -> np.ndarray:
    """``x`` as a NumPy array; gathered from every process when this one holds only a part."""
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _prepare(fn, bits, args, chunk_size, mesh):
    """Validated widths, padded widths, args as arrays, the mesh and the compiled program."""
    bits = _check_bits_rows(bits)
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")
    mesh = sweep_mesh(mesh)
    mesh = None if mesh.size == 1 else mesh
    n_dev = 1 if mesh is None else mesh.size
    n = bits.shape[0]
    padded = math.ceil(n / n_dev) * n_dev
    bits_p = np.concatenate([bits, np.repeat(bits[-1:], padded - n, axis=0)])
    args = jax.tree_util.tree_map(jnp.asarray, args)
    leaves, treedef = jax.tree_util.tree_flatten(args)
    abstract = (treedef, tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in leaves))
    return bits, bits_p, args, mesh, _compiled(fn, chunk_size, mesh, bits_p.shape, abstract)


def compiled_sweep(
    fn: Callable[..., Any],
    bits: Sequence[int] | np.ndarray,
    args: tuple = (),
    *,
    chunk_size: int | None = None,
    mesh: Mesh | None = None,
) -> jax.stages.Compiled:
    """The compiled program :func:`map_over_bits` runs for these arguments (cached): its
    ``input_shardings`` / ``output_shardings`` show how the widths are split over devices."""
    return _prepare(fn, bits, args, chunk_size, mesh)[4]


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
      mesh: a ``bits_mesh(...)``; None: ``bits_mesh()``, every device (see the module
        docstring); a one-device mesh runs unsharded.

    Returns:
      ``fn``'s output pytree with a leading axis of length ``len(bits)`` (NumPy arrays, the
      same on every process).

    >>> import jquant as jq
    >>> map_over_bits(lambda b, x: jq.IntFormat(b).qmax * x, [2, 8], (1.0,)).tolist()
    [1.0, 127.0]
    """
    bits, bits_p, args, mesh, compiled = _prepare(fn, bits, args, chunk_size, mesh)
    if mesh is None:
        out = compiled(jnp.asarray(bits_p), args)
    else:
        out = compiled(*_put((bits_p, args), _shardings(mesh, args)))
    return jax.tree_util.tree_map(lambda o: _to_host(o)[: bits.shape[0]], out)


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
    m = compiled_sweep(fn, bits, args, chunk_size=chunk_size, mesh=mesh).memory_analysis()
    if m is None:
        return -1
    return int(
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )
