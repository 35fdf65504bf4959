"""The convolutional stem of the hybrid: strided "SAME" convolutions, max pooling,
GroupNorm and weight standardisation.

Sec. 3.1 ("Hybrid Architecture"): instead of raw image patches, the input sequence can
come from the feature map of a CNN.  The paper's CNN is the ResNet of BiT (Kolesnikov
et al. 2020), whose root block is

    StdConv 7x7, stride 2 -> GroupNorm -> ReLU -> max pool 3x3, stride 2

(224 -> 112 -> 56 pixels a side; lesson 15 adds the stages and the Transformer).  Four
pieces are new:

"SAME" padding (TensorFlow's, as in the official code).  An axis of n pixels, kernel k,
stride s keeps ceil(n / s) outputs; the windows then span (ceil(n/s) - 1) s + k pixels,
so p = max((ceil(n/s) - 1) s + k - n, 0) zeros are added: p // 2 before, the rest after.
At 224 px the 7x7/2 conv pads (2, 3), the 3x3/2 pool at 112 pads (0, 1): not the
symmetric 3 and 1 of PyTorch ports, whose windows sit one pixel off.

Convolution = im2col + one matrix product (lessons 03-04, now with stride < kernel and
padding): the K*K strided slices x_pad[:, :, i::S, j::S] side by side are the windows;
times the kernel reshaped to (K*K*C, D).

Max pooling: the same windows, padded with -inf (never the maximum), and their maximum.
Its gradient goes to the pixel where each window's maximum sits.

GroupNorm (32 groups, eps 1e-6): LayerNorm's normalisation, but over a group of
C/32 channels and all their pixels; then a scale and a bias per channel.  BiT uses it
instead of BatchNorm, so nothing depends on the batch.

Weight standardisation: every output channel of the kernel is made mean 0, standard
deviation 1 before the convolution, w_hat = (w - mean) / (std + 1e-5) (the official eps,
added to the standard deviation).  The gradient flows through it to the stored kernel:
    dw = (g - mean(g)) / (std + eps) - w_hat * mean(g * w_hat) / std.
"""
import matplotlib.pyplot as plt
import numpy as np

import minivit as mv
from common import Lesson

lesson = Lesson("14", "the convolution stem", __doc__)
rng = np.random.default_rng(0)


