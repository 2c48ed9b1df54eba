"""Data parallelism over devices and hosts with ``jax.sharding`` and ``jax.shard_map``.

One 1-D :class:`jax.sharding.Mesh` with the axis ``"batch"`` spans the devices of every
process. Parameters, optimizer state, the normalisation constants and the step keys are
replicated on every device (``NamedSharding(mesh, P())``); inside ``shard_map`` each
device runs the ordinary step on its contiguous slice of each global batch and
``lax.pmean``-s its gradient (with the loss and the batch-norm running statistics) before
the Optax update, so the replicated state stays identical everywhere. Multi-host runs use
JAX's own distributed runtime (:func:`initialize` wraps ``jax.distributed.initialize``).

Data placement: the data are sharded over the ``"batch"`` axis, and every process places
only the rows its own devices hold (:func:`place_rows`). Each epoch, every process
computes the same global permutation of the training set from the run's key (exactly the
order a single-device run uses), lays it out as ``(steps, global batch)`` and gathers,
from its host copy, just the ``(steps, local batch)`` columns of its devices
(:func:`place_epoch`); device ``d`` of ``k`` thus holds the ``d``-th slice of every batch of
the epoch, 1/k of the training set, and a step indexes its slice directly. The validation
and test sets are split over the devices the same way once per run (:func:`place_eval`,
padded to a multiple of the device count, the padding masked out of the sums). Every
process keeps the uint8 dataset in host memory, because a global shuffle can send any
example to any device and the run must equal a one-process run on the same global
batches; on its devices it holds only its share. The single-device path does not use this
module's placement: it keeps the whole dataset on its one device and gathers each batch
there (see :mod:`jaxnets.training`).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "batch"


def initialize(coordinator_address=None, num_processes=None, process_id=None, *, auto=False):
    """Join a multi-process run through ``jax.distributed.initialize``; call before any other JAX use.

    With ``coordinator_address`` (``host:port`` of process 0), ``num_processes`` and
    ``process_id`` given explicitly; with ``auto=True`` and none given, JAX detects them
    itself (SLURM, Open MPI, TPU pod slices, ...). On CPU, cross-process collectives go
    through gloo. Does nothing when neither is asked for.
    """
    explicit = coordinator_address is not None or num_processes is not None or process_id is not None
    if not (explicit or auto):
        return
    if explicit:
        check_processes(coordinator_address, num_processes, process_id)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(coordinator_address, int(num_processes), int(process_id))
    else:
        jax.distributed.initialize()


def check_processes(coordinator_address, num_processes, process_id):
    """Raise a ValueError naming the flag unless the three multi-process settings are all
    given and sound: ``HOST:PORT`` with a port 1..65535, at least one process, and a process
    index in ``0..num_processes-1`` (checked here, before ``jax.distributed`` fails with an
    index error or waits for a coordinator that cannot exist)."""
    if None in (coordinator_address, num_processes, process_id):
        raise ValueError("multi-process: give all of --coordinator-address, --num-processes and --process-id "
                         "(or --distributed to let JAX detect them)")
    host, sep, port = str(coordinator_address).strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--coordinator-address {coordinator_address!r}: expected HOST:PORT of process 0, "
                         f"e.g. 10.0.0.1:1234")
    if int(num_processes) < 1:
        raise ValueError(f"--num-processes must be at least 1, got {num_processes}")
    if not 0 <= int(process_id) < int(num_processes):
        raise ValueError(f"--process-id must be in 0..{int(num_processes) - 1} (--num-processes {num_processes}), "
                         f"got {process_id}")


def resolve_devices(requested: int):
    """The devices a run uses: all of them (``requested`` 0) or the first ``requested``.

    Across processes, ``requested`` counts global devices and must take whole processes.
    """
    devices = jax.devices()
    if requested == 0:
        return devices
    if requested > len(devices):
        raise ValueError(f"--devices {requested}: only {len(devices)} devices are available")
    if jax.process_count() > 1 and requested != len(devices):
        raise ValueError(f"--devices {requested}: a multi-process run uses all {len(devices)} devices "
                         "(leave --devices at 0)")
    return devices[:requested]


def check_batch(batch_size: int, n_devices: int):
    """Raise ValueError unless the global batch splits evenly over the devices."""
    if batch_size % n_devices:
        works = [b for b in range(n_devices, 4 * max(batch_size, n_devices) + 1, n_devices)]
        near = sorted(works, key=lambda b: abs(b - batch_size))[:3]
        raise ValueError(
            f"batch_size {batch_size} does not divide evenly over {n_devices} devices: use a multiple of "
            f"{n_devices} (e.g. {', '.join(map(str, sorted(near)))}) or change --devices")


def make_mesh(devices) -> Mesh:
    return Mesh(np.asarray(devices), (AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def replicate(tree, mesh: Mesh):
    """Place every leaf (host or device array, same value in every process) on every device of ``mesh``."""
    sharding = replicated(mesh)

    def one(x):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(one(jax.random.key_data(x)), impl=jax.random.key_impl(x))
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    return jax.tree_util.tree_map(one, tree)


def batch_sharded(mesh: Mesh, dim: int = 0) -> NamedSharding:
    """Dimension ``dim`` split over the ``"batch"`` axis (contiguous slices, device ``d`` the ``d``-th)."""
    return NamedSharding(mesh, P(*(None,) * dim, AXIS))


def place_rows(host, index, mesh: Mesh, dim: int = 0) -> jax.Array:
    """The global array ``host[index]``, its dimension ``dim`` split over the ``"batch"`` axis.

    ``host`` is an array in this process's memory (the same in every process), ``index``
    integer row numbers into it (the same in every process; ``dim < index.ndim``). Each
    process gathers and transfers only the rows of its own devices' slices.
    """
    host, index = np.asarray(host), np.asarray(index)
    sharding = batch_sharded(mesh, dim)
    shape = index.shape + host.shape[1:]
    shards = [jax.device_put(host[index[where[: index.ndim]]], device)
              for device, where in sharding.addressable_devices_indices_map(shape).items()]
    return jax.make_array_from_single_device_arrays(shape, sharding, shards)


def place_epoch(images, labels, order, steps: int, batch: int, mesh: Mesh):
    """``(images, labels)`` of one epoch as ``(steps, batch, ...)`` arrays split over the batch dimension.

    Step ``i`` is the global batch ``order[i*batch:(i+1)*batch]`` (rows of the host arrays
    ``images``/``labels``); each device holds its contiguous slice of every step's batch.
    """
    index = np.asarray(order)[: steps * batch].reshape(steps, batch)
    return place_rows(images, index, mesh, dim=1), place_rows(labels, index, mesh, dim=1)


def place_eval(images, labels, index, mesh: Mesh):
    """``(images, labels, valid)``: the rows ``index`` of an evaluation set split over the devices.

    Padded (with copies of the last row) to a multiple of the device count; ``valid`` is
    False on the padding.
    """
    index = np.asarray(index)
    n = len(index)
    padded = -(-n // mesh.size) * mesh.size
    rows = index[np.minimum(np.arange(padded), n - 1)]
    return (place_rows(images, rows, mesh), place_rows(labels, rows, mesh),
            place_rows(np.arange(padded) < n, np.arange(padded), mesh))


def is_writer() -> bool:
    """Only process 0 writes run directories, checkpoints and results."""
    return jax.process_index() == 0
