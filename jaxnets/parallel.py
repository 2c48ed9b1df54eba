"""Data parallelism over devices and hosts with ``jax.sharding`` and ``jax.shard_map``.

One 1-D :class:`jax.sharding.Mesh` with the axis ``"batch"`` spans the devices of every
process. Parameters, optimizer state, the uint8 dataset and the epoch permutations are
replicated on every device (``NamedSharding(mesh, P())``); inside ``shard_map`` each
device gathers its own contiguous slice of each global batch, computes its gradient and
``lax.pmean``-s it (with the loss and the batch-norm running statistics) before the Optax
update, so the replicated state stays identical everywhere. Multi-host runs use JAX's
own distributed runtime (:func:`initialize` wraps ``jax.distributed.initialize``).
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
    if explicit and None in (coordinator_address, num_processes, process_id):
        raise ValueError("multi-process: give all of --coordinator-address, --num-processes and --process-id "
                         "(or --distributed to let JAX detect them)")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(coordinator_address, int(num_processes), int(process_id))
    else:
        jax.distributed.initialize()


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


def is_writer() -> bool:
    """Only process 0 writes run directories, checkpoints and results."""
    return jax.process_index() == 0
