"""PyTorch twins of jaxnets' ResNet and EfficientNet-Lite0, for the tests and the CPU benchmark.

torchvision cannot be installed beside the project's CPU torch 2.13 (its PyPI wheels need
another torch build), so :class:`TorchResNet` is torchvision's ``resnet18``/``resnet34``
written out from ``torch.nn`` with torchvision's module names and layout (BasicBlock,
``downsample`` = 1x1 conv + BN, ``avgpool``, ``fc``); a CIFAR stem swaps conv1 for a 3x3/1
conv and drops the max pool. :class:`TorchEfficientNetLite0` is EfficientNet-Lite0 as
``efficientnet-lite-pytorch`` builds it (its ``Conv2dStaticSamePadding``: a fixed zero pad,
TensorFlow's "SAME", then an unpadded conv), from the block table of
:data:`jaxnets.models.EFFICIENTNET_LITE0_STAGES`, without dropout (the benchmark trains
without it on both sides). Importing this module imports torch.
"""

import torch
from torch import nn

from jaxnets import models as M


class BasicBlock(nn.Module):
    def __init__(self, cin, width, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = None
        if stride != 1 or cin != width:
            self.downsample = nn.Sequential(nn.Conv2d(cin, width, 1, stride, bias=False), nn.BatchNorm2d(width))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + identity)


class TorchResNet(nn.Module):
    """torchvision's ResNet with basic blocks (``depths`` per stage), ``stem`` "imagenet" or "cifar"."""

    def __init__(self, depths, classes, stem):
        super().__init__()
        if stem == "imagenet":
            self.conv1, self.maxpool = nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.MaxPool2d(3, 2, 1)
        else:
            self.conv1, self.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
        self.bn1, self.relu = nn.BatchNorm2d(64), nn.ReLU()
        cin = 64
        for i, (depth, width) in enumerate(zip(depths, M.RESNET_WIDTHS)):
            blocks = []
            for j in range(depth):
                blocks.append(BasicBlock(cin, width, 2 if i and not j else 1))
                cin = width
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(512, classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def same_pad(size, kernel, stride):
    """TensorFlow's "SAME" padding of one axis, ``(before, after)`` (the odd pixel after)."""
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv(nn.Sequential):
    """A static "SAME" zero pad for a ``size``-pixel input, then an unpadded conv (no bias)."""

    def __init__(self, cin, cout, kernel, stride, size, groups=1):
        (t, b), (l, r) = same_pad(size, kernel, stride), same_pad(size, kernel, stride)
        super().__init__(nn.ZeroPad2d((l, r, t, b)), nn.Conv2d(cin, cout, kernel, stride, bias=False, groups=groups))


def _bn(width):
    return nn.BatchNorm2d(width, eps=M.EFFICIENTNET_BN["eps"], momentum=M.EFFICIENTNET_BN["momentum"])


class MBConv(nn.Module):
    def __init__(self, kernel, stride, expansion, cin, cout, size):
        super().__init__()
        mid = cin * expansion
        expand = [nn.Conv2d(cin, mid, 1, bias=False), _bn(mid), nn.ReLU6()] if expansion != 1 else []
        self.body = nn.Sequential(*expand, SameConv(mid, mid, kernel, stride, size, groups=mid), _bn(mid), nn.ReLU6(),
                                  nn.Conv2d(mid, cout, 1, bias=False), _bn(cout))
        self.skip = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.body(x) if self.skip else self.body(x)


class TorchEfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 on ``size`` x ``size`` images (the "SAME" pads depend on the size)."""

    def __init__(self, classes, size):
        super().__init__()
        layers = [SameConv(3, 32, 3, 2, size), _bn(32), nn.ReLU6()]
        size = -(-size // 2)
        for kernel, stride, expansion, cin, cout in M.efficientnet_lite0_blocks():
            layers.append(MBConv(kernel, stride, expansion, cin, cout, size))
            size = -(-size // stride)
        layers += [nn.Conv2d(320, 1280, 1, bias=False), _bn(1280), nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                   nn.Linear(1280, classes)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)