def same_pads(n, k, s):
    """TensorFlow's "SAME": (before, after) for an axis of n pixels."""
    out = -(-n // s)
    p = max((out - 1) * s + k - n, 0)
    return p // 2, p - p // 2


def pad(x, top, bottom, left, right, value=0.0):
    """x (B, C, H, W) with `value` rows above and below and columns left and right,
    joined on with concatenate (so the gradient of x is the matching slice)."""
    B, C, H, W = x.shape
    if top or bottom:
        rows = [mv.tensor(np.full((B, C, n, W), value)) for n in (top, bottom)]
        x = mv.concatenate([rows[0], x, rows[1]], axis=2)
    if left or right:
        cols = [mv.tensor(np.full((B, C, x.shape[2], n), value)) for n in (left, right)]
        x = mv.concatenate([cols[0], x, cols[1]], axis=3)
    return x


def windows(x, k, s, value=0.0):
    """(B, C, OH, OW, K*K): the K x K windows at stride s with "SAME" padding; entry
    i*K + j of a window is its pixel (i, j).  One strided slice per kernel offset."""
    B, C, H, W = x.shape
    (top, bottom), (left, right) = same_pads(H, k, s), same_pads(W, k, s)
    oh, ow = -(-H // s), -(-W // s)
    x = pad(x, top, bottom, left, right, value)
    parts = [x[:, :, i:i + s * (oh - 1) + 1:s, j:j + s * (ow - 1) + 1:s].reshape(B, C, oh, ow, 1)
             for i in range(k) for j in range(k)]
    return mv.concatenate(parts, axis=4)


def conv_by_hand(x, w, s):
    """y[b, d, r, c'] = sum_{i,j,c} x_pad[b, c, s r + i, s c' + j] w[i, j, c, d]."""
    k, _, C, D = w.shape
    cols = windows(x, k, s)                                  # (B, C, OH, OW, K*K)
    B, _, oh, ow, _ = cols.shape
    cols = cols.transpose(0, 2, 3, 4, 1).reshape(B, oh * ow, k * k * C)   # rows (i, j, c)
    y = cols @ w.reshape(k * k * C, D)                       # (B, OH*OW, D)
    return y.transpose(0, 2, 1).reshape(B, D, oh, ow)


def max_pool_by_hand(x, k=3, s=2):
    return windows(x, k, s, value=-np.inf).max(axis=4)


def group_norm_by_hand(x, gamma, beta, G, eps=1e-6):
    B, C, H, W = x.shape
    g = x.reshape(B, G, (C // G) * H * W)                    # one row per group
    centred = g - g.mean(axis=-1, keepdims=True)
    sigma = ((centred * centred).mean(axis=-1, keepdims=True) + eps).sqrt()
    x_hat = (centred / sigma).reshape(B, C, H, W)
    return x_hat * gamma.reshape(1, C, 1, 1) + beta.reshape(1, C, 1, 1)


def standardize_by_hand(w, eps=1e-5):
    centred = w - w.mean(axis=(0, 1, 2), keepdims=True)
    std = (centred * centred).mean(axis=(0, 1, 2), keepdims=True).sqrt()
    return centred / (std + eps)


# --- 1. "SAME" padding --------------------------------------------------------------------
lesson.say("1. 'SAME' padding: ceil(n / s) outputs; the odd padding row goes at the end.")
for n, k, s, what in [(224, 7, 2, "conv_root at 224 px"), (112, 3, 2, "the max pool after it"),
                      (32, 7, 2, "conv_root at 32 px (CIFAR)"), (16, 3, 2, "its max pool")]:
    lesson.say(f"   {what:<28} n={n:<4} k={k} s={s}: {-(-n // s):>3} outputs, "
               f"padding {same_pads(n, k, s)}")
lesson.expect("224 px, 7x7/2 pads (2, 3) and 112 px, 3x3/2 pads (0, 1), as in TensorFlow",
              same_pads(224, 7, 2) == (2, 3) == mv.ops.patch.same_padding(224, 7, 2)
              and same_pads(112, 3, 2) == (0, 1))

# --- 2. Convolution with stride and "SAME" padding ---------------------------------------
x = mv.tensor(rng.standard_normal((2, 3, 8, 8)), requires_grad=True)
w = mv.tensor(rng.standard_normal((3, 3, 3, 4)), requires_grad=True)
y = conv_by_hand(x, w, 2)
lesson.say("", f"2. A 3x3 stride-2 convolution of {tuple(x.shape)}: {tuple(y.shape)} "
               f"(ceil(8 / 2) = 4; padding {same_pads(8, 3, 2)} on each axis)")
lesson.same("lesson convolution == mv.conv2d(x, w, stride=2, padding='SAME')",
            y, mv.conv2d(x, w, None, 2, "SAME"))
symmetric = mv.conv2d(x, w, None, 2, 1).numpy()
lesson.expect("the symmetric padding (1, 1) is a different function (windows shifted)",
              not np.allclose(symmetric, y.numpy()))
lesson.gradcheck("lesson convolution, wrt x and w", lambda x, w: conv_by_hand(x, w, 2), x, w)

# --- 3. Max pooling ---------------------------------------------------------------------
xs = mv.tensor((rng.permutation(2 * 2 * 7 * 7) / 98 - 1).reshape(2, 2, 7, 7), requires_grad=True)
pooled = max_pool_by_hand(xs)
lesson.say("", f"3. Max pool 3x3/2 of {tuple(xs.shape)}: {tuple(pooled.shape)}; distinct "
               f"values, so every window has one maximum (at a tie there is no gradient)")
lesson.same("lesson max pool == mv.max_pool2d(x, 3, 2, 'SAME')", pooled, mv.max_pool2d(xs))
negative = mv.tensor(-1 - np.arange(16.0).reshape(1, 1, 4, 4))
lesson.same("-inf padding: an all-negative image pools to its own values, not to 0",
            mv.max_pool2d(negative), np.array([[[[-1.0, -3.0], [-9.0, -11.0]]]]))
lesson.gradcheck("lesson max pool, wrt x", max_pool_by_hand, xs)
xs.grad = None
pooled = mv.max_pool2d(xs)
pooled.backward(mv.tensor(np.ones(pooled.shape)).data)
winners = mv.backend.to_numpy(xs.grad)
lesson.expect("the gradient lands only on window maxima, once per window that picked them",
              winners.sum() == pooled.size and set(np.unique(winners)) <= {0, 1, 2, 3, 4})

# --- 4. GroupNorm ------------------------------------------------------------------------
G = 4
xg = mv.tensor(rng.standard_normal((2, 8, 3, 3)) * 2 + 1, requires_grad=True)
gamma = mv.tensor(1 + 0.3 * rng.standard_normal(8), requires_grad=True)
beta = mv.tensor(0.3 * rng.standard_normal(8), requires_grad=True)
lesson.say("", f"4. GroupNorm of {tuple(xg.shape)} in {G} groups of {8 // G} channels x 3 x 3 "
               f"pixels = {8 // G * 9} values each")
yg = group_norm_by_hand(xg, gamma, beta, G)
lesson.same("lesson GroupNorm == mv.group_norm", yg, mv.group_norm(xg, gamma, beta, G))
lesson.same("each image is normalised alone (no batch statistics)",
            group_norm_by_hand(xg[1:], gamma, beta, G), yg[1:])
lesson.gradcheck("lesson GroupNorm, wrt x, gamma, beta",
                 lambda x, g, b: group_norm_by_hand(x, g, b, G), xg, gamma, beta)
lesson.gradcheck("mv.group_norm (one fused Function)",
                 lambda x, g, b: mv.group_norm(x, g, b, G), xg, gamma, beta)

# --- 5. Weight standardisation ------------------------------------------------------------
wk = mv.tensor(rng.standard_normal((3, 3, 2, 5)) * 0.5 + 0.2, requires_grad=True)
w_hat = standardize_by_hand(wk)
lesson.say("", "5. Weight standardisation of a (3, 3, 2, 5) kernel, per output channel:",
           f"   before: means {np.round(wk.numpy().mean((0, 1, 2)), 3)}, "
           f"stds {np.round(wk.numpy().std((0, 1, 2)), 3)}",
           f"   after:  means {np.round(w_hat.numpy().mean((0, 1, 2)), 3) + 0}, "
           f"stds {np.round(w_hat.numpy().std((0, 1, 2)), 3)}")
lesson.same("lesson standardisation == mv.weight_standardize", w_hat, mv.weight_standardize(wk))
scaled = standardize_by_hand(mv.tensor(wk.numpy() * 4.0 - 3.0))
lesson.same("scaling and shifting a kernel does not change what the convolution sees "
            "(up to eps)", scaled, w_hat, rtol=1e-4, atol=1e-4)
lesson.gradcheck("lesson standardisation, wrt the stored kernel", standardize_by_hand, wk)
lesson.gradcheck("mv.weight_standardize", mv.weight_standardize, wk)

# --- 6. The root block, assembled ----------------------------------------------------------
yy, xx = np.mgrid[0:32, 0:32] / 32
image = np.stack([0.3 + 0.4 * xx] * 3)                              # a ramp, a disc, a square
image[:, (xx - 0.35) ** 2 + (yy - 0.4) ** 2 < 0.18 ** 2] = [[0.9], [0.2], [0.1]]
image[:, (abs(xx - 0.72) < 0.14) & (abs(yy - 0.68) < 0.14)] = [[0.1], [0.3], [0.9]]
stem = mv.nn.ResNetStem(3, 32, (), rng).astype("float64")         # the root alone, width 32
ramp = np.linspace(1, -1, 7)
filters = {"left - right": np.broadcast_to(ramp[None, :, None], (7, 7, 3)),
           "top - bottom": np.broadcast_to(ramp[:, None, None], (7, 7, 3)),
           "red - blue": np.broadcast_to(np.array([1.0, 0.0, -1.0]), (7, 7, 3)),
           "centre - surround": np.broadcast_to(
               (np.hypot(*np.mgrid[-3:4, -3:4]) < 2).astype(float)[:, :, None], (7, 7, 3))}
kernel = stem.conv_root.kernel.numpy().copy()
for d, f in enumerate(filters.values()):                           # 4 readable channels
    kernel[:, :, :, d] = f
stem.load_state_dict({"conv_root.kernel": kernel, "gn_root.scale": np.ones(32),
                      "gn_root.bias": np.zeros(32)})
img = mv.tensor(image[None] * 2 - 1)             # pixel / 127.5 - 1, as the official code
by_hand = max_pool_by_hand(group_norm_by_hand(
    conv_by_hand(img, standardize_by_hand(stem.conv_root.kernel), 2),
    stem.gn_root.scale, stem.gn_root.bias, 32).relu())
lesson.say("", f"6. The root block on a 32x32 image: conv 7x7/2 -> {(16, 16)}, pool 3x3/2 -> "
               f"{tuple(by_hand.shape[2:])}; at 224 px: 112 and 56")
lesson.same("lesson root block == mv.nn.ResNetStem(3, 32, num_layers=())", by_hand, stem(img))
constant = mv.weight_standardize(mv.tensor(np.ones((7, 7, 3, 1)))).numpy()
lesson.expect("a constant (brightness) kernel standardises to zero: it has no shape",
              not constant.any())
small = mv.nn.ResNetStem(1, 32, (), rng).astype("float64")
for p in small.parameters():
    p.data += mv.tensor(0.3 * rng.standard_normal(p.shape)).data
pic = mv.tensor(rng.standard_normal((1, 1, 8, 8)), requires_grad=True)
lesson.gradcheck("root block (StdConv, GroupNorm, ReLU, max pool) wrt image and parameters",
                 lambda x, *p: small(x), pic, *small.parameters())

with mv.no_grad():
    conv = stem.conv_root(img)
    after_gn = stem.gn_root(conv).relu()
    after_pool = mv.max_pool2d(after_gn)
fig, axes = plt.subplots(3, 5, figsize=(12, 7.6))
axes[0, 0].imshow(image.transpose(1, 2, 0))
axes[0, 0].set_title("input 32x32 (fed as pixel / 127.5 - 1)", fontsize=9)
for d, name in enumerate(filters):
    f = standardize_by_hand(mv.tensor(filters[name][:, :, :, None])).numpy()[:, :, :, 0]
    axes[0, d + 1].imshow(np.concatenate([f[:, :, 0], np.full((7, 1), np.nan), f[:, :, 2]], 1),
                          cmap="RdBu_r", vmin=-2, vmax=2)
    axes[0, d + 1].set_title(f"kernel {d}: {name}\n(standardised; R | B)", fontsize=9)
    axes[1, d + 1].imshow(after_gn.numpy()[0, d], cmap="magma")
    axes[1, d + 1].set_title("conv 7x7/2, GN, ReLU: 16x16", fontsize=9)
    axes[2, d + 1].imshow(after_pool.numpy()[0, d], cmap="magma")
    axes[2, d + 1].set_title("max pool 3x3/2: 8x8", fontsize=9)
axes[1, 0].axis("off"), axes[2, 0].axis("off")
axes[1, 0].text(0, 0.5, "root block:\nStdConv 7x7/2\n-> GroupNorm (32 groups)\n-> ReLU\n"
                        "-> max pool 3x3/2\n\n'SAME' padding:\n32 px pads (2, 3)\n"
                        "16 px pads (0, 1)", fontsize=10, va="center")
for ax in axes.flat:
    ax.set_xticks([]), ax.set_yticks([])
fig.suptitle("The hybrid's root block: four hand-made channels of 32 (the other 28 random)")
fig.tight_layout()
lesson.figure(fig, "root_block.png")
lesson.finish()
