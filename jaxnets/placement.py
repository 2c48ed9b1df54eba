"""Where a group's members run, and in what order: placement and scheduling for the loop.

:class:`MemberBlocks` schedules a group's members (one vmapped block, or blocks of one
member each run through its single run's programs, :data:`CONCURRENT_BLOCKS` at a time);
:class:`OneDevice` and :class:`DeviceMesh` place the data and run the chunk and evaluation
programs of :mod:`jaxnets.steps` on one device or data parallel over a mesh. Both
placements have the same interface (``put``, ``chunk``, ``inputs``, ``epoch_data``,
``evaluate``, ``describe``), so the loop in :mod:`jaxnets.training` does not know which it
has. Each epoch's order and step keys come from :func:`epoch_inputs` (``(seed, epoch)``).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np

from jaxnets import parallel
from jaxnets.steps import FLIP_STREAM, make_group_chunk, make_group_evaluate, make_parallel_chunk, make_parallel_evaluate


#: XLA options for programs of integer arithmetic only (threefry, sorts, gathers), which any
#: optimisation level computes bit for bit alike: without LLVM's optimisations the epoch's
#: order (6 threefry calls and two sorts) compiles in 0.3 s instead of 0.7 s on the 2-core
#: CPU, and runs in 30 ms instead of 23 ms, once per epoch.
INTEGER_PROGRAM_OPTIONS = {"xla_backend_optimization_level": 0}


def epoch_inputs(run_key, train_idx, epoch, alternating=False):
    """A member's epoch order (indices into the pool) and the key its steps fold in; with
    ``alternating`` flips, ``{"step": that key, "flip": the run's flip key, "odd": epoch % 2}``
    (see :func:`jaxnets.steps.alternating_flips`)."""
    perm_key, epoch_key = jax.random.split(jax.random.fold_in(run_key, epoch))
    perm = train_idx[jax.random.permutation(perm_key, train_idx.shape[0])]
    if alternating:
        return perm, {"step": epoch_key, "flip": jax.random.fold_in(run_key, FLIP_STREAM), "odd": epoch % 2 == 1}
    return perm, epoch_key


def _epoch_program(config, integer_options):
    """:func:`epoch_inputs` of a block of members, compiled."""
    alternating = config.augment and config.flip == "alternating" and config.dataset != "mnist"
    one = lambda k, idx, epoch: epoch_inputs(k, idx, epoch, alternating)
    return jax.jit(jax.vmap(one, in_axes=(0, 0, None)), compiler_options=integer_options)


class MemberBlocks:
    """How a group's members are scheduled: blocks of members (slices), each block one
    program run after the other, :data:`CONCURRENT_BLOCKS` blocks in flight at once (each its
    own program on its own inputs, so the numbers do not depend on what runs beside it).
    The first call of a program runs alone, so it compiles once."""

    def __init__(self, size, *, vmap, put):
        self.blocks = member_blocks(size, vmap=vmap)
        self.block_of = [(k, m - b.start) for k, b in enumerate(self.blocks) for m in range(b.start, b.stop)]
        self.put = put
        self.pool = ThreadPoolExecutor(CONCURRENT_BLOCKS) if len(self.blocks) > 1 else None
        self.compiled = set()

    def part(self, tree, k):
        """Block ``k``'s members of a stacked host tree, placed on the device."""
        return self.put(jax.tree_util.tree_map(lambda a: a[self.blocks[k]], tree))

    def with_members(self, members):
        """The blocks holding at least one member where ``members`` (a bool per member) is True."""
        return [k for k, b in enumerate(self.blocks) if members[b].any()]

    def run(self, fn, ks, program):
        """``{k: fn(k)}`` for the blocks ``ks``."""
        results = {}
        if program not in self.compiled and ks:
            results[ks[0]] = fn(ks[0])
            self.compiled.add(program)
        rest = [k for k in ks if k not in results]
        many = self.pool is not None and len(rest) > 1
        results.update(zip(rest, self.pool.map(fn, rest) if many else map(fn, rest)))
        return results

    def gather(self, got, fill):
        """Concatenate per-block results ``got[k]`` over the members, ``fill(block)`` where missing."""
        return np.concatenate([got[k] if k in got else fill(b) for k, b in enumerate(self.blocks)])

    def close(self):
        if self.pool is not None:
            self.pool.shutdown()


class OneDevice:
    """Placement on one device: the whole uint8 pool there; each step gathers its batch,
    each block of members gets its keys, splits and normalisation placed once."""

    def __init__(self, model, optimizer, config, pool, test, members, keys_data, train_idx, val_idx, means, stds,
                 hps, integer_options):
        self.put, self.members, self.test = jax.device_put, members, test
        self.images, self.labels = self.put(pool[0]), self.put(pool[1])
        self.chunk = make_group_chunk(model, optimizer, config)
        self.evaluate_fn = make_group_evaluate(model, config.eval_batch_size, config.image_size, tta=config.tta)
        self.epoch_inputs = _epoch_program(config, integer_options)
        part = members.part
        self.inputs = [dict(means=part(means, k), stds=part(stds, k), hps=part(hps, k),
                            keys=jax.random.wrap_key_data(part(keys_data, k)), train_idx=part(train_idx, k),
                            val_idx=part(val_idx, k)) for k in range(len(members.blocks))]
        self.test_set = None

    def describe(self, size, run_dir):
        blocks = self.members.blocks
        return (f"run dir {run_dir}" if size == 1 else f"{size} members vmapped" if len(blocks) == 1 else
                f"{size} members, each through its single run's programs, {min(CONCURRENT_BLOCKS, size)} at a time")

    def epoch_data(self, epoch, k):
        x = self.inputs[k]
        perms, epoch_keys = self.epoch_inputs(x["keys"], x["train_idx"], epoch)
        return (self.images, self.labels, perms), epoch_keys

    def evaluate(self, split, params, state, k):
        x = self.inputs[k]
        if split == "val":
            return self.evaluate_fn(params, state, self.images, self.labels, x["val_idx"], x["means"], x["stds"])
        self.test_set = self.test_set or (self.put(self.test[0]), self.put(self.test[1]))
        return self.evaluate_fn(params, state, *self.test_set, None, x["means"], x["stds"])


class DeviceMesh:
    """Placement over a mesh of devices (data parallel, one member): each process places only
    its own devices' share of every batch (see :mod:`jaxnets.parallel`)."""

    def __init__(self, model, optimizer, config, pool, test, members, keys_data, train_idx, val_idx, means, stds,
                 hps, integer_options, mesh, steps_per_epoch):
        self.mesh, self.pool, self.test, self.config = mesh, pool, test, config
        self.put = lambda x: parallel.replicate(x, mesh)
        self.chunk = make_parallel_chunk(model, optimizer, config, mesh)
        self.evaluate_fn = make_parallel_evaluate(model, config.eval_batch_size, mesh, config.image_size,
                                                  tta=config.tta)
        self.epoch_inputs = _epoch_program(config, integer_options)
        self.host_keys, self.train_idx, self.steps_per_epoch = jax.random.wrap_key_data(keys_data), train_idx, \
            steps_per_epoch
        self.val_set = parallel.place_eval(*pool, val_idx[0], mesh) if val_idx.shape[1] else None
        self.inputs = [dict(means=members.part(means, 0), stds=members.part(stds, 0), hps=members.part(hps, 0))]

    def describe(self, size, run_dir):
        c = self.config
        return (f"run dir {run_dir}; data parallel over {self.mesh.size} devices ({jax.process_count()} processes), "
                f"{c.batch_size // self.mesh.size} examples per device, "
                f"{'synchronised' if c.sync_bn else 'per-device'} batch norm")

    def epoch_data(self, epoch, k):
        # Every process computes the order a single-device run uses (from the host copy of
        # the run key) and places its devices' columns of it.
        perms, epoch_keys = self.epoch_inputs(self.host_keys, self.train_idx, epoch)
        batches = parallel.place_epoch(*self.pool, np.asarray(perms[0]), self.steps_per_epoch,
                                       self.config.batch_size, self.mesh)
        return batches, self.put(epoch_keys)

    def evaluate(self, split, params, state, k):
        x = self.inputs[k]
        data = self.val_set if split == "val" else parallel.place_eval(*self.test, np.arange(len(self.test[1])),
                                                                         self.mesh)
        return self.evaluate_fn(params, state, *data, x["means"], x["stds"])


#: Blocks of members in flight at once when a group trains block by block: on the 2-core
#: CPU two single-member programs side by side ran ~20% more member-steps per second than
#: one after another (XLA:CPU's intra-op threads leave the cores partly idle).
CONCURRENT_BLOCKS = 2


def member_blocks(size, *, vmap=None):
    """How a group's ``size`` members train: slices of members, each block one program run
    after the other. ``vmap`` True: one block of all (one vmapped program); False: blocks
    of one, each member through its single run's own programs. None: vmapped except on
    XLA:CPU, where the batched matrix products run at or below the single-run speed per
    member and the batched softmax and reductions round differently from the single run's,
    so a vmapped member drifts away from its single run over hundreds of steps."""
    if vmap is None:
        vmap = jax.default_backend() != "cpu"
    return [slice(0, size)] if vmap else [slice(m, m + 1) for m in range(size)]
