"""Fine-tuning settings (issue 23): ``--pretrained``, ``--freeze``, ``--backbone-lr-scale``,
``--image-size`` and ``--normalize imagenet``.

Kept small: the step-level checks use a ResNet with one block per stage (``depths=(1, 1, 1, 1)``)
on 32x32 images, batch 4; the one trainer run makes ``--model resnet18`` that small by
patching its depth table, and trains one step; every refusal fails before anything compiles.
"""

import hashlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxnets import checkpoints, cli
from jaxnets import data as D
from jaxnets import models as M
from jaxnets import network as nn
from jaxnets import optim, runs, steps
from jaxnets import training as T
from jaxnets.config import TrainConfig
from jaxnets.imagenet import IMAGENET_MEAN, IMAGENET_STD

TINY = (1, 1, 1, 1)


def tiny_resnet(classes=10, conv_impl="auto"):
    return M.ResNet(depths=TINY, classes=classes, input_shape=(32, 32, 3), conv_impl=conv_impl)


def cifar_like(n_train=16, n_test=8, seed=0):
    rng = np.random.default_rng(seed)
    images = lambda n: rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = lambda n: rng.integers(0, 10, n).astype(np.int32)
    return D.Dataset("cifar10", images(n_train), labels(n_train), images(n_test), labels(n_test), 10, "synthetic")


def leaves_equal(a, b):
    return all(bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def without(tree, key):
    return {k: v for k, v in tree.items() if k != key}


# ------------------------------------------------------------------ --freeze, the step


@pytest.mark.parametrize("grad", ["autodiff", "manual"])
def test_freeze_trains_the_head_only_and_keeps_no_backbone_state(grad):
    model = tiny_resnet()
    params, state = model.init(jax.random.key(0))
    state = jax.tree_util.tree_map(lambda a: a + 0.25, state)  # "loaded" statistics, not the init's 0/1
    config = TrainConfig(model="resnet18", dataset="cifar10", pretrained="file.safetensors", freeze=True, grad=grad,
                         optimizer="adam", lr=1e-2, schedule="constant", batch_size=4).validate()
    optimizer = optim.build_optimizer(config, 10, model=model)
    opt_state = optim.with_hparams(optimizer.init(params), optim.hparams_of(config))
    # No optimizer state for the backbone: Adam's two moments of the head, and scalars.
    moment_floats = sum(a.size for a in jax.tree_util.tree_leaves(opt_state) if a.ndim >= 1)
    head_floats = sum(a.size for a in jax.tree_util.tree_leaves(params["fc"]))
    assert moment_floats == 2 * head_floats
    step = jax.jit(steps.make_step(model, optimizer, config))
    rng = np.random.default_rng(1)
    p, s, o = params, state, opt_state
    for i in range(2):
        images = jnp.asarray(rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))
        labels = jnp.asarray(rng.integers(0, 10, 4).astype(np.int32))
        p, s, o, loss, _ = step(p, s, o, images, labels, jax.random.key(i), jnp.full(3, 0.5), jnp.full(3, 0.25),
                                optim.hparams_of(config))
        assert np.isfinite(float(loss))
    assert leaves_equal(without(p, "fc"), without(params, "fc"))  # not a bit of the backbone moved
    assert leaves_equal(s, state)  # its batch norm ran in evaluation mode: statistics as loaded
    assert not bool(jnp.array_equal(p["fc"]["w"], params["fc"]["w"]))  # the head trained


def test_head_only_gradients_agree_between_paths_and_skip_the_backbone():
    model = tiny_resnet(conv_impl="xla")  # XLA's convolutions, to count them in the program
    params, state = model.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    y = jnp.asarray([0, 1, 2, 3])
    probe = nn.HeadOnly(model)
    (la, sa), ga = M.autodiff_value_and_grad(probe, params, state, x, y)
    (lm, sm), gm = M.manual_value_and_grad(probe, params, state, x, y)
    assert abs(float(la - lm)) < 1e-5
    assert jax.tree_util.tree_structure(ga) == jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(gm)
    assert all(not jnp.any(g) for g in jax.tree_util.tree_leaves((without(ga, "fc"), without(gm, "fc"))))
    np.testing.assert_allclose(gm["fc"]["w"], ga["fc"]["w"], rtol=1e-4, atol=1e-6)
    # The same logits as the whole network in evaluation mode (the probe's features are fixed).
    logits, _ = probe.apply(params, state, x, train=True)
    np.testing.assert_allclose(logits, model.apply(params, state, x, train=False)[0], rtol=1e-5, atol=1e-5)
    # No backward through the backbone on the autodiff path: no convolution's transpose in its program.
    text = jax.jit(lambda p: M.autodiff_value_and_grad(probe, p, state, x, y)[1]).lower(params).as_text()
    forward = jax.jit(lambda p: probe.apply(p, state, x, train=True)[0]).lower(params).as_text()
    assert text.count("convolution") == forward.count("convolution")


