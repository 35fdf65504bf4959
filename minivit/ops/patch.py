"""Patches and convolutions: im2col, col2im, conv2d, and the ViT patch embedding (Eq. 1).

The Vision Transformer reads an image as a sequence: it cuts x (C, H, W) into N =
HW/P^2 patches of P x P pixels, flattens each into a vector x_p^i of P*P*C values and
maps it to D dimensions with one matrix E (the paper's Eq. 1):

    z_0 = [x_class; x_p^1 E; x_p^2 E; ...; x_p^N E] + E_pos,      E in R^{(P*P*C) x D}.

Cutting an image into windows and flattening each one is `im2col` ("image to
columns"); with window = stride = P it gives exactly the patches.  Any convolution is
then one matrix product, conv2d(x, w) = im2col(x) @ w.reshape(K*K*C, D), so the patch
embedding *is* a convolution with kernel = stride = P -- which is how the official code
computes it (a Flax Conv whose kernel has shape (P, P, C, D)).

Layout.  Images are NCHW, (B, C, H, W).  im2col returns (B, OH*OW, KH*KW*C): one row
per output position (row-major over the output grid), and within a row the values in
the order (row in kernel, column in kernel, channel), channel fastest.  That is the
memory order of an HWIO kernel (KH, KW, C_in, C_out), so such a kernel -- and an
official ViT checkpoint's embedding kernel -- reshapes to (KH*KW*C_in, C_out) as is.

Padding.  `padding` is an int or a pair (zeros on both sides), "VALID" (none), "SAME"
(TensorFlow's: ceil(H / S) outputs, the padding split with the odd row at the end, see
same_padding; the hybrid's ResNet stem uses it) or ((top, bottom), (left, right)).
"""
from minivit import backend
from minivit.autograd import Function, as_tensor
from minivit.ops.basic import affine, matmul, reshape, transpose


def _pair(value, name):
    """An int or an (h, w) pair of ints as an (h, w) tuple."""
    pair = (value, value) if isinstance(value, int) else value
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in pair)):
        raise TypeError(f"{name} must be an int or a pair (h, w) of ints, got {value!r}")
    return tuple(pair)


