"""Bilinear upsampling for fine-tuning at a higher resolution.

Each output pixel o samples the input at s = (o + 1/2) n_in / n_out - 1/2, clamped to
the image, and blends the neighbours floor(s), floor(s) + 1 linearly.  So a picture
that is itself linear in row and column is reproduced exactly inside the image, and a
constant picture stays constant.
"""
import numpy as np
import pytest

from minivit import backend
from minivit.data.resize import resize_bilinear


def loop_resize(img, out_h, out_w):
    n, c, h, w = img.shape
    out = np.zeros((n, c, out_h, out_w))
    for i in range(out_h):
        for j in range(out_w):
            si = min(max((i + 0.5) * h / out_h - 0.5, 0), h - 1)
            sj = min(max((j + 0.5) * w / out_w - 0.5, 0), w - 1)
            i0, j0 = int(np.floor(si)), int(np.floor(sj))
            i1, j1 = min(i0 + 1, h - 1), min(j0 + 1, w - 1)
            fi, fj = si - i0, sj - j0
            out[:, :, i, j] = ((1 - fi) * (1 - fj) * img[:, :, i0, j0] + (1 - fi) * fj * img[:, :, i0, j1]
                               + fi * (1 - fj) * img[:, :, i1, j0] + fi * fj * img[:, :, i1, j1])
    return out


@pytest.mark.parametrize("size", [(12, 12), (7, 5), (3, 3)])
def test_matches_the_formula_written_as_a_loop(size, device):
    img = np.random.default_rng(0).standard_normal((2, 3, 4, 6))
    got = backend.to_numpy(resize_bilinear(backend.to_device(img, device), size))
    np.testing.assert_allclose(got, loop_resize(img, *size), rtol=1e-12, atol=1e-12)


def test_linear_pictures_and_constants_survive(device):
    rows, cols = np.meshgrid(np.arange(8.0), np.arange(8.0), indexing="ij")
    img = (2 * rows + 3 * cols)[None, None]
    up = backend.to_numpy(resize_bilinear(backend.to_device(img, device), 32))
    s = (np.arange(32) + 0.5) * 8 / 32 - 0.5
    inside = (s >= 0) & (s <= 7)
    expected = 2 * s[:, None] + 3 * s[None, :]
    np.testing.assert_allclose(up[0, 0][np.ix_(inside, inside)], expected[np.ix_(inside, inside)],
                               rtol=1e-12)
    const = backend.to_device(np.full((1, 3, 5, 5), 0.25, np.float32), device)
    out = resize_bilinear(const, 9)
    assert out.dtype == np.float32 and np.allclose(backend.to_numpy(out), 0.25)


def test_same_size_is_untouched_and_bad_shapes_refused():
    img = np.zeros((1, 3, 4, 4))
    assert resize_bilinear(img, 4) is img
    with pytest.raises(ValueError, match=r"expected images of shape \(N, C, H, W\), got shape \(3, 4, 4\)"):
        resize_bilinear(img[0], 8)
