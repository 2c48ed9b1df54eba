"""Mutation score: plant one deliberate bug at a time in a scratch copy and check the tests catch it.

Each mutation is ``(name, file, old text, new text, test node ids)``: the old text must occur
exactly once in the file (otherwise the mutation is *stale*, reported as such, never
silently passed), the copy gets the new text, and the named tests run there against the
mutated ``jaxnets``. A mutation is *caught* when those tests fail, *survived* when they
pass. The unmutated copy runs the same tests first (the baseline): a test that fails there
would catch everything and prove nothing, so the script stops.

Not part of the CI suite (pytest does not collect this file: its name does not start with
``test_``). Run from the repository root::

    python tests/mutants.py              # every mutation, one at a time
    python tests/mutants.py -j 2         # two at a time (each pytest uses both cores anyway)
    python tests/mutants.py --list       # names, files and tests
    python tests/mutants.py --only nesterov_is_momentum --only selu_scale
    python tests/mutants.py --head       # the committed tree (git archive HEAD), not the work tree

The copies go to ``/tmp/mutants/<n>-<name>`` (``--scratch``) and are removed afterwards
unless ``--keep``. Inside a copy the tests run with ``PYTHONPATH`` set to the copy and the
editable install's import hook removed, and the run checks that every ``jaxnets`` module
it loaded came from the copy.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str
    new: str
    tests: tuple
    area: str


def m(area, name, file, old, new, *tests):
    return Mutation(name, file, old, new, tuple(tests), area)


DEF = "tests/test_definitions.py::"
OPT = "tests/test_optim.py::"

MUTATIONS = [
    # ------------------------------------------------------------- normalisation
    m("normalisation", "norm_stats_include_validation", "jaxnets/steps.py",
      "mean, std = D.normalization_stats(train_x, exclude=val_idx)",
      "mean, std = D.normalization_stats(train_x)",
      DEF + "test_member_split_statistics_are_those_of_the_training_rows"),
    m("normalisation", "normalize_times_std", "jaxnets/steps.py",
      "return (images_u8.astype(jnp.float32) / 255.0 - mean) / std",
      "return (images_u8.astype(jnp.float32) / 255.0 - mean) * std",
      DEF + "test_normalize_subtracts_the_mean_and_divides_by_the_std",
      DEF + "test_training_steps_follow_the_definition"),
    m("normalisation", "mean_image_std_not_undone", "jaxnets/steps.py",
      "std = np.full((), 1.0 / 255.0, np.float32)",
      "std = np.full((), 1.0, np.float32)",
      DEF + "test_member_split_statistics_are_those_of_the_training_rows"),
    # ---------------------------------------------------------------------- keys
    m("keys", "same_key_every_step", "jaxnets/steps.py",
      "jax.random.fold_in(epoch_key, i)",
      "epoch_key",
      DEF + "test_every_step_draws_new_masks_and_crops_and_a_key_repeats_them"),
    m("keys", "same_key_every_epoch", "jaxnets/placement.py",
      "perm_key, epoch_key = jax.random.split(jax.random.fold_in(run_key, epoch))",
      "perm_key, epoch_key = jax.random.split(run_key)",
      DEF + "test_each_epoch_draws_new_masks_and_crops"),
    m("keys", "same_dropout_key_every_layer", "jaxnets/network.py",
      "return ctx._replace(key=_fold(ctx.key, i))",
      "return ctx",
      DEF + "test_each_layer_draws_its_own_dropout_mask"),
    # ---------------------------------------------------------------- optimizers
    m("optimizers", "nesterov_is_momentum", "jaxnets/optim.py",
      "optax.sgd(learning_rate, momentum=momentum, nesterov=True)",
      "optax.sgd(learning_rate, momentum=momentum)",
      OPT + "test_nesterov_is_not_plain_momentum", OPT + "test_optimizer_updates_follow_their_formulas"),
    m("optimizers", "momentum_setting_ignored", "jaxnets/optim.py",
      '"momentum": lambda: optax.sgd(learning_rate, momentum=momentum),',
      '"momentum": lambda: optax.sgd(learning_rate, momentum=0.9),',
      OPT + "test_optimizer_updates_follow_their_formulas"),
    m("optimizers", "rmsprop_pytorch_decay", "jaxnets/optim.py",
      '"rmsprop": lambda: optax.rmsprop(learning_rate),',
      '"rmsprop": lambda: optax.rmsprop(learning_rate, decay=0.99),',
      OPT + "test_optimizer_updates_follow_their_formulas"),
    m("optimizers", "adagrad_accumulator_from_zero", "jaxnets/optim.py",
      '"adagrad": lambda: optax.adagrad(learning_rate),',
      '"adagrad": lambda: optax.adagrad(learning_rate, initial_accumulator_value=0.0),',
      OPT + "test_optimizer_updates_follow_their_formulas"),
    m("optimizers", "adamw_decays_every_leaf", "jaxnets/optim.py",
      "optax.adamw(learning_rate, weight_decay=weight_decay, mask=decay_mask)",
      "optax.adamw(learning_rate, weight_decay=weight_decay)",
      OPT + "test_optimizer_updates_follow_their_formulas"),
    m("optimizers", "l2_decays_every_leaf", "jaxnets/optim.py",
      "optax.add_decayed_weights(weight_decay, mask=decay_mask)",
      "optax.add_decayed_weights(weight_decay)",
      OPT + "test_optimizer_updates_follow_their_formulas"),
    m("optimizers", "decay_mask_includes_biases", "jaxnets/optim.py",
      'getattr(path[-1], "key", None) == "w"',
      'getattr(path[-1], "key", None) in ("w", "b")',
      OPT + "test_decay_mask_marks_exactly_the_weight_matrices_and_kernels"),
    # ----------------------------------------------------------------- schedules
    m("schedules", "cosine_ignores_warmup_length", "jaxnets/optim.py",
      "optax.cosine_decay_schedule(1.0, max(total_steps - warmup, 1))",
      "optax.cosine_decay_schedule(1.0, total_steps)",
      OPT + "test_schedule_multiplier_at_every_step"),
    m("schedules", "step_boundaries_shifted_by_warmup", "jaxnets/optim.py",
      "{int(total_steps * 0.5) - warmup: 0.1, int(total_steps * 0.75) - warmup: 0.1}",
      "{int(total_steps * 0.5): 0.1, int(total_steps * 0.75): 0.1}",
      OPT + "test_schedule_multiplier_at_every_step"),
    m("schedules", "onecycle_peak_at_25_percent", "jaxnets/optim.py",
      "optax.cosine_onecycle_schedule(total_steps, 1.0)",
      "optax.cosine_onecycle_schedule(total_steps, 1.0, pct_start=0.25)",
      OPT + "test_schedule_multiplier_at_every_step"),
    m("schedules", "max_steps_not_passed_to_the_schedule", "jaxnets/training.py",
      "optimizer = build_optimizer(base, total_steps,",
      "optimizer = build_optimizer(base, steps_per_epoch * base.epochs,",
      OPT + "test_cosine_with_max_steps_decays_over_the_max_steps"),
    m("schedules", "warmup_counted_from_total_steps_over_epochs", "jaxnets/training.py",
      "optimizer = build_optimizer(base, total_steps, steps_per_epoch=steps_per_epoch,",
      "optimizer = build_optimizer(base, total_steps,",
      OPT + "test_warmup_with_max_steps_lasts_warmup_epochs_of_steps"),
    # -------------------------------------------------------------------- layers
    m("layers", "selu_scale_one", "jaxnets/layers.py",
      "SELU_SCALE = 1.0507009873554805",
      "SELU_SCALE = 1.0",
      DEF + "test_selu_uses_the_published_constants", DEF + "test_activation_forwards_equal_jax_nn"),
    m("layers", "leaky_relu_slope", "jaxnets/layers.py",
      "def leaky_relu(x, *, negative_slope=0.01):",
      "def leaky_relu(x, *, negative_slope=0.1):",
      DEF + "test_activation_forwards_equal_jax_nn"),
    m("layers", "label_smoothing_other_convention", "jaxnets/layers.py",
      "targets = (1 - label_smoothing) * targets + label_smoothing / classes",
      "targets = (1 - label_smoothing) * targets + label_smoothing / (classes - 1) * (1 - targets)",
      DEF + "test_label_smoothing_is_optax_smooth_labels"),
    m("layers", "bn_running_variance_biased", "jaxnets/layers.py",
      "unbiased = var * (count / (count - 1))",
      "unbiased = var",
      "tests/test_layers.py::test_batch_norm_statistics_and_running_update",
      DEF + "test_training_steps_follow_the_definition"),
    m("layers", "kaiming_std_of_lecun", "jaxnets/layers.py",
      '"kaiming": math.sqrt(2.0 / fan_in)',
      '"kaiming": math.sqrt(1.0 / fan_in)',
      "tests/test_layers.py::test_init_scales"),
    m("layers", "dropout_not_rescaled", "jaxnets/layers.py",
      "scale = jnp.where(keep, 1.0 / (1.0 - rate), 0.0).astype(x.dtype)",
      "scale = jnp.where(keep, 1.0, 0.0).astype(x.dtype)",
      "tests/test_layers.py::test_dropout_keep_rate_scale_and_eval_identity"),
    m("layers", "cross_entropy_gradient_not_batch_mean", "jaxnets/layers.py",
      "return dloss * (probs - targets) / probs.shape[0]",
      "return dloss * (probs - targets)",
      "tests/test_layers.py::test_softmax_cross_entropy"),
    # ----------------------------------------------------------- train step, eval
    m("steps", "bn_running_state_dropped", "jaxnets/steps.py",
      "return params, new_state, opt_state, loss, correct",
      "return params, state, opt_state, loss, correct",
      DEF + "test_training_steps_follow_the_definition"),
    m("steps", "eval_with_batch_statistics", "jaxnets/steps.py",
      "logits, _ = model.apply(params, state, model_input(x, mean, std, image_size), train=False)",
      "logits, _ = model.apply(params, state, model_input(x, mean, std, image_size), train=True)",
      DEF + "test_evaluation_uses_the_running_batch_norm_statistics"),
    m("steps", "eval_counts_padding_rows", "jaxnets/steps.py",
      "valid = jnp.arange(batches * batch_size) < n",
      "valid = jnp.arange(batches * batch_size) < batches * batch_size",
      DEF + "test_evaluation_uses_the_running_batch_norm_statistics"),
    m("steps", "train_accuracy_from_eval_mode_logits", "jaxnets/steps.py",
      "logits, _ = model.apply(params, state, x, train=True, key=dropout_key, **extra)",
      "logits, _ = model.apply(params, state, x, train=False, key=dropout_key, **extra)",
      DEF + "test_training_steps_follow_the_definition"),
    m("steps", "validation_scored_on_training_rows", "jaxnets/placement.py",
      'self.evaluate_fn(params, state, self.images, self.labels, x["val_idx"], x["means"], x["stds"])',
      'self.evaluate_fn(params, state, self.images, self.labels, x["train_idx"], x["means"], x["stds"])',
      DEF + "test_mnist_run_clears_its_threshold_and_reports_its_own_figures"),
    m("steps", "test_set_not_normalised", "jaxnets/placement.py",
      'self.evaluate_fn(params, state, *self.test_set, None, x["means"], x["stds"])',
      'self.evaluate_fn(params, state, *self.test_set, None, x["means"] * 0, x["stds"] * 0 + 1)',
      DEF + "test_mnist_run_clears_its_threshold_and_reports_its_own_figures"),
    m("steps", "max_steps_run_one_epoch_short", "jaxnets/training.py",
      "epochs = math.ceil(total_steps / steps_per_epoch)",
      "epochs = total_steps // steps_per_epoch - 1",
      OPT + "test_cosine_with_max_steps_decays_over_the_max_steps"),
    m("steps", "labels_not_permuted_with_images", "jaxnets/steps.py",
      "x, y = images[idx], labels[idx]",
      "x, y = images[idx], labels[i * batch + jnp.arange(batch)]",
      DEF + "test_mnist_run_clears_its_threshold_and_reports_its_own_figures"),
    # -------------------------------------------------------------------- models
    m("models", "preact_skip_dropped", "jaxnets/network.py",
      "return shortcut + ys[0], tuple(caches), new_state",
      "return ys[0], tuple(caches), new_state",
      "tests/test_models.py::test_convnet_gradcheck"),
    m("models", "mlp_backward_skips_dropout", "jaxnets/network.py",
      "return {}, layer_ops.dropout_backward(cache, dy)",
      "return {}, dy",
      "tests/test_models.py::test_mlp_manual_matches_autodiff_float64"),
    m("models", "residual_backward_drops_shortcut", "jaxnets/network.py",
      "return grads, d_shortcut + dxs[0]",
      "return grads, dxs[0]",
      "tests/test_network.py::test_residual_backward_is_the_sum_of_both_paths"),
    m("models", "serial_backward_in_forward_order", "jaxnets/network.py",
      "for i in reversed(range(len(self.items))):",
      "for i in range(len(self.items)):",
      "tests/test_network.py::test_residual_blocks_identity_and_projection"),
    # ---------------------------------------------------------------------- conv
    m("conv", "winograd_filter_transform_sign", "jaxnets/_cpu_conv.py",
      "_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))",
      "_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, -0.5), (0.0, 0.0, 1.0))",
      "tests/test_conv.py::test_impls_agree_float32"),
    m("conv", "gemm_backward_window_transposed", "jaxnets/conv.py",
      "term = _unslice(piece, i, j, s_hw, padded_hw)",
      "term = _unslice(piece, j, i, s_hw, padded_hw)",
      "tests/test_conv.py::test_conv2d_backward_matches_vjp_and_fd"),
    m("conv", "max_pool_pads_with_zero", "jaxnets/conv.py",
      "pieces = _slices(_pad(x, pads, -jnp.inf), k_hw, s_hw, out_hw)",
      "pieces = _slices(_pad(x, pads, 0.0), k_hw, s_hw, out_hw)",
      "tests/test_conv.py::test_max_pool_against_definition_with_nan_and_ties"),
    # ---------------------------------------------------------------------- data
    m("data", "cifar_rows_read_as_interleaved", "jaxnets/data.py",
      "data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)",
      "data.reshape(-1, 32, 32, 3)",
      "tests/test_data.py::test_cifar10_synthetic_dir_layout"),
    m("data", "normalization_std_of_uncentred_values", "jaxnets/data.py",
      "var = np.maximum(total_sq.reshape(-1, c).sum(axis=0) / count - mean * mean, 0.0)",
      "var = np.maximum(total_sq.reshape(-1, c).sum(axis=0) / count, 0.0)",
      DEF + "test_member_split_statistics_are_those_of_the_training_rows"),
    m("data", "validation_row_leaks_into_training", "jaxnets/data.py",
      "train_idx = np.sort(perm[val_size:])",
      "train_idx = np.sort(perm[max(val_size - 1, 0):])",
      "tests/test_data.py::test_split_validation_deterministic_and_disjoint",
      DEF + "test_member_split_statistics_are_those_of_the_training_rows"),
    # -------------------------------------------------------------------- resume
    m("resume", "resume_resets_the_optimizer_state", "jaxnets/runs.py",
      '    restored["key"] = jax.random.wrap_key_data(jnp.asarray(restored["key"]))\n',
      '    restored["opt_state"] = opt_state\n'
      '    restored["key"] = jax.random.wrap_key_data(jnp.asarray(restored["key"]))\n',
      "tests/test_training.py::test_resume_after_interrupt_matches_uninterrupted_run"),
    m("resume", "resume_resets_batch_norm_statistics", "jaxnets/runs.py",
      '    restored["key"] = jax.random.wrap_key_data(jnp.asarray(restored["key"]))\n',
      '    restored["state"] = state\n'
      '    restored["key"] = jax.random.wrap_key_data(jnp.asarray(restored["key"]))\n',
      "tests/test_training.py::test_resume_after_interrupt_matches_uninterrupted_run"),
    m("resume", "checkpoint_labelled_an_epoch_early", "jaxnets/training.py",
      'loop.host_keys[m], record["epoch"], mean=means[m],',
      'loop.host_keys[m], record["epoch"] - 1, mean=means[m],',
      "tests/test_training.py::test_resume_after_interrupt_matches_uninterrupted_run"),
    # -------------------------------------------------------------------- sweeps
    m("sweeps", "members_share_the_first_members_hyperparameters", "jaxnets/training.py",
      "stack_members([hparams_of(c) for c in configs])",
      "stack_members([hparams_of(configs[0]) for c in configs])",
      "tests/test_sweep.py::test_each_member_reproduces_its_single_run[default]"),
    m("sweeps", "members_share_the_first_members_split", "jaxnets/training.py",
      "zip(*(splits[c.seed] for c in configs))",
      "zip(*(splits[configs[0].seed] for c in configs))",
      "tests/test_sweep.py::test_each_member_reproduces_its_single_run[default]"),
    m("sweeps", "cpu_members_vmapped_by_default", "jaxnets/placement.py",
      'vmap = jax.default_backend() != "cpu"',
      "vmap = True",
      "tests/test_sweep.py::test_each_member_reproduces_its_single_run[default]"),
    m("sweeps", "table_ranked_by_test_accuracy", "jaxnets/sweep.py",
      'acc = row["best_val_accuracy"]',
      'acc = row["test_accuracy"]',
      DEF + "test_sweep_table_ranks_by_validation_accuracy_never_test"),
    # ----------------------------------------------------------------- parallel
    m("parallel", "gradients_summed_over_devices", "jaxnets/steps.py",
      "grads, loss, new_state = jax.lax.pmean((grads, loss, new_state), axis_name)",
      "grads, loss, new_state = jax.lax.psum((grads, loss, new_state), axis_name)",
      "tests/test_parallel.py::test_data_parallel_step_equals_single_device"),
    m("parallel", "every_device_same_crop_rows", "jaxnets/steps.py",
      "jax.lax.dynamic_slice_in_dim(a, jax.lax.axis_index(axis_name) * b, b)",
      "jax.lax.dynamic_slice_in_dim(a, 0 * b, b)",
      "tests/test_parallel.py::test_data_parallel_dropout_and_augmentation_equal_single_device"),
    m("parallel", "sync_bn_variance_per_device", "jaxnets/layers.py",
      "var = jax.lax.pmean(var, axis_name)",
      "var = var",
      "tests/test_parallel.py::test_data_parallel_step_equals_single_device"),
    m("parallel", "every_device_same_dropout_rows", "jaxnets/layers.py",
      "offset = jax.lax.axis_index(axis_name).astype(jnp.uint32) * jnp.uint32(math.prod(x.shape) % 2**32)",
      "offset = jnp.uint32(0)",
      "tests/test_parallel.py::test_data_parallel_dropout_and_augmentation_equal_single_device"),
]


# ------------------------------------------------------------------------ machinery

# Runs pytest with the editable install's import hook removed (so ``jaxnets`` can only come
# from PYTHONPATH, the scratch copy), then checks where every loaded jaxnets module came from.
RUNNER = """
import sys, os, pytest
sys.meta_path[:] = [f for f in sys.meta_path if not str(getattr(f, "__module__", "")).startswith("__editable__")]
here = os.path.realpath(os.getcwd())
code = pytest.main(sys.argv[1:])
outside = sorted(name for name, mod in list(sys.modules.items())
                 if (name == "jaxnets" or name.startswith("jaxnets.")) and getattr(mod, "__file__", None)
                 and not os.path.realpath(mod.__file__).startswith(here + os.sep))
