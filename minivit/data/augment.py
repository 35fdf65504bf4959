"""Augmentation and normalisation of image batches, on the host, without a loop over images.

The standard CIFAR recipe (He et al. 2016, Sec. 4.2; the ViT paper's CIFAR fine-tuning
uses crops and flips too): pad each 32x32 image with 4 black pixels on every side, cut
a random 32x32 window out of the 40x40 result, and mirror it left-right with
probability 1/2.  With offsets (dy_n, dx_n) in 0..8 for image n,

    out[n, c, i, j] = padded[n, c, dy_n + i, dx_n + j]          (then reversed in j if flipped)

which for the whole batch is one gather from a sliding-window view of the padded batch.

The stronger policy adds Cutout (DeVries & Taylor 2017): a 16x16 square centred on a
uniformly random pixel (clipped at the border) is set to zero after normalisation,
that is to the mean colour.

Normalisation maps uint8 pixels to float32 (x / 255 - mean) / std per channel.
"""
from minivit import backend

np = backend.module_for("cpu")     # NumPy: everything in minivit.data runs on the host

# Per-channel (R, G, B) mean and standard deviation of the CIFAR-10 training set, of
# pixel / 255 over all 50,000 x 32 x 32 pixels.  These are the values computed on the
# original data (mean 0.49139968 0.48215841 0.44653091, std 0.24703223 0.24348513
# 0.26158784), the ones widely used for CIFAR-10; `channel_stats(train_images)`
# recomputes them from any training set.  (The std 0.2023, 0.1994, 0.2010 seen in some
# code is the mean of per-image stds, a different and smaller number.)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def _check_images(name, images):
    if not isinstance(images, np.ndarray) or images.ndim != 4:
        got = f"shape {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise ValueError(f"{name}: expected a host (NumPy) batch of images of shape "
                         f"(N, C, H, W), got {got}")


def channel_stats(images):
    """(mean, std) per channel of uint8 images (N, C, H, W), of pixel / 255.

    Computed from each channel's 256-bin histogram h (p = h / sum h, v = 0, 1/255, ..., 1):
    mean = sum p v, std = sqrt(sum p (v - mean)^2); exact, and without a float copy of
    the whole training set (50,000 images would take 1.2 GB in float64)."""
    _check_images("channel_stats", images)
    if images.dtype != np.uint8:
        raise ValueError(f"channel_stats: expected uint8 images, got {images.dtype}")
    v = np.arange(256) / 255.0
    means, stds = [], []
    for c in range(images.shape[1]):          # a loop over the 3 channels, not over images
        p = np.bincount(images[:, c].ravel(), minlength=256) / images[:, c].size
        mean = (p * v).sum()
        means.append(float(mean))
        stds.append(float(np.sqrt((p * (v - mean) ** 2).sum())))
    return tuple(means), tuple(stds)


def normalize(images, mean=CIFAR10_MEAN, std=CIFAR10_STD):
    """float32 (images / 255 - mean) / std, per channel, for uint8 images (N, C, H, W)."""
    _check_images("normalize", images)
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    if mean.shape != (images.shape[1],) or std.shape != (images.shape[1],):
        raise ValueError(f"normalize: expected a mean and std per channel ({images.shape[1]} "
                         f"values each), got {mean.shape[0] if mean.ndim else 1} and "
                         f"{std.shape[0] if std.ndim else 1}")
    # x * (1 / (255 std)) - mean / std: one multiply and one subtract, all in float32
    scale = (1.0 / (255.0 * std)).reshape(1, -1, 1, 1)
    shift = (mean / std).reshape(1, -1, 1, 1)
    return images.astype(np.float32) * scale - shift


def random_crop_flip(images, rng, padding=4, flip=True):
    """Random crop after zero padding, and a random horizontal flip, of a batch (N, C, H, W).

    Draws, in this order, dy = rng.integers(0, 2 padding + 1, N), dx likewise, and (when
    `flip`) flips = rng.random(N) < 0.5; returns a new array of the input's dtype and shape.
    """
    _check_images("random_crop_flip", images)
    n, _, h, w = images.shape
    dy = rng.integers(0, 2 * padding + 1, n)
    dx = rng.integers(0, 2 * padding + 1, n)
    flips = rng.random(n) < 0.5 if flip else np.zeros(n, dtype=bool)
    padded = np.pad(images, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    # windows[n, c, y, x] is the h x w window of image n whose corner is at (y, x)
    windows = np.lib.stride_tricks.sliding_window_view(padded, (h, w), axis=(2, 3))
    out = windows[np.arange(n), :, dy, dx]             # (N, C, h, w), a copy
    out[flips] = out[flips, :, :, ::-1]
    return out


def cutout(x, rng, size=16):
    """Zero a size x size square of each image of x (N, C, H, W), centred on a random pixel.

    As in DeVries & Taylor's code: with centre (cy, cx) drawn uniformly (rows first), the
    rows cy - size//2 .. cy + size//2 - 1 and the same columns are cleared, clipped at
    the border, in every channel.  Returns a new array of x's dtype.
    """
    _check_images("cutout", x)
    n, _, h, w = x.shape
    cy, cx = rng.integers(0, h, n), rng.integers(0, w, n)
    half = size // 2
    dy, dx = np.arange(h) - cy[:, None], np.arange(w) - cx[:, None]   # (N, H), (N, W)
    rows, cols = (dy >= -half) & (dy < half), (dx >= -half) & (dx < half)
    hole = rows[:, :, None] & cols[:, None, :]                        # (N, H, W)
    return x * (~hole[:, None]).astype(x.dtype)
