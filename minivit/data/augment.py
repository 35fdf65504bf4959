"""Augmentation and normalisation of image batches, without a loop over images, on either device.

The standard CIFAR recipe (He et al. 2016, Sec. 4.2; the ViT paper's CIFAR fine-tuning
uses crops and flips too): pad each 32x32 image with 4 black pixels on every side, cut
a random 32x32 window out of the 40x40 result, and mirror it left-right with
probability 1/2.  With offsets (dy_n, dx_n) in 0..8 for image n,

    out[n, c, i, j] = padded[n, c, dy_n + i, dx_n + j]          (then reversed in j if flipped)
                    = images[n, c, dy_n + i - 4, dx_n + j - 4]  (0 outside the image)

which for the whole batch is one gather of pixels at clipped indices, times a mask
that is 0 where the window leaves the image: the padded batch is never built.

The stronger policy adds Cutout (DeVries & Taylor 2017): a 16x16 square centred on a
uniformly random pixel (clipped at the border) is set to zero after normalisation,
that is to the mean colour.

Normalisation maps uint8 pixels to float32 (x / 255 - mean) / std per channel.

Each augmentation comes in two parts: the random draws, made on the host by a NumPy
Generator (so a seed gives the same numbers on every device), and the arithmetic
given those numbers (`crop_flip_at`, `cutout_at`), done by the array module of the
images (NumPy or CuPy).  `random_crop_flip` and `cutout` do both; the Loader draws a
whole epoch's numbers at once and moves them to the device in one copy.
"""
from minivit import backend

np = backend.module_for("cpu")     # NumPy: the random draws and the constants, on the host

# Per-channel (R, G, B) mean and standard deviation of the CIFAR-10 training set, of
# pixel / 255 over all 50,000 x 32 x 32 pixels.  These are the values computed on the
# original data (mean 0.49139968 0.48215841 0.44653091, std 0.24703223 0.24348513
# 0.26158784), the ones widely used for CIFAR-10; `channel_stats(train_images)`
# recomputes them from any training set.  (The std 0.2023, 0.1994, 0.2010 seen in some
# code is the mean of per-image stds, a different and smaller number.)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def _check_images(name, images, host=False):
    ok = isinstance(images, np.ndarray) if host else backend.is_array(images)
    if not ok or images.ndim != 4:
        got = f"shape {images.shape}" if ok else type(images).__name__
        raise ValueError(f"{name}: expected a {'host (NumPy)' if host else 'NumPy or CuPy'} "
                         f"batch of images of shape (N, C, H, W), got {got}")


def _on_device_of(x, *host_arrays):
    """The host arrays moved to x's device (unchanged when x is a NumPy array)."""
    device = backend.device_of(x)
    return [backend.asarray(a, device=device) for a in host_arrays]


def channel_stats(images):
    """(mean, std) per channel of uint8 images (N, C, H, W), of pixel / 255.

    Computed from each channel's 256-bin histogram h (p = h / sum h, v = 0, 1/255, ..., 1):
    mean = sum p v, std = sqrt(sum p (v - mean)^2); exact, and without a float copy of
    the whole training set (50,000 images would take 1.2 GB in float64)."""
    _check_images("channel_stats", images, host=True)
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


def normalization(mean, std, channels):
    """(scale, shift), host float32 (1, C, 1, 1), with (x / 255 - mean) / std = x scale - shift."""
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    if mean.shape != (channels,) or std.shape != (channels,):
        raise ValueError(f"normalize: expected a mean and std per channel ({channels} "
                         f"values each), got {mean.shape[0] if mean.ndim else 1} and "
                         f"{std.shape[0] if std.ndim else 1}")
    # x * (1 / (255 std)) - mean / std: one multiply and one subtract, all in float32
    return (1.0 / (255.0 * std)).reshape(1, -1, 1, 1), (mean / std).reshape(1, -1, 1, 1)


def normalize(images, mean=CIFAR10_MEAN, std=CIFAR10_STD):
    """float32 (images / 255 - mean) / std, per channel, for uint8 images (N, C, H, W)."""
    _check_images("normalize", images)
    scale, shift = _on_device_of(images, *normalization(mean, std, images.shape[1]))
    return images.astype(scale.dtype) * scale - shift