def test_split_head_of_every_family():
    cases = {"mlp": ("head", ["head"]), "convnet": ("head", [None, "head"]), "resnet18": ("fc", [None, "fc"]),
             "preact_convnet": ("head", [None, None, "head"])}
    for name, (head, items) in cases.items():
        model = M.build(TrainConfig(model=name, dataset="cifar10", conv_plan=(4, "M") if "conv" in name else ()),
                        (32, 32, 3), 10)
        _, part, got = nn.split_head(model.layer)
        assert got == head and [n for n, _ in part.items] == items, name


# ---------------------------------------------------------- --backbone-lr-scale


@pytest.mark.parametrize("optimizer, wd", [("adamw", 0.125), ("nesterov", 0.125), ("adam", 0.0)])
def test_backbone_lr_scale_equals_an_explicit_multi_transform(optimizer, wd):
    model = M.MLP(input_size=12, hidden=(8,), batch_norm=True)
    params, _ = model.init(jax.random.key(0))
    grads = jax.tree_util.tree_map(lambda a: jnp.cos(jnp.arange(a.size, dtype=a.dtype).reshape(a.shape)), params)
    lr, scales = 0.5, (0.125, 1.0, 4.0)

    def reference(scale):
        def one(rate):
            if optimizer == "adamw":
                return optax.adamw(rate, weight_decay=wd, mask=optim.decay_mask)
            sgd = optax.sgd(rate, momentum=0.9, nesterov=True) if optimizer == "nesterov" else optax.adam(rate)
            return optax.chain(optax.add_decayed_weights(wd, mask=optim.decay_mask), sgd) if wd else sgd
        labels = {k: "head" if k == "head" else "backbone" for k in params}
        tx = optax.multi_transform({"backbone": one(lr * scale), "head": one(lr)}, labels)
        state = tx.init(params)
        for _ in range(2):
            updates, state = tx.update(grads, state, params)
        return updates

    configs = [TrainConfig(optimizer=optimizer, lr=lr, momentum=0.9, weight_decay=wd, schedule="constant",
                           backbone_lr_scale=s).validate() for s in scales]
    # One program for all three, each member's factor injected (as a vmapped sweep group runs them).
    tx = optim.build_optimizer(configs[0], 10, model=model, groups=optim.active_groups(configs))
    hps = steps.stack_members([optim.hparams_of(c) for c in configs])

    def member(hp):
        state = optim.with_hparams(tx.init(params), hp)
        for _ in range(2):
            updates, state = tx.update(grads, state, params)
        return updates

    got = jax.vmap(member)(hps)
    for m, scale in enumerate(scales):
        want = reference(scale)
        for a, b in zip(jax.tree_util.tree_leaves(steps.take_member(got, m)), jax.tree_util.tree_leaves(want)):
            np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-9)
    # The head moved by lr whatever the factor; the backbone by lr * factor.
    assert not np.allclose(steps.take_member(got, 0)["blocks"][0]["linear"]["w"],
                           steps.take_member(got, 2)["blocks"][0]["linear"]["w"])
    np.testing.assert_array_equal(steps.take_member(got, 0)["head"]["w"], steps.take_member(got, 2)["head"]["w"])


def test_all_factors_one_is_the_plain_optimizer():
    config = TrainConfig(optimizer="adam").validate()
    assert optim.active_groups([config]) == ()
    params = {"w": jnp.ones(3)}
    state = optim.build_optimizer(config, 10).init(params)
    assert "backbone_lr_scale" not in state.hyperparams  # the state of runs written before groups existed


# ------------------------------------------------- --normalize imagenet, --image-size


