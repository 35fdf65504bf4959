"""The hybrid's ResNet stem (paper Sec. 3.1, "Hybrid Architecture").

    "As an alternative to raw image patches, the input sequence can be formed from
    feature maps of a CNN.  In this hybrid model, the patch embedding projection E
    (Eq. 1) is applied to patches extracted from a CNN feature map.  As a special case,
    the patches can have spatial size 1x1."

The CNN is the ResNet of BiT (Kolesnikov et al. 2020), as the official code builds it
(vit_jax/models_vit.py, models_resnet.py), with width w = int(64 * width_factor):

    root:   StdConv 7x7 stride 2 (w) -> GroupNorm -> ReLU -> max pool 3x3 stride 2
    stages: stage i (from 0) has n_i bottleneck units of features f = w * 2^i; the first
            unit of every stage but the first has stride 2
    unit:   StdConv 1x1 (f) -> GN -> ReLU -> StdConv 3x3 (f, stride) -> GN -> ReLU
            -> StdConv 1x1 (4f) -> GN (scale 0 at first) -> ReLU(residual + that),
            the residual projected by StdConv 1x1 (4f, stride) -> GN when its shape changes

Every convolution is a StdConv (weight-standardised kernel, no bias, TensorFlow "SAME"
padding), every GroupNorm has 32 groups and eps 1e-6 (Flax's defaults).  R50 is
num_layers (3, 4, 9) (the hybrid keeps three of the four ResNet-50 stages: a feature map
of image / 16); R26 is (2, 2, 2, 2) (image / 32); num_layers () is the root alone
(image / 4).  Images and feature maps are NCHW; kernels (KH, KW, C_in, C_out), the layout
of the official checkpoints.
"""
import math

from minivit import backend
from minivit.nn.layers import normal, param, zeros
from minivit.nn.module import Module
from minivit.ops.basic import relu
from minivit.ops.conv import max_pool2d, weight_standardize
from minivit.ops.norm import group_norm
from minivit.ops.patch import conv2d

GROUPS = 32                 # GroupNorm groups, Flax's default
GN_EPS = 1e-6               # GroupNorm eps, Flax's default
WS_EPS = 1e-5               # weight standardisation eps, official models_resnet.py


def resnet_width(width_factor):
    """The root's channels: int(64 * width_factor), as the official code computes it."""
    return int(64 * width_factor)


def feature_size(image_size, num_layers):
    """Side of the feature map the stem makes of image_size x image_size images: the root
    conv and the pool each halve it (rounding up: "SAME"), and so does every stage after
    the first.  224 -> 112 -> 56 (root), then 56, 28, 14 for R50's three stages."""
    halvings = 2 + max(len(num_layers) - 1, 0)
    for _ in range(halvings):
        image_size = -(-image_size // 2)
    return image_size


def stem_channels(width, num_layers):
    """Channels of the feature map: w for the root alone, else 4 w 2^(stages - 1)."""
    return 4 * width * 2 ** (len(num_layers) - 1) if num_layers else width


def count_stem_parameters(in_channels, width, num_layers):
    """Parameters of the stem, from its shapes alone: kernels and GroupNorm scale/bias."""
    total = 7 * 7 * in_channels * width + 2 * width                # conv_root, gn_root
    channels = width
    for i, units in enumerate(num_layers):
        f = width * 2 ** i
        for j in range(units):
            total += channels * f + 2 * f + 9 * f * f + 2 * f + f * 4 * f + 2 * 4 * f
            if channels != 4 * f or (i > 0 and j == 0):           # projected residual
                total += channels * 4 * f + 2 * 4 * f
            channels = 4 * f
    return total


class StdConv(Module):
    """conv2d(x, weight_standardize(kernel)), no bias, "SAME" padding (the official StdConv).

    The kernel is stored as learned; it is standardised on every call, so gradients flow
    through the standardisation to the stored kernel.
    """

    def __init__(self, in_channels, out_channels, kernel_size, rng, stride=1):
        fan_in = kernel_size * kernel_size * in_channels
        self.stride = stride
        self.kernel = param(normal(rng, (kernel_size, kernel_size, in_channels, out_channels),
                                   math.sqrt(1 / fan_in)))

    def forward(self, x):
        return conv2d(x, weight_standardize(self.kernel, WS_EPS), None, self.stride, "SAME")


class GroupNorm(Module):
    """GroupNorm over (B, C, H, W) with `num_groups` groups; scale 1 (or 0) and bias 0 at first."""

    def __init__(self, channels, num_groups=GROUPS, eps=GN_EPS, zero_scale=False):
        self.num_groups, self.eps = num_groups, eps
        ones = backend.module_for("cpu").ones(channels)
        self.scale = param(zeros((channels,)) if zero_scale else ones)
        self.bias = param(zeros((channels,)))

    def forward(self, x):
        return group_norm(x, self.scale, self.bias, self.num_groups, self.eps)


class BottleneckUnit(Module):
    """ReLU(residual + GN(conv3(ReLU(GN(conv2(ReLU(GN(conv1(x))))))))), the BiT bottleneck.

    conv1 1x1 and conv2 3x3 (with the stride) have `features` channels, conv3 1x1 has 4x;
    gn3 starts with scale 0, so at first the unit passes its residual through (a ReLU of
    it).  The residual is x itself, or StdConv 1x1 (stride) + GN when the unit changes
    the channels or the resolution.
    """

    def __init__(self, in_channels, features, stride, rng):
        out = 4 * features
        self.conv_proj = self.gn_proj = None
        if in_channels != out or stride != 1:
            self.conv_proj = StdConv(in_channels, out, 1, rng, stride)
            self.gn_proj = GroupNorm(out)
        self.conv1, self.gn1 = StdConv(in_channels, features, 1, rng), GroupNorm(features)
        self.conv2, self.gn2 = StdConv(features, features, 3, rng, stride), GroupNorm(features)
        self.conv3, self.gn3 = StdConv(features, out, 1, rng), GroupNorm(out, zero_scale=True)

    def forward(self, x):
        residual = x if self.conv_proj is None else self.gn_proj(self.conv_proj(x))
        y = relu(self.gn1(self.conv1(x)))
        y = relu(self.gn2(self.conv2(y)))
        y = self.gn3(self.conv3(y))
        return relu(residual + y)


class ResNetStage(Module):
    """`num_units` bottleneck units of `features`; the first one has the stage's stride."""

    def __init__(self, in_channels, features, num_units, stride, rng):
        self.units = [BottleneckUnit(in_channels if j == 0 else 4 * features, features,
                                     stride if j == 0 else 1, rng) for j in range(num_units)]

    def forward(self, x):
        for unit in self.units:
            x = unit(x)
        return x


class ResNetStem(Module):
    """Images (B, C, H, W) -> the feature map (B, stem_channels, h, w) the hybrid's patch
    embedding reads: the root block, then the stages of `num_layers`."""

    def __init__(self, in_channels, width, num_layers, rng):
        self.width, self.num_layers = width, tuple(num_layers)
        self.conv_root = StdConv(in_channels, width, 7, rng, stride=2)
        self.gn_root = GroupNorm(width)
        self.stages = []
        channels = width
        for i, units in enumerate(self.num_layers):
            features = width * 2 ** i
            self.stages.append(ResNetStage(channels, features, units, 1 if i == 0 else 2, rng))
            channels = 4 * features
        self.out_channels = channels

    def forward(self, images):
        x = relu(self.gn_root(self.conv_root(images)))
        x = max_pool2d(x, 3, 2, "SAME")
        for stage in self.stages:
            x = stage(x)
        return x