def crop_flip_at(images, index, dy, dx, flips, padding=4):
    """Images `index` of `images` (N, C, H, W), each cropped at (dy, dx) of itself padded
    with `padding` zeros, and mirrored left-right where `flips` is nonzero: (n, C, H, W).

    index, dy, dx, flips: integer arrays (n,) on the images' device.  Output pixel (i, j)
    of image n comes from row dy_n + i - padding and column dx_n + j - padding of the
    image (j reversed if flipped), or is 0 where that is outside it: one gather from the
    flat images at the clipped position, times a 0/1 mask.
    """
    xp = backend.array_module(images)
    _, c, h, w = images.shape
    j = xp.arange(-padding, w - padding)                  # reversed: w-1-padding .. -padding
    rows = dy[:, None] + xp.arange(-padding, h - padding)               # (n, H) source rows
    cols = dx[:, None] + xp.where(flips[:, None], j[::-1], j)           # (n, W) source columns
    clipped_rows, clipped_cols = xp.clip(rows, 0, h - 1), xp.clip(cols, 0, w - 1)
    inside = ((rows == clipped_rows)[:, None, :, None]                  # (n, 1, H, W): not
              & (cols == clipped_cols)[:, None, None, :])               # in the padding
    # images[index_n, k, row, col] is flat element (index_n C + k) H W + row W + col
    planes = index[:, None] * (c * h * w) + xp.arange(0, c * h * w, h * w)      # (n, C)
    pixels = clipped_rows[:, :, None] * w + clipped_cols[:, None, :]           # (n, H, W)
    return images.reshape(-1).take(planes[:, :, None, None] + pixels[:, None]) * inside


def crop_flip_draws(rng, n, padding=4, flip=True):
    """(dy, dx, flips) for n images, drawn from rng in this order: dy = rng.integers(0,
    2 padding + 1, n), dx likewise, and (when `flip`) flips = rng.random(n) < 0.5."""
    dy = rng.integers(0, 2 * padding + 1, n)
    dx = rng.integers(0, 2 * padding + 1, n)
    flips = rng.random(n) < 0.5 if flip else np.zeros(n, dtype=bool)
    return dy, dx, flips


def random_crop_flip(images, rng, padding=4, flip=True):
    """Random crop after zero padding, and a random horizontal flip, of a batch (N, C, H, W).

    The offsets and flips are `crop_flip_draws(rng, N, padding, flip)`; returns a new
    array of the input's dtype and shape, on the input's device.
    """
    _check_images("random_crop_flip", images)
    n = len(images)
    dy, dx, flips = _on_device_of(images, *crop_flip_draws(rng, n, padding, flip))
    return crop_flip_at(images, backend.array_module(images).arange(n), dy, dx, flips, padding)


def cutout_at(x, cy, cx, size=16):
    """x (N, C, H, W) with the size x size square of image n centred on (cy_n, cx_n) zeroed.

    The rows cy - size//2 .. cy + size//2 - 1 and the same columns are cleared, clipped at
    the border, in every channel: x times a 0/1 mask.  cy, cx: integer arrays (N,) on x's
    device.  Returns a new array of x's dtype.
    """
    xp = backend.array_module(x)
    _, _, h, w = x.shape
    half = size // 2
    dy, dx = xp.arange(h) - cy[:, None], xp.arange(w) - cx[:, None]   # (N, H), (N, W)
    rows, cols = (dy >= -half) & (dy < half), (dx >= -half) & (dx < half)
    hole = rows[:, :, None] & cols[:, None, :]                        # (N, H, W)
    return x * (~hole[:, None]).astype(x.dtype)


def cutout_draws(rng, n, height, width):
    """(cy, cx), the centres of n squares: cy = rng.integers(0, height, n), then cx."""
    return rng.integers(0, height, n), rng.integers(0, width, n)


def cutout(x, rng, size=16):
    """Zero a size x size square of each image of x (N, C, H, W), centred on a random pixel.

    As in DeVries & Taylor's code: the centres are drawn uniformly, rows first
    (`cutout_draws`), and `cutout_at` clears the squares.  Returns a new array of x's dtype.
    """
    _check_images("cutout", x)
    n, _, h, w = x.shape
    return cutout_at(x, *_on_device_of(x, *cutout_draws(rng, n, h, w)), size)