def test_imagenet_normalisation_and_the_resized_input():
    data = cifar_like(n_train=20)
    config = TrainConfig(model="resnet18", dataset="cifar10", normalize="imagenet", val_size=4, image_size=40,
                         batch_size=4)
    _, _, mean, std = steps.member_split(data.train_images, data.train_labels, config)
    np.testing.assert_array_equal(mean, IMAGENET_MEAN)
    np.testing.assert_array_equal(std, IMAGENET_STD)
    assert M.build(config, (32, 32, 3), 10).input_shape == (40, 40, 3)
    x = steps.model_input(data.test_images[:2], mean, std, 40)
    want = jax.image.resize(steps.normalize(data.test_images[:2], mean, std), (2, 40, 40, 3), "bilinear")
    np.testing.assert_allclose(x, want, rtol=1e-5, atol=1e-5)
    assert steps.model_input(data.test_images[:2], mean, std, 32).shape == (2, 32, 32, 3)


# -------------------------------------------------------- the trainer, end to end


@pytest.fixture
def tiny_resnet18(monkeypatch):
    """``--model resnet18`` with one block per stage (and the synthetic CIFAR-10 for any load)."""
    monkeypatch.setitem(M.RESNET_DEPTHS, "resnet18", TINY)
    data = cifar_like()
    monkeypatch.setattr(D, "load_dataset", lambda *args, **kwargs: data)
    return data


def run_flags(out, *extra):
    return ["--model", "resnet18", "--dataset", "cifar10", "--batch-size", 4, "--max-steps", 1, "--epochs", 1,
            "--val-size", 0, "--eval-batch-size", 8, "--chunk-steps", 1, "--no-progress", "--compile-cache", "off",
            "--out", out, *extra]


def exit_code(argv):
    try:
        return cli.main([str(a) for a in argv])
    except SystemExit as e:
        return e.code


def test_pretrained_round_trip_with_freeze_resize_and_predict(tiny_resnet18, tmp_path, monkeypatch, capsys):
    source = M.ResNet(depths=TINY, classes=1000, input_shape=(32, 32, 3))
    params, state = source.init(jax.random.key(7))
    state = jax.tree_util.tree_map(lambda a: a * 1.5 + 0.125, state)
    path = M.export_torchvision(params, tmp_path / "weights.safetensors", state=state)
    inits = []
    init_members = T._init_members

    def capture(*args, **kwargs):
        out = init_members(*args, **kwargs)
        inits.append(jax.device_get(out[0][0]))
        return out

    monkeypatch.setattr(T, "_init_members", capture)
    run = tmp_path / "run"
    assert exit_code(run_flags(run, "--pretrained", path, "--freeze", "--grad", "manual", "--image-size", 40,
                               "--normalize", "imagenet")) == 0
    log = capsys.readouterr().out
    assert "the head 'fc' has 1000 classes, the model 10: replaced by a fresh init" in log
    # The init is the file's: every tensor but the replaced head, and the statistics.
    p0, s0, _ = steps.take_member(inits[0], 0)
    assert leaves_equal(without(p0, "fc"), without(params, "fc")) and leaves_equal(s0, state)
    assert p0["fc"]["w"].shape == (512, 10)
    info = json.loads((run / "config.json").read_text())
    assert info["pretrained"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info["pretrained"]["path"] == str(path.resolve()) and info["pretrained"]["classes"] == 1000
    assert info["config"]["pretrained"] == str(path)
    loaded = runs.load_run(run)
    assert loaded.model.input_shape == (40, 40, 3)
    # One step of a linear probe: the backbone and its statistics are still the file's.
    assert leaves_equal(without(loaded.params, "fc"), without(params, "fc")) and leaves_equal(loaded.state, state)
    assert not leaves_equal(loaded.params["fc"], p0["fc"])
    # predict resizes as training and evaluation did: 32x32 images in, the 40x40 network's answer.
    images = tiny_resnet18.test_images[:3]
    logits, _ = loaded.model.apply(loaded.params, loaded.state,
                                   steps.model_input(images, IMAGENET_MEAN, IMAGENET_STD, 40), train=False)
    np.testing.assert_allclose(loaded.predict(images), jax.nn.softmax(logits), rtol=1e-5, atol=1e-6)
    # The trainer's test evaluation resized the same way: its accuracy is predict's.
    summary = json.loads((run / "summary.json").read_text())
    test = tiny_resnet18
    assert np.mean(loaded.predict(test.test_images).argmax(-1) == test.test_labels) == summary["test_accuracy"]


# ------------------------------------------------------------------ bad input


def error_line(capsys):
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip() and not l.startswith("usage:")]
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    """Files --pretrained must refuse, by what the refusal says."""
    root = tmp_path_factory.mktemp("bad")
    files = {}
    garbage = root / "garbage.safetensors"
    garbage.write_bytes(b"\x00not a safetensors header at all")
    files["garbage"] = (garbage, "not a readable safetensors file")
    truncated = root / "truncated.pth"
    truncated.write_bytes(b"PK\x03\x04 truncated")
    files["truncated"] = (truncated, "not a readable PyTorch file")
    r34 = M.ResNet(depths=M.RESNET_DEPTHS["resnet34"], classes=10, input_shape=(32, 32, 3))
    p, s = jax.eval_shape(r34.init, jax.random.key(0))
    zeros = lambda tree: jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype), tree)
    files["resnet34"] = (M.export_torchvision(zeros(p), root / "r34.safetensors", state=zeros(s)),
                         "tensor 'layer1.2.bn1.bias' (64,) is not part of ResNet (another architecture?)")
    r18 = M.ResNet(depths=M.RESNET_DEPTHS["resnet18"], classes=10, input_shape=(32, 32, 3))
    p, s = jax.eval_shape(r18.init, jax.random.key(0))
    tensors = checkpoints.to_torch_state_dict(zeros(p), zeros(s))
    tensors["layer2.0.conv1.weight"] = np.zeros((128, 32, 3, 3), np.float32)
    files["shape"] = (checkpoints.write_state_dict(tensors, root / "shape.safetensors"),
                      "tensor 'layer2.0.conv1.weight' has shape (128, 32, 3, 3), ResNet expects (128, 64, 3, 3)")
    try:
        import torch
    except ImportError:
        return files
    torch.save(torch.nn.Linear(2, 2), root / "module.pth")
    files["module"] = (root / "module.pth", "holds pickled Python objects (torch.nn.modules.linear.Linear), not a "
                                            "state dict")
    return files


