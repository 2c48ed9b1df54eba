"""ResNet-18/34 against PyTorch: torchvision-named state dicts in (.pth and .safetensors) and
out, logits, batch-norm statistics and gradients equal; bad checkpoints refused by name.

torchvision itself cannot be installed beside the project's CPU torch (its PyPI wheels need
another torch build), so :class:`benchmarks.torch_twins.TorchResNet` (shared with the CPU
benchmark) is torchvision's ``resnet18``/``resnet34`` written out from ``torch.nn`` with
torchvision's module names and layout (BasicBlock, ``downsample`` = 1x1 conv + BN, ``avgpool``,
``fc``); a CIFAR stem swaps conv1 for a 3x3/1 conv and drops the max pool."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import jaxnets
from jaxnets import checkpoints as K
from jaxnets import models as M
from jaxnets.gradcheck import rel_error

torch = pytest.importorskip("torch", reason="the PyTorch comparison needs torch (pip install 'jaxnets[torch]')")
tnn = torch.nn
from benchmarks.torch_twins import TorchResNet  # noqa: E402 -- needs torch, checked above


def torch_model(depths, classes, stem, seed=0):
    torch.manual_seed(seed)
    net = TorchResNet(depths, classes, stem)
    with torch.no_grad():  # statistics and affine parameters away from their init, so they matter
        for m in net.modules():
            if isinstance(m, tnn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 1.5)
    return net


def as_numpy(state_dict):
    return {k: v.detach().numpy().copy() for k, v in state_dict.items()}


CASES = {
    "resnet18-imagenet-40px": ("resnet18", "imagenet", 40, True),
    "resnet18-cifar-20px": ("resnet18", "cifar", 20, True),
    "resnet34-imagenet-36px": ("resnet34", "imagenet", 36, False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_torch_checkpoint_in_gives_pytorchs_logits_statistics_and_gradients(case, tmp_path):
    name, stem, size, train_too = CASES[case]
    depths = M.RESNET_DEPTHS[name]
    net = torch_model(depths, 10, stem)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, size, size)).astype(np.float32)
    y = np.array([1, 7, 3, 1])
    torch.save(net.state_dict(), tmp_path / "w.pth")
    K.write_state_dict(as_numpy(net.state_dict()), tmp_path / "w.safetensors")
    model = M.ResNet(depths=depths, classes=10, stem=stem, input_shape=(size, size, 3))
    xj = jnp.asarray(x.transpose(0, 2, 3, 1))
    loaded = [K.from_torch_state_dict(model, K.read_state_dict(tmp_path / f)) for f in ("w.pth", "w.safetensors")]
    params, state = loaded[0]
    assert rel_error(loaded[0], loaded[1]) == 0

    net.eval()
    logits, _ = model.apply(params, state, xj, train=False)
    assert rel_error(logits, net(torch.from_numpy(x)).detach().numpy()) < 1e-5
    if not train_too:
        return
    net.train()
    out = net(torch.from_numpy(x))
    loss = tnn.functional.cross_entropy(out, torch.from_numpy(y))
    loss.backward()
    (loss_j, new_state), grads = M.manual_value_and_grad(model, params, state, xj, jnp.asarray(y))
    assert abs(float(loss_j) - loss.item()) < 1e-5 * abs(loss.item())
    torch_stats = {k: v for k, v in as_numpy(net.state_dict()).items() if "running" in k}
    ours = K.to_torch_state_dict(params, new_state)
    assert max(rel_error(ours[k], v) for k, v in torch_stats.items()) < 1e-5
    torch_grads = {k: p.grad.numpy() for k, p in net.named_parameters()}
    our_grads = K.to_torch_state_dict(grads, {})
    assert set(our_grads) == set(torch_grads)
    assert max(rel_error(our_grads[k], g) for k, g in torch_grads.items()) < 1e-4


def test_export_loads_into_pytorch_strictly_with_the_same_logits(tmp_path):
    model = M.ResNet(classes=7, input_shape=(33, 33, 3))
    params, state = model.init(jax.random.key(3))
    state = jax.tree_util.tree_map(lambda a: a + 0.1, state)
    path = jaxnets.export_torchvision(params, tmp_path / "out.safetensors", state=state)
    net = TorchResNet(M.RESNET_DEPTHS["resnet18"], 7, "imagenet")
    net.load_state_dict({k: torch.from_numpy(v) for k, v in K.read_state_dict(path).items()}, strict=True)
    pth = jaxnets.export_torchvision(params, tmp_path / "out.pth", state=state)
    same = K.read_state_dict(path)
    assert all(np.array_equal(v.numpy(), same[k]) for k, v in torch.load(pth, weights_only=True).items())
    with pytest.raises(K.CheckpointError, match="give the batch-norm statistics"):
        jaxnets.export_torchvision(params, tmp_path / "x.safetensors")
    net.eval()
    x = np.random.default_rng(1).standard_normal((2, 33, 33, 3)).astype(np.float32)
    ours, _ = model.apply(params, state, jnp.asarray(x), train=False)
    assert rel_error(ours, net(torch.from_numpy(x.transpose(0, 3, 1, 2))).detach().numpy()) < 1e-5


def test_bad_checkpoints_are_refused_naming_the_tensor(tmp_path):
    r18 = M.ResNet(classes=10, input_shape=(32, 32, 3))
    r34 = M.ResNet(depths=M.RESNET_DEPTHS["resnet34"], classes=10, input_shape=(32, 32, 3))
    sd34 = K.to_torch_state_dict(*r34.init(jax.random.key(0)))
    with pytest.raises(K.CheckpointError, match=r"r34\.pth: tensor 'layer1\.2\.\w+\.\w+' .* is not part of ResNet"):
        K.from_torch_state_dict(r18, sd34, source="r34.pth")
    sd18 = K.to_torch_state_dict(*r18.init(jax.random.key(0)))
    with pytest.raises(K.CheckpointError, match=r"tensor 'layer1\.2\.\w+\.\w+' \([\d, ]+\) is missing"):
        K.from_torch_state_dict(r34, sd18)
    bad = dict(sd18, **{"layer2.0.conv1.weight": np.zeros((128, 64, 5, 5), np.float32)})
    with pytest.raises(K.CheckpointError, match=r"'layer2\.0\.conv1\.weight' has shape \(128, 64, 5, 5\), ResNet "
                                                r"expects \(128, 64, 3, 3\)"):
        K.from_torch_state_dict(r18, bad)
    without_counters = {k: v for k, v in sd18.items() if not k.endswith("num_batches_tracked")}
    K.from_torch_state_dict(r18, without_counters)  # accepted with or without them
    notes = []
    r100 = M.ResNet(classes=100, input_shape=(32, 32, 3))
    params, _ = K.from_torch_state_dict(r100, sd18, log=notes.append)
    assert params["fc"]["w"].shape == (512, 100) and "replaced by a fresh init" in notes[0]
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(K.CheckpointError, match=r"junk\.pth: not a readable PyTorch file"):
        K.read_state_dict(tmp_path / "junk.pth")
    torch.save(tnn.Linear(2, 3), tmp_path / "module.pth")
    with pytest.raises(K.CheckpointError, match=r"module\.pth: holds pickled Python objects \(torch\.nn\.modules\.linear\.Linear\), not a state dict"):
        K.read_state_dict(tmp_path / "module.pth")
    (tmp_path / "trunc.safetensors").write_bytes(b"\x10\x00\x00")
    with pytest.raises(K.CheckpointError, match=r"trunc\.safetensors: not a readable safetensors file"):
        K.read_state_dict(tmp_path / "trunc.safetensors")


def test_small_images_are_refused_by_the_stem():
    with pytest.raises(ValueError, match=r"images of 16x16 are smaller than the imagenet stem"):
        M.ResNet(input_shape=(16, 16, 3))
