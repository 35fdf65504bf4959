"""The hybrid's convolutional stem (Sec. 3.1): max pooling and weight standardisation.

The paper's hybrid feeds the Transformer the feature map of a ResNet (BiT's ResNet,
Kolesnikov et al. 2020) instead of raw patches.  Its convolutions are conv2d
(ops/patch.py, with TensorFlow's "SAME" padding) of a weight-standardised kernel,
followed by GroupNorm (ops/norm.py); the root block ends with a 3x3 max pool of
stride 2.  The two operations that are new live here:

    max_pool2d(x)[b, c, r, s] = max_{i, j < 3} x_pad[b, c, 2r + i, 2s + j]      (-inf padding)
    weight_standardize(w) = (w - mean(w)) / (std(w) + 1e-5)     per output channel

Both are built on raw arrays with one batched computation each: max pooling reads its
windows with the same im2col as the convolution.
"""
from minivit import backend
from minivit.autograd import Function
from minivit.ops.patch import _col2im_array, _geometry, _im2col_array

array_module = backend.array_module


class MaxPool2d(Function):
    """y[b, c, r, s] = max over the window (r, s) of x_pad, x_pad being x padded with -inf.

    Forward.  cols = im2col(x) with -inf in the padding holds every window as a row,
    (B, OH*OW, KH*KW, C); y is its maximum over the KH*KW offsets.  The -inf padding can
    never win, so a window at the border is the maximum of its real pixels (with "SAME"
    padding every window holds at least one).

    Backward.  Away from ties, y[b, c, r, s] = x[b, c, h*, w*] for the pixel (h*, w*)
    where the window's maximum sits, so dy/dx is 1 there and 0 at the other pixels of the
    window:  dcols = g at each window's argmax and 0 elsewhere, and dx = col2im(dcols)
    (a pixel that is the maximum of several overlapping windows collects each of their
    gradients; the padding's gradients are dropped).  Where a window holds two equal
    maxima the function has a kink; the gradient then goes to the first of them in the
    window (row-major), as one argmax picks it.
    """

    def __init__(self, kernel=3, stride=2, padding="SAME"):
        self.kernel, self.stride, self.padding = kernel, stride, padding

    def forward(self, x):
        if x.ndim != 4 or not backend.is_floating(x):
            raise ValueError(f"max_pool2d expects floating images of shape (B, C, H, W), got "
                             f"shape {tuple(x.shape)} and dtype {x.dtype}")
        xp = array_module(x)
        (kh, kw), _, pads, (oh, ow) = _geometry(x.shape, self.kernel, self.stride, self.padding)
        if max(pads[0]) >= kh or max(pads[1]) >= kw:
            raise ValueError(f"max_pool2d: padding {pads} would make windows of padding alone "
                             f"for a {(kh, kw)} kernel; pad less than the kernel size")
        B, C = x.shape[:2]
        cols = _im2col_array(x, self.kernel, self.stride, self.padding, fill=-xp.inf)
        cols = cols.reshape(B, oh * ow, kh * kw, C)
        first = cols.argmax(axis=2)                              # (B, OH*OW, C)
        self.is_max = xp.arange(kh * kw)[None, None, :, None] == first[:, :, None, :]
        self.x_shape, self.cols_shape = x.shape, cols.shape
        y = cols.max(axis=2)                                     # (B, OH*OW, C)
        return y.transpose(0, 2, 1).reshape(B, C, oh, ow)

    def backward(self, g):
        B, C = self.x_shape[:2]
        g = g.reshape(B, C, -1).transpose(0, 2, 1)               # (B, OH*OW, C)
        dcols = self.is_max * g[:, :, None, :]                   # g at each window's argmax
        return _col2im_array(dcols.reshape(B, self.cols_shape[1], -1), self.x_shape,
                             self.kernel, self.stride, self.padding)


class WeightStandardize(Function):
    """w_hat = (w - mu) / (s + eps) for a kernel w (KH, KW, C_in, C_out), per output channel.

    mu and s are the mean and the population standard deviation of the n = KH*KW*C_in
    weights of one output channel (Qiao et al. 2019, "Weight Standardization", as BiT and
    the official hybrid use it; eps = 1e-5 is added to s, outside the square root, as in
    the official models_resnet.py).  The stored kernel is free; the convolution always
    sees a kernel with mean 0 and standard deviation ~1 per output channel.

    Backward, per output channel, with c = w - mu, s = sqrt(mean(c^2)), d = s + eps and
    the incoming gradient g = dL/dw_hat:
        dc_i/dw_j = delta_ij - 1/n,     ds/dw_j = c_j / (n s),
        dw_hat_i/dw_j = (delta_ij - 1/n) / d - c_i c_j / (n s d^2),
    and summing g_i times that over i, with c = d w_hat,
        dw = (g - mean(g)) / d - w_hat * mean(g * w_hat) / s.
    As in LayerNorm, the two means take out of g what mu and s absorb; unlike LayerNorm
    the two terms are divided differently (d and s) because eps sits outside the root.
    (A kernel whose channel is constant has s = 0, where the standard deviation has no
    derivative: its gradient is not finite.)
    """

    def __init__(self, eps=1e-5):
        self.eps = eps

    def forward(self, w):
        if w.ndim != 4:
            raise ValueError(f"weight_standardize expects a kernel of shape (KH, KW, C_in, C_out), "
                             f"got shape {tuple(w.shape)}")
        xp = array_module(w)
        centred = w - w.mean(axis=(0, 1, 2), keepdims=True)
        self.s = xp.sqrt((centred * centred).mean(axis=(0, 1, 2), keepdims=True))
        self.d = self.s + self.eps
        self.w_hat = centred / self.d
        return self.w_hat

    def backward(self, g):
        axes = (0, 1, 2)
        return ((g - g.mean(axis=axes, keepdims=True)) / self.d
                - self.w_hat * (g * self.w_hat).mean(axis=axes, keepdims=True) / self.s)


def max_pool2d(x, kernel=3, stride=2, padding="SAME"):
    """Max pooling of images (B, C, H, W): the maximum of every kernel window; "SAME"
    padding (TensorFlow's, with -inf) keeps ceil(H / stride) rows, as the official root
    block's 3x3 stride-2 pool does."""
    return MaxPool2d(kernel, stride, padding)(x)


def weight_standardize(w, eps=1e-5):
    """(w - mean) / (std + eps) over (KH, KW, C_in), for each output channel of w."""
    return WeightStandardize(eps)(w)
