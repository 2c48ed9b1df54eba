"""The cost model against layer-by-layer counts written out by hand."""

import math

from jaxnets import cost
from jaxnets import models as M
from jaxnets import network as nn


def test_mlp_counts():
    mlp = M.MLP(input_size=3072, hidden=(512, 512))
    macs = 3072 * 512 + 512 * 512 + 512 * 10
    assert cost.forward_macs(mlp) == macs
    # A step: forward + weight gradients + input gradients of all but the first layer. At the
    # benchmark's batch of 200 that is 1.579 GFLOP, not the 2.208 of "3 forwards".
    assert cost.train_flops(mlp) == 6 * macs - 2 * 3072 * 512
    assert round(200 * cost.train_flops(mlp) / 1e9, 3) == 1.579
    # The image; linear and relu outputs of both blocks, the logits; the largest gradient (512).
    assert cost.activation_floats(mlp) == 3072 + 2 * 2 * 512 + 10 + 512
    with_bn = M.MLP(input_size=3072, hidden=(512, 512), batch_norm=True, dropout=0.1)
    assert cost.activation_floats(with_bn) == 3072 + 2 * 4 * 512 + 10 + 512  # + bn and dropout outputs


def test_course_convnet_counts():
    # 32x32x3 -> 64 -> M -> 128 -> M -> 256, 256 -> M -> 512, 512 -> M -> 512, 512 -> M -> head.
    expected = (32 * 32 * 9 * 3 * 64 + 16 * 16 * 9 * 64 * 128 + 8 * 8 * 9 * (128 * 256 + 256 * 256)
                + 4 * 4 * 9 * (256 * 512 + 512 * 512) + 2 * 2 * 9 * 2 * 512 * 512 + 512 * 10)
    net = M.ConvNet()
    assert cost.forward_macs(net) == expected
    assert cost.train_flops(net) == 6 * expected - 2 * 32 * 32 * 9 * 3 * 64
    convs = [(32, 64), (16, 128), (8, 256), (8, 256), (4, 512), (4, 512), (2, 512), (2, 512)]
    pools = [(16, 64), (8, 128), (4, 256), (2, 512), (1, 512)]
    # conv, bn and relu outputs of every block, each pool's output, the logits, and the
    # gradient of the largest output (the first block's 32x32x64).
    kept = sum(3 * s * s * c for s, c in convs) + sum(s * s * c for s, c in pools) + 10
    assert cost.activation_floats(net) == 3072 + kept + 32 * 32 * 64
    assert [layer.name for layer in cost.layers(net)][:2] == ["blocks.0.conv", "blocks.1.conv"]  # pools take no entry


def test_preact_blocks_count_their_projection():
    net = M.ConvNet(input_shape=(8, 8, 3), plan=(16, 16, "M", 32), preact=True)
    # proj 3->16 (1x1), conv 16->16, conv 16->16, M to 4x4, proj 16->32, conv 32->32, head 4*4*32 -> 10.
    expected = 64 * 3 * 16 + 64 * 9 * 16 * 16 * 2 + 16 * 16 * 32 + 16 * 9 * 32 * 32 + 16 * 32 * 10
    assert cost.forward_macs(net) == expected
    # Paths are the params tree's: the pool (blocks.2) has no params and takes no entry.
    assert [layer.name for layer in cost.layers(net)] == [
        "blocks.0.proj", "blocks.0.conv", "blocks.1.conv", "blocks.2.proj", "blocks.2.conv", "head"]


def test_a_composition_of_my_own_is_counted_from_its_layers():
    block = nn.serial(("conv", nn.Conv(8, 5, stride=2, bias=False)), ("bn", nn.BatchNorm()), nn.relu())
    net = nn.Composed(nn.serial(("stem", block), nn.AvgPool(2, 2, 0), nn.Flatten(), ("fc", nn.Linear(3))),
                      input_shape=(10, 10, 2))
    # 5x5/2 pad 2 on 10x10 -> 5x5x8; avg 2/2 -> 2x2x8; flatten 32 -> 3.
    assert [(l.name, l.macs, l.outputs) for l in cost.layers(net)] == [
        ("stem.conv", 5 * 5 * 25 * 2 * 8, 200), ("fc", 32 * 3, 3)]
    assert cost.activation_floats(net) == 200 + 3 * 200 + 32 + 3 + 200
    assert math.prod(net.input_shape) == 200


def test_benchmark_counts_winograd_multiplies_per_layer():
    """benchmarks.cpu's multiply count for the course ConvNet on the CPU kernels, by hand:
    conv 1 (3 input channels) and the two 2x2 convs are direct, the five others Winograd
    (16 of the 36 multiplies of each 2x2 output tile), the first layer has no input gradient."""
    from benchmarks.cpu import multiply_flops

    macs = lambda s, cin, cout: s * s * 9 * cin * cout
    winograd = [macs(16, 64, 128), macs(8, 128, 256), macs(8, 256, 256), macs(4, 256, 512), macs(4, 512, 512)]
    direct = [macs(2, 512, 512)] * 2 + [512 * 10]
    expected = 4 * macs(32, 3, 64) + 6 * sum(direct) + 6 * sum(winograd) * 16 // 36
    flops, names = multiply_flops(M.ConvNet(conv_impl="winograd"))
    assert flops == expected == 472_676_352 and len(names) == 5
    assert multiply_flops(M.ConvNet(conv_impl="xla"))[0] == cost.train_flops(M.ConvNet())


def test_benchmark_records_the_cpu_flags(tmp_path):
    from benchmarks.common import cpu_info

    fake = tmp_path / "cpuinfo"
    fake.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16\n")
    info = cpu_info(fake)
    assert {"avx2", "avx512f", "avx512_bf16"} <= set(info["flags"]) and "amx_tile" not in info["flags"]
