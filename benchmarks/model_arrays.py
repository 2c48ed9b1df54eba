"""Save, or compare against, the arrays a set of models computes: a bit-for-bit check that a
refactor of the models changed no number.

    python -m benchmarks.model_arrays save /tmp/before.npz     # on the old code
    python -m benchmarks.model_arrays compare /tmp/before.npz  # on the new code
    python -m benchmarks.model_arrays programs /tmp/before.json   # old code: the step programs' optimized HLO
    python -m benchmarks.model_arrays programs /tmp/before.json --compare  # new code: the same programs?

For each model: the init (params and state), the train- and eval-mode logits and new state,
and both gradient paths' loss, new state and gradients, each jitted as the trainer runs them.
``compare`` prints the number of arrays compared and every array that differs (exit 1).
"""

import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxnets import models as M

CASES = {
    "mlp-relu-dropout": (M.MLP(input_size=3072, hidden=(64, 32), dropout=0.2), (8, 32, 32, 3)),
    "mlp-tanh-bn-pytorch": (M.MLP(input_size=784, hidden=(40, 20, 10), activation="tanh", batch_norm=True,
                                  init_scheme="pytorch"), (8, 28, 28, 1)),
    "mlp-logreg": (M.MLP(input_size=784, hidden=()), (8, 784)),
    "mlp-elu-bn-dropout-course": (M.MLP(input_size=100, hidden=(30,), activation="elu", batch_norm=True,
                                        dropout=0.3, init_scheme="course"), (8, 100)),
    "convnet-course": (M.ConvNet(), (4, 32, 32, 3)),
    "convnet-plan-mnist": (M.ConvNet(input_shape=(28, 28, 1), plan=(8, "M", 16, 16, "M")), (4, 28, 28, 1)),
    "preact-plan": (M.ConvNet(plan=(8, 8, "M", 16, "M", 16), preact=True), (4, 32, 32, 3)),
    "preact-course-lecun": (M.ConvNet(preact=True, init_scheme="lecun"), (2, 32, 32, 3)),
}


def arrays(name, model, shape):
    out = {}
    params, state = model.init(jax.random.PRNGKey(7))
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    y = jnp.asarray(rng.integers(0, model.classes, shape[0]), jnp.int32)
    key = jax.random.PRNGKey(11)
    results = {"init": (params, state)}
    for train in (True, False):
        results[f"apply-train{train}"] = jax.jit(
            lambda p, s, x: model.apply(p, s, x, train=train, key=key))(params, state, x)
    kw = dict(key=key, label_smoothing=0.1, l2=1e-3)
    for path, fn in M.GRADIENT_PATHS.items():
        results[path] = jax.jit(lambda p, s, x, y: fn(model, p, s, x, y, **kw))(params, state, x, y)
    for part, tree in results.items():
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            out[f"{name}/{part}/{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
    return out


PROGRAM_CASES = {"mlp": (M.MLP(input_size=3072, hidden=(512, 512), dropout=0.2), (200, 32, 32, 3)),
                 "convnet": (M.ConvNet(), (128, 32, 32, 3))}


def programs():
    """The optimized XLA program of each gradient path on the benchmark models (course
    ConvNet at batch 128, MLP at 200), metadata (source lines) stripped: the same text is
    the same computation, and so the same speed, whatever the Python that traced it."""
    import hashlib
    import re

    out = {}
    for name, (model, shape) in PROGRAM_CASES.items():
        params, state = jax.eval_shape(model.init, jax.random.PRNGKey(0))
        x = jax.ShapeDtypeStruct(shape, jnp.float32)
        y = jax.ShapeDtypeStruct(shape[:1], jnp.int32)
        key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
        for path, fn in M.GRADIENT_PATHS.items():
            step = jax.jit(lambda p, s, x, y, k: fn(model, p, s, x, y, key=k, label_smoothing=0.1))
            text = step.lower(params, state, x, y, key).compile().as_text()
            text = re.sub(r", metadata=\{[^}]*\}", "", text)
            # The tables of source files, functions and stack frames that metadata pointed into.
            text = re.sub(r"\n(FileNames|FunctionNames|FileLocations|StackFrames)\n(.+\n)*", "\n", text)
            text = re.sub(r"^HloModule \S+", "HloModule", text, flags=re.M)
            # Instruction names come from the Python functions that traced them: number them
            # by first appearance, so the text compares the computation alone.
            names = {}
            text = re.sub(r"%[\w.-]+", lambda m: names.setdefault(m.group(0), f"%v{len(names)}"), text)
            out[f"{name}/{path}"] = hashlib.sha256(text.encode()).hexdigest()
            if os.environ.get("MODEL_ARRAYS_DUMP"):
                Path(os.environ["MODEL_ARRAYS_DUMP"], f"{name}-{path}.hlo").write_text(text)
    return out


def main(argv):
    if argv and argv[0] == "programs":
        import json

        got = programs()
        if "--compare" not in argv:
            with open(argv[1], "w") as f:
                json.dump(got, f, indent=1)
            print(f"saved {len(got)} program digests to {argv[1]}")
            return 0
        with open(argv[1]) as f:
            want = json.load(f)
        same = [k for k in want if got.get(k) == want[k]]
        for k in want:
            print(f"{k}: {'same program' if k in same else 'DIFFERENT program'}")
        return 0 if len(same) == len(want) == len(got) else 1
    mode, path = argv
    got = {}
    for name, (model, shape) in CASES.items():
        got.update(arrays(name, model, shape))
    if mode == "save":
        np.savez(path, **got)
        print(f"saved {len(got)} arrays to {path}")
        return 0
    want = dict(np.load(path))
    bad = sorted(set(want) ^ set(got))
    bad += [k for k in sorted(set(want) & set(got)) if want[k].shape != got[k].shape
            or want[k].dtype != got[k].dtype or not np.array_equal(want[k], got[k], equal_nan=True)]
    for k in bad:
        print("differs:", k)
    print(f"{len(want)} arrays compared, {len(bad)} differ")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