@pytest.mark.parametrize("case", ["missing", "garbage", "truncated", "module", "resnet34", "shape"])
@pytest.mark.parametrize("how", ["run", "sweep"])
def test_a_bad_pretrained_file_is_one_line_and_writes_nothing(case, how, bad_files, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(D, "load_dataset", lambda *args, **kwargs: cifar_like())
    monkeypatch.chdir(tmp_path)
    if case == "missing":
        path, says = tmp_path / "none.safetensors", "no such file, and not a known name (efficientnet_lite0)"
    elif case not in bad_files:
        pytest.skip("torch is not installed")
    else:
        path, says = bad_files[case]
    out = tmp_path / "out"
    sweep = ["--sweep", "seed=0,1"] if how == "sweep" else []
    assert exit_code(run_flags(out, "--pretrained", path, *sweep)) == 2
    line = error_line(capsys)
    assert says in line and str(path) in line, line
    assert not out.exists() and not (tmp_path / "runs").exists()


def test_new_head_replaces_a_head_of_the_same_class_count(tmp_path):
    # Pretrained on classes 0-4, trained on 5-9: five classes both times, so the file's head
    # fits and is kept, unless --new-head asks for a fresh one (the rest stays the file's).
    model = tiny_resnet(classes=5)
    params, state = model.init(jax.random.key(7))
    path = M.export_torchvision(params, tmp_path / "five.safetensors", state=state)
    key, said = jax.random.key(1), []
    kept = M.load_pretrained("resnet18", model, str(path), key=key)
    fresh = M.load_pretrained("resnet18", model, str(path), key=key, log=said.append, new_head=True)
    want_head = model.init(key)[0]["fc"]
    for a, b in zip(jax.tree_util.tree_leaves(kept.params["fc"]), jax.tree_util.tree_leaves(params["fc"])):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree_util.tree_leaves(fresh.params["fc"]), jax.tree_util.tree_leaves(want_head)):
        np.testing.assert_array_equal(a, b)
    rest = lambda tree: {k: v for k, v in tree.items() if k != "fc"}
    for a, b in zip(jax.tree_util.tree_leaves(rest(fresh.params)), jax.tree_util.tree_leaves(rest(params))):
        np.testing.assert_array_equal(a, b)
    assert fresh.classes == 5 and len(said) == 1 and "(--new-head)" in said[0]