def same_padding(size, kernel, stride):
    """(before, after): TensorFlow's 'SAME' padding of one axis of `size` pixels.

    'SAME' keeps OH = ceil(size / stride) outputs; the windows then span
    (OH - 1) * stride + kernel pixels, so p = max((OH - 1) * stride + kernel - size, 0)
    zeros are added, p // 2 before and the rest after (the odd one goes at the end):
    a 7x7 stride-2 convolution of 224 pixels pads (2, 3), a 3x3 stride-2 pool of 112
    pads (0, 1).  This asymmetry is TensorFlow's and Flax's, not PyTorch's.
    """
    out = -(-size // stride)                         # ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _padding(padding, image_hw, kernel, stride):
    """Any padding option as ((top, bottom), (left, right)).

    An int p or a pair (ph, pw): that many zeros on both sides; "VALID": none; "SAME":
    TensorFlow's (same_padding, per axis); ((top, bottom), (left, right)): as given.
    """
    if isinstance(padding, str):
        if padding.upper() == "VALID":
            return (0, 0), (0, 0)
        if padding.upper() == "SAME":
            return tuple(same_padding(n, k, s) for n, k, s in zip(image_hw, kernel, stride))
        raise ValueError(f"padding must be an int, a pair, 'SAME' or 'VALID', got {padding!r}")
    if (isinstance(padding, (tuple, list)) and len(padding) == 2
            and all(isinstance(p, (tuple, list)) for p in padding)):
        pads = tuple(_pair(p, "padding") for p in padding)
    else:
        ph, pw = _pair(padding, "padding")
        pads = (ph, ph), (pw, pw)
    if min(min(p) for p in pads) < 0:
        raise ValueError(f"padding must be >= 0, got {padding!r}")
    return pads


def _geometry(image_shape, kernel, stride, padding):
    """Check the options against an image shape (B, C, H, W) and return
    (kh, kw), (sh, sw), ((top, bottom), (left, right)), (oh, ow), the output grid being
    OH = (H + top + bottom - KH) // SH + 1 and likewise OW."""
    (kh, kw), (sh, sw) = _pair(kernel, "kernel"), _pair(stride, "stride")
    if min(kh, kw, sh, sw) < 1:
        raise ValueError(f"kernel and stride must be >= 1, got kernel {(kh, kw)}, "
                         f"stride {(sh, sw)}")
    if len(image_shape) != 4:
        raise ValueError(f"expected an image batch of shape (B, C, H, W), got shape "
                         f"{tuple(image_shape)}")
    H, W = image_shape[2], image_shape[3]
    (pt, pb), (pl, pr) = pads = _padding(padding, (H, W), (kh, kw), (sh, sw))
    if H + pt + pb < kh or W + pl + pr < kw:
        raise ValueError(f"kernel {(kh, kw)} is larger than the padded image "
                         f"{(H + pt + pb, W + pl + pr)} (H={H}, W={W}, padding {pads})")
    oh, ow = (H + pt + pb - kh) // sh + 1, (W + pl + pr - kw) // sw + 1
    return (kh, kw), (sh, sw), pads, (oh, ow)


def _im2col_array(x, kernel, stride, padding, fill=0):
    """im2col on a raw array: one strided slice per kernel offset (i, j).  The padding
    holds `fill` (0 for a convolution, -inf for max pooling)."""
    xp = backend.array_module(x)
    (kh, kw), (sh, sw), (top_bottom, left_right), (oh, ow) = _geometry(x.shape, kernel, stride,
                                                                       padding)
    B, C = x.shape[:2]
    x = xp.pad(x.transpose(0, 2, 3, 1), ((0, 0), top_bottom, left_right, (0, 0)),
               constant_values=fill)                                          # (B,Hp,Wp,C)
    cols = xp.empty((B, oh, ow, kh, kw, C), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            # offset (i, j) of every window: pixels (sh*r + i, sw*s + j), r < oh, s < ow
            cols[:, :, :, i, j, :] = x[:, i:i + sh * oh:sh, j:j + sw * ow:sw, :]
    return cols.reshape(B, oh * ow, kh * kw * C)


def _col2im_array(cols, image_shape, kernel, stride, padding):
    """col2im on a raw array: add each kernel offset's values back where they came from."""
    xp = backend.array_module(cols)
    (kh, kw), (sh, sw), pads, (oh, ow) = _geometry(image_shape, kernel, stride, padding)
    (pt, pb), (pl, pr) = pads
    B, C, H, W = image_shape
    expected = (B, oh * ow, kh * kw * C)
    if tuple(cols.shape) != expected:
        raise ValueError(f"col2im: columns for images {tuple(image_shape)} with kernel "
                         f"{(kh, kw)}, stride {(sh, sw)}, padding {pads} have shape "
                         f"{expected}, got {tuple(cols.shape)}")
    cols = cols.reshape(B, oh, ow, kh, kw, C)
    x = xp.zeros((B, H + pt + pb, W + pl + pr, C), dtype=cols.dtype)
    for i in range(kh):
        for j in range(kw):
            # one offset touches each pixel at most once, so a slice-add is exact;
            # windows overlap across offsets, and those contributions add up here
            x[:, i:i + sh * oh:sh, j:j + sw * ow:sw, :] += cols[:, :, :, i, j, :]
    return x[:, pt:pt + H, pl:pl + W, :].transpose(0, 3, 1, 2)       # drop padding, NCHW


class Im2Col(Function):
    """cols[b, (r, s), (i, j, c)] = x_pad[b, c, SH*r + i, SW*s + j].

    x_pad is x with PH zero rows on top (and some, maybe another number, below) and PW
    zero columns on the left (and some on the right); (r, s) runs over the OH x OW output
    grid and (i, j, c) over the kernel window, channel fastest.

    Backward.  Every entry of cols is a copy of one entry of x_pad, so cols = A x for a
    0/1 selection matrix A, and dx = A^T g.  Row (x-entry) (b, c, h, w) of A^T has a 1
    in every column where that pixel was copied, i.e. at every (r, s, i, j) with
    SH*r + i - PH = h and SW*s + j - PW = w.  So

        dx[b, c, h, w] = sum over windows (r, s) containing (h, w) of g[b, (r, s), (i, j, c)],

    the sum over overlapping windows; gradients that land on the padding belong to the
    constant zeros, not to x, and are dropped.  That is col2im(g).
    """

    def __init__(self, kernel, stride=1, padding=0):
        self.kernel, self.stride, self.padding = kernel, stride, padding

    def forward(self, x):
        self.x_shape = x.shape
        return _im2col_array(x, self.kernel, self.stride, self.padding)

    def backward(self, g):
        return _col2im_array(g, self.x_shape, self.kernel, self.stride, self.padding)


class Col2Im(Function):
    """x[b, c, h, w] = sum of cols[b, (r, s), (i, j, c)] over SH*r + i - PH = h,
    SW*s + j - PW = w: each column entry added back to the pixel it names.

    Backward.  col2im is A^T, the transpose of im2col's selection matrix A (see Im2Col),
    so its gradient is (A^T)^T g = A g = im2col(g): each column entry receives the
    gradient of the pixel it was added to.
    """

    def __init__(self, image_shape, kernel, stride=1, padding=0):
        self.image_shape = tuple(image_shape)
        self.kernel, self.stride, self.padding = kernel, stride, padding

    def forward(self, cols):
        return _col2im_array(cols, self.image_shape, self.kernel, self.stride, self.padding)

    def backward(self, g):
        return _im2col_array(g, self.kernel, self.stride, self.padding)


def im2col(x, kernel, stride=1, padding=0):
    """(B, C, H, W) -> (B, OH*OW, KH*KW*C): every kernel window flattened into a row."""
    return Im2Col(kernel, stride, padding)(x)


def col2im(cols, image_shape, kernel, stride=1, padding=0):
    """(B, OH*OW, KH*KW*C) -> image_shape (B, C, H, W), summing overlapping windows;
    the adjoint (and backward) of im2col."""
    return Col2Im(image_shape, kernel, stride, padding)(cols)


# --- patches -----------------------------------------------------------------------------

def _patch_grid(image_shape, patch_size):
    """(P, Q, H // P, W // Q) for images of shape (B, C, H, W) cut into P x Q patches."""
    p, q = _pair(patch_size, "patch_size")
    if len(image_shape) != 4:
        raise ValueError(f"expected an image batch of shape (B, C, H, W), got shape "
                         f"{tuple(image_shape)}")
    H, W = image_shape[2], image_shape[3]
    if p < 1 or q < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")
    if H % p or W % q:
        raise ValueError(f"image height H={H} and width W={W} must be multiples of the "
                         f"patch size P={patch_size}")
    return p, q, H // p, W // q


def patchify(x, patch_size):
    """(B, C, H, W) -> (B, N, P*P*C), N = HW/P^2: the paper's x_p, one flattened patch per row.

    Equal to im2col(x, kernel=P, stride=P); because the patches do not overlap it is
    only a reshape and a transpose (both differentiable engine ops), no copying loop:
    (B, C, H/P, P, W/P, P) -> (B, H/P, W/P, P, P, C) -> (B, N, P*P*C).
    """
    x = as_tensor(x)
    p, q, gh, gw = _patch_grid(x.shape, patch_size)
    B, C = x.shape[:2]
    x = reshape(x, (B, C, gh, p, gw, q))
    x = transpose(x, (0, 2, 4, 3, 5, 1))                # (B, grid row, grid col, i, j, c)
    return reshape(x, (B, gh * gw, p * q * C))


def unpatchify(patches, image_shape, patch_size):
    """(B, N, P*P*C) -> image_shape (B, C, H, W): the inverse of patchify."""
    patches = as_tensor(patches)
    p, q, gh, gw = _patch_grid(image_shape, patch_size)
    B, C, H, W = image_shape
    if tuple(patches.shape) != (B, gh * gw, p * q * C):
        raise ValueError(f"unpatchify: patches of images {tuple(image_shape)} with patch size "
                         f"{patch_size} have shape {(B, gh * gw, p * q * C)}, got "
                         f"{tuple(patches.shape)}")
    x = reshape(patches, (B, gh, gw, p, q, C))
    x = transpose(x, (0, 5, 1, 3, 2, 4))                # (B, c, grid row, i, grid col, j)
    return reshape(x, (B, C, H, W))


# --- convolution and the patch embedding ---------------------------------------------------

def conv2d(x, weight, bias=None, stride=1, padding=0):
    """2-D convolution (cross-correlation, as in every deep-learning library):

        y[b, d, r, s] = sum_{i, j, c} x_pad[b, c, SH*r + i, SW*s + j] weight[i, j, c, d] + bias[d]

    x: (B, C_in, H, W); weight: (KH, KW, C_in, C_out), the Flax/HWIO layout of the
    official ViT code; bias: (C_out,) or None; padding: an int, a pair, "SAME", "VALID"
    or ((top, bottom), (left, right)) (see the module's docstring).  Returns
    (B, C_out, OH, OW).
    The sum over (i, j, c) is a row of im2col(x) times a column of the kernel reshaped
    to (KH*KW*C_in, C_out), so the whole convolution is one matrix product.  It is built
    from differentiable ops, so its backward comes from theirs: dcols = g W^T is
    scattered back by col2im, dW = cols^T g.
    """
    x, weight = as_tensor(x), as_tensor(weight)
    if weight.ndim != 4 or x.ndim != 4 or weight.shape[2] != x.shape[1]:
        raise ValueError(f"conv2d expects x of shape (B, C_in, H, W) and weight of shape "
                         f"(KH, KW, C_in, C_out) with the same C_in, got x {tuple(x.shape)} "
                         f"and weight {tuple(weight.shape)}")
    kh, kw, c_in, c_out = weight.shape
    oh, ow = _geometry(x.shape, (kh, kw), stride, padding)[3]
    cols = im2col(x, (kh, kw), stride, padding)          # (B, OH*OW, KH*KW*C_in)
    # the windows of all images as the rows of one matrix: a single matrix product
    y = matmul(reshape(cols, (-1, kh * kw * c_in)), reshape(weight, (kh * kw * c_in, c_out)))
    y = reshape(y, (x.shape[0], oh * ow, c_out))
    if bias is not None:
        bias = as_tensor(bias)
        if tuple(bias.shape) != (c_out,):
            raise ValueError(f"conv2d: bias must have shape ({c_out},), got {tuple(bias.shape)}")
        y = y + bias
    y = transpose(y, (0, 2, 1))                         # (B, C_out, OH*OW)
    return reshape(y, (x.shape[0], c_out, oh, ow))


def patch_embed(x, E, b, patch_size):
    """The patch embedding of Eq. 1: x_p E + b, (B, C, H, W) -> (B, N, D).

    x_p = patchify(x, P) is (B, N, P*P*C) and E is (P*P*C, D); b (D,) is the bias of the
    official code's embedding (None for none).  Equal to conv2d with kernel = stride = P
    and weight E.reshape(P, P, C, D), flattened over the output grid.
    """
    x = as_tensor(x)
    patches = patchify(x, patch_size)
    E = as_tensor(E)
    if E.ndim != 2 or E.shape[0] != patches.shape[2]:
        raise ValueError(f"patch_embed: E must have shape (P*P*C, D) = ({patches.shape[2]}, D) "
                         f"for P={patch_size} and C={x.shape[1]}, got {tuple(E.shape)}")
    return affine(patches, E, b)            # one (B*N, P*P*C) @ (P*P*C, D) product, plus b