if outside:
    print("IMPORT LEAK: modules loaded from outside the scratch copy: " + ", ".join(outside))
    sys.exit(99)
sys.exit(code)
"""


def source_files(head: bool):
    """``{path: bytes}`` of the repository: the work tree's tracked and untracked-but-not-ignored
    files, or (``head``) the committed tree."""
    if head:
        blob = subprocess.run(["git", "archive", "--format=tar", "HEAD"], cwd=ROOT, check=True,
                              capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
            return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True).stdout.decode().split("\0")
    return {n: (ROOT / n).read_bytes() for n in names if n and (ROOT / n).is_file()}


def write_copy(files, where: Path):
    if where.exists():
        shutil.rmtree(where)
    for name, data in files.items():
        path = where / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def stale_reason(files, mutation):
    """Why the mutation cannot be applied (None if it can): its file or exact text is gone, or
    the mutated file would not even compile (a syntax error is no semantic bug)."""
    if mutation.file not in files:
        return f"{mutation.file} does not exist"
    source = files[mutation.file].decode()
    count = source.count(mutation.old)
    if count != 1:
        return f"old text found {count} times in {mutation.file} (expected exactly once)"
    if mutation.file.endswith(".py"):
        try:
            compile(source.replace(mutation.old, mutation.new), mutation.file, "exec")
        except SyntaxError as e:
            return f"the mutated {mutation.file} does not compile ({e.msg}, line {e.lineno})"
    return None


def run_tests(where: Path, tests, timeout):
    # COLUMNS: pytest cuts the short summary's messages at the terminal width.
    env = {**os.environ, "PYTHONPATH": str(where), "PYTHONDONTWRITEBYTECODE": "1", "COLUMNS": "250"}
    env.setdefault("JAXNETS_SHARED_DATA", str(ROOT.parent / "shared" / "data"))
    cmd = [sys.executable, "-c", RUNNER, "-x", "-q", "-p", "no:cacheprovider", "--no-header", *tests]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=where, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", "", time.time() - t0
    return proc.returncode, proc.stdout + proc.stderr, time.time() - t0


def failed_tests(output):
    """The failing tests of pytest's short summary, each with the start of its message (so a
    reader can tell an assertion about the numbers from a crash)."""
    return [line[len("FAILED "):][:160] for line in output.splitlines() if line.startswith("FAILED ")]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--only", action="append", metavar="NAME", help="run only this mutation (repeatable)")
    parser.add_argument("-j", "--jobs", type=int, default=1, help="mutations run at once (default 1)")
    parser.add_argument("--head", action="store_true", help="mutate the committed tree instead of the work tree")
    parser.add_argument("--scratch", default="/tmp/mutants", help="where the copies go (default /tmp/mutants)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copies")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per pytest run (default 900)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip running the tests on the unmutated copy first")
    args = parser.parse_args(argv)

    mutations = MUTATIONS
    if args.only:
        unknown = sorted(set(args.only) - {mu.name for mu in MUTATIONS})
        if unknown:
            parser.error(f"--only: no mutation named {', '.join(unknown)} (see --list)")
        mutations = [mu for mu in MUTATIONS if mu.name in args.only]
    files = source_files(args.head)
    stale = {mu.name: stale_reason(files, mu) for mu in mutations}
    if args.list:
        for mu in mutations:
            print(f"{mu.name:40s} {mu.area:14s} {mu.file}{'  STALE: ' + stale[mu.name] if stale[mu.name] else ''}")
            print(f"{'':40s} tests: {' '.join(mu.tests)}")
        print(f"{len(mutations)} mutations, {sum(map(bool, stale.values()))} stale")
        return 0

    scratch = Path(args.scratch)
    runnable = [mu for mu in mutations if stale[mu.name] is None]

    if not args.no_baseline and runnable:
        tests = sorted({t for mu in runnable for t in mu.tests})
        where = scratch / "baseline"
        write_copy(files, where)
        print(f"baseline: {len(tests)} test ids on the unmutated copy ...", flush=True)
        code, output, seconds = run_tests(where, tests, args.timeout * 2)
        if code != 0:
            print(output[-4000:])
            print(f"baseline FAILED (exit {code}, {seconds:.0f} s): fix the tests before scoring mutations")
            return 2
        print(f"baseline passes ({seconds:.0f} s)", flush=True)
        if not args.keep:
            shutil.rmtree(where)

    def one(index_mutation):
        index, mu = index_mutation
        where = scratch / f"{index:02d}-{mu.name}"
        mutated = dict(files)
        mutated[mu.file] = files[mu.file].decode().replace(mu.old, mu.new).encode()
        write_copy(mutated, where)
        code, output, seconds = run_tests(where, list(mu.tests), args.timeout)
        if not args.keep:
            shutil.rmtree(where, ignore_errors=True)
        if code == 1:
            verdict = "caught"
        elif code == 0:
            verdict = "SURVIVED"
        elif code == "timeout":
            verdict = "caught (timeout)"
        else:
            verdict = f"ERROR (pytest exit {code})"
        return mu, verdict, output, seconds

    results = {}
    for mu in mutations:
        if stale[mu.name]:
            results[mu.name] = "STALE"
            print(f"{mu.name}: STALE mutation: {stale[mu.name]}", flush=True)
    numbered = [(i, mu) for i, mu in enumerate(mutations, 1) if stale[mu.name] is None]
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        for mu, verdict, output, seconds in pool.map(one, numbered):
            results[mu.name] = verdict
            detail = ", ".join(failed_tests(output)) if verdict.startswith("caught") else ""
            print(f"{mu.name}: {verdict} ({seconds:.0f} s){' by ' + detail if detail else ''}", flush=True)
            if verdict.startswith("ERROR"):
                print("    " + "\n    ".join(output.strip().splitlines()[-15:]), flush=True)

    caught = sum(v.startswith("caught") for v in results.values())
    print(f"\n{caught} of {len(mutations)} caught")
    for label in ("SURVIVED", "STALE", "ERROR"):
        names = [n for n, v in results.items() if v.startswith(label)]
        if names:
            print(f"{label.lower()}: {', '.join(names)}")
    return 0 if caught == len(mutations) else 1


if __name__ == "__main__":
    sys.exit(main())