@pytest.mark.parametrize("args, says", [
    (["--model", "mlp", "--pretrained", "w.safetensors"],
     "--pretrained: --model mlp cannot load checkpoints (the families that can: efficientnet_lite0, resnet18, "
     "resnet34)"),
    (["--freeze"], "--freeze trains the head of a pretrained network only: give --pretrained FILE"),
    (["--new-head"], "--new-head replaces the head of a pretrained network: give --pretrained FILE"),
    (["--pretrained", "w.safetensors", "--freeze", "--backbone-lr-scale", "0.1"],
     "--backbone-lr-scale 0.1 has no effect with --freeze"),
    (["--image-size", "16"], "--image-size 16 is too small for --model resnet18: ResNet: images of 16x16 are "
                             "smaller than the imagenet stem"),
    (["--model", "efficientnet_lite0", "--image-size", "24"], "--image-size 24 is too small for --model "
                                                              "efficientnet_lite0"),
    (["--dataset", "mnist", "--normalize", "imagenet"], "--normalize imagenet is for RGB images; mnist has 1"),
    (["--backbone-lr-scale", "0"], "--backbone-lr-scale must be in (0, inf), got 0.0"),
    (["--pretrained", ""], "--pretrained is empty"),
])
def test_bad_fine_tuning_settings_are_one_line_naming_the_flag(args, says, monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["--model", "resnet18", "--dataset", "cifar10", *args, "--out", tmp_path / "out", "--compile-cache", "off"]
    assert exit_code(argv) == 2
    assert says in error_line(capsys)
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


def test_a_vmapped_group_of_backbone_factors_equals_each_single_run(tmp_path):
    # The factor is per member (an injected hyperparameter): one vmapped program, each
    # member what its own run trains (which has the plain optimizer when its factor is 1).
    rng = np.random.default_rng(3)
    data = D.Dataset("mnist", rng.integers(0, 256, (200, 28, 28, 1), dtype=np.uint8),
                     rng.integers(0, 10, 200).astype(np.int32), rng.integers(0, 256, (20, 28, 28, 1), dtype=np.uint8),
                     rng.integers(0, 10, 20).astype(np.int32), 10, "synthetic")
    base = dict(model="mlp", hidden_units=(16,), dropout=0.0, batch_size=50, epochs=1, val_size=0, progress=False,
                optimizer="adam", lr=1e-2, schedule="constant")
    configs = [TrainConfig(**base, backbone_lr_scale=f, out=str(tmp_path / f"m{f}")) for f in (0.25, 1.0)]
    T.train_group(configs, [c.out for c in configs], dataset=data, vmap=True, log=lambda *a, **k: None)
    # The factor-1 member, in the grouped program, trains as its single run with the plain
    # optimizer (the factor arithmetic itself is checked against multi_transform above).
    single = TrainConfig(**base, out=str(tmp_path / "single"))
    T.train(single, dataset=data, log=lambda *a, **k: None)
    got, want = runs.load_run(configs[1].out).params, runs.load_run(single.out).params
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    slow = runs.load_run(configs[0].out).params
    assert not np.allclose(slow["blocks"][0]["linear"]["w"], got["blocks"][0]["linear"]["w"])  # the backbone at 0.25x
    assert not np.allclose(slow["head"]["w"], got["head"]["w"])  # (and the head, fed other features)


def test_the_documented_efficientnet_command_fits_a_small_machine():
    """docs/training.md's EfficientNet fine-tune must not be refused by the trainer's memory
    check on a machine with 8 GiB free (it was: the default --eval-batch-size 1000 at 128 px
    is estimated at ~58 GiB, so the command as written stopped with 'the run needs about')."""
    import re
    import shlex

    from jaxnets import cost

    text = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    command = next(c for c in re.findall(r"python train\.py (.*?)(?:\n(?!\s)|$)", text.replace("\\\n", " "), re.S)
                   if "efficientnet_lite0" in c)
    args = [a for a in shlex.split(command) if a]
    config = cli.config_from_args(cli.build_parser().parse_args(args))
    model = M.build(config, (32, 32, 3), 10)
    parts = cost.memory_parts(model, **steps.memory_settings(config))
    assert sum(parts.values()) < 8 * 2**30, (command, {k: v / 2**30 for k, v in parts.items()})
