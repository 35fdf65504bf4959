"""Bilinear resizing of a batch of images, on whichever device the batch lives.

Fine-tuning a pre-trained ViT on CIFAR-10 feeds it the 32x32 images upsampled to the
model's resolution (the paper fine-tunes at 384x384), which is done per batch on the
device after the batch has been moved there: a 512 x 3 x 384 x 384 float32 batch is
900 MB, 144 times the 32x32 one.

Output pixel o of an axis of length n_out samples the input at the half-pixel
position  s = (o + 1/2) n_in / n_out - 1/2  (clamped to [0, n_in - 1]), the convention
of tf.image.resize, PyTorch's align_corners=False and Pillow, and mixes the two
neighbours floor(s) and floor(s) + 1 with weights 1 - f and f, f = s - floor(s).
Rows first, then columns: two gathers and two blends, no loop over images.
"""
from minivit import backend


def _taps(n_in, n_out, xp, dtype):
    s = (xp.arange(n_out, dtype="float64") + 0.5) * (n_in / n_out) - 0.5
    s = xp.clip(s, 0, n_in - 1)
    lo = xp.floor(s).astype("int64")
    hi = xp.minimum(lo + 1, n_in - 1)
    return lo, hi, (s - lo).astype(dtype)


def resize_bilinear(images, size):
    """(N, C, H, W) float images -> (N, C, size, size) (or size = (height, width))."""
    if images.ndim != 4:
        raise ValueError(f"resize_bilinear: expected images of shape (N, C, H, W), "
                         f"got shape {tuple(images.shape)}")
    height, width = (size, size) if isinstance(size, int) else size
    xp = backend.array_module(images)
    if images.shape[2:] == (height, width):
        return images
    lo, hi, f = _taps(images.shape[2], height, xp, images.dtype)
    f = f[:, None]
    rows = images[:, :, lo, :] * (1 - f) + images[:, :, hi, :] * f
    lo, hi, f = _taps(images.shape[3], width, xp, images.dtype)
    return rows[..., lo] * (1 - f) + rows[..., hi] * f
