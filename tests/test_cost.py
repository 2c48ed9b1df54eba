"""The cost model against layer-by-layer counts written out by hand."""

from jaxnets import cost
from jaxnets import models as M


def test_mlp_counts():
    mlp = M.MLP(input_size=3072, hidden=(512, 512))
    macs = 3072 * 512 + 512 * 512 + 512 * 10
    assert cost.forward_macs(mlp) == macs
    # A step: forward + weight gradients + input gradients of all but the first layer. At the
    # benchmark's batch of 200 that is 1.579 GFLOP, not the 2.208 of "3 forwards".
    assert cost.train_flops(mlp) == 6 * macs - 2 * 3072 * 512
    assert round(200 * cost.train_flops(mlp) / 1e9, 3) == 1.579
    assert cost.activation_floats(mlp, (32, 32, 3)) == 3072 + 4 * 1024 + 10


def test_course_convnet_counts():
    # 32x32x3 -> 64 -> M -> 128 -> M -> 256, 256 -> M -> 512, 512 -> M -> 512, 512 -> M -> head.
    expected = (32 * 32 * 9 * 3 * 64 + 16 * 16 * 9 * 64 * 128 + 8 * 8 * 9 * (128 * 256 + 256 * 256)
                + 4 * 4 * 9 * (256 * 512 + 512 * 512) + 2 * 2 * 9 * 2 * 512 * 512 + 512 * 10)
    net = M.ConvNet()
    assert cost.forward_macs(net) == expected
    assert cost.train_flops(net) == 6 * expected - 2 * 32 * 32 * 9 * 3 * 64
    convs = [(32, 64), (16, 128), (8, 256), (8, 256), (4, 512), (4, 512), (2, 512), (2, 512)]
    assert cost.activation_floats(net, (32, 32, 3)) == 3072 + sum(4 * s * s * c for s, c in convs)


def test_preact_blocks_count_their_projection():
    net = M.ConvNet(input_shape=(8, 8, 3), plan=(16, 16, "M", 32), preact=True)
    # proj 3->16 (1x1), conv 16->16, conv 16->16, M to 4x4, proj 16->32, conv 32->32, head 4*4*32 -> 10.
    expected = 64 * 3 * 16 + 64 * 9 * 16 * 16 * 2 + 16 * 16 * 32 + 16 * 9 * 32 * 32 + 16 * 32 * 10
    assert cost.forward_macs(net) == expected
    assert [layer.name[:4] for layer in cost.layers(net)] == ["proj", "conv", "conv", "proj", "conv", "head"]


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
