"""Member scheduling (MemberBlocks) and the epoch-order program, on their own."""

import threading

import jax
import numpy as np

from jaxnets import placement


def test_member_blocks_split_the_members():
    assert placement.member_blocks(3, vmap=True) == [slice(0, 3)]
    assert placement.member_blocks(3, vmap=False) == [slice(0, 1), slice(1, 2), slice(2, 3)]
    assert placement.member_blocks(2) == placement.member_blocks(2, vmap=jax.default_backend() != "cpu")


def test_scheduler_runs_each_block_once_and_a_new_program_alone_first():
    blocks = placement.MemberBlocks(4, vmap=False, put=lambda x: x)
    assert [blocks.block_of[m] for m in range(4)] == [(0, 0), (1, 0), (2, 0), (3, 0)]
    calls, lock, running, overlap = [], threading.Lock(), [0], []

    def fn(k):
        with lock:
            running[0] += 1
            overlap.append(running[0])
            calls.append(k)
        threading.Event().wait(0.05)
        with lock:
            running[0] -= 1
        return 10 * k

    alive = np.array([True, False, True, True])
    got = blocks.run(fn, blocks.with_members(alive), "chunk")
    assert got == {0: 0, 2: 20, 3: 30} and sorted(calls) == [0, 2, 3]
    assert calls[0] == 0 and overlap[0] == 1  # the program's first call ran alone (one compile)
    assert max(overlap) <= placement.CONCURRENT_BLOCKS
    calls.clear()
    blocks.run(fn, [1, 2], "chunk")  # compiled already: no call alone first
    assert sorted(calls) == [1, 2]
    filled = blocks.gather({0: np.array([1.0]), 2: np.array([3.0])}, lambda b: np.full(b.stop - b.start, np.nan))
    assert np.array_equal(filled, [1.0, np.nan, 3.0, np.nan], equal_nan=True)
    assert np.array_equal(blocks.part(np.arange(4) * 2, 2), [4])
    blocks.close()


def test_epoch_order_is_a_permutation_of_the_training_rows_new_each_epoch():
    key = jax.random.key(0)
    rows = np.array([5, 9, 2, 7, 11, 3], np.int32)
    order0, key0 = placement.epoch_inputs(key, rows, 0)
    order1, key1 = placement.epoch_inputs(key, rows, 1)
    assert sorted(np.asarray(order0)) == sorted(rows) == sorted(np.asarray(order1))
    assert not np.array_equal(order0, order1)
    assert not np.array_equal(jax.random.key_data(key0), jax.random.key_data(key1))
    again, _ = placement.epoch_inputs(key, rows, 0)
    assert np.array_equal(order0, again)
