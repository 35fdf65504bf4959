"""Layer normalisation, the LN of every Transformer block in ViT (Eq. 2-4)."""
from minivit import backend, kernels
from minivit.autograd import Function
from minivit.kernels import layernorm as _layernorm_cuda
from minivit.ops.basic import column_sum, row_mean

array_module = backend.array_module


class LayerNorm(Function):
    """y = gamma * x_hat + beta over the last axis (D features), one fused node.

    Forward, for each vector x in R^D (each token of each image):
        mu = mean(x),   sigma = sqrt(mean((x - mu)^2) + eps),   x_hat = (x - mu) / sigma,
        y = gamma * x_hat + beta.                  (eps = 1e-6 as in the official ViT code)

    Backward.  gamma and beta are shared by all leading positions, so their gradients
    sum over them:  dgamma = sum(dy * x_hat),  dbeta = sum(dy)  (over all leading axes).
    For x, let g = dy * gamma = dL/dx_hat.  With dmu/dx_j = 1/D and
    dsigma/dx_j = (x_j - mu) / (D sigma) = x_hat_j / D,
        dx_hat_i/dx_j = (delta_ij - 1/D) / sigma - x_hat_i x_hat_j / (D sigma),
    and summing g_i times that over i,
        dx = (g - mean(g) - x_hat * mean(g * x_hat)) / sigma.
    The two means remove from g its component along the all-ones vector (what mu
    absorbs) and along x_hat (what sigma absorbs).

    layer_norm_forward and layer_norm_backward below are the two passes on raw arrays.
    On the GPU (float32 arrays) both are CUDA kernels instead (layernorm.cu), which keep
    mu and 1/sigma per row and recompute x_hat from x in the backward.
    """

    def __init__(self, eps=1e-6):
        self.eps = eps

    def forward(self, x, gamma, beta):
        if x.ndim == 0:
            raise ValueError("layer_norm needs an input with a feature axis, got a scalar")
        d = x.shape[-1]
        for name, p in (("gamma", gamma), ("beta", beta)):
            if tuple(p.shape) != (d,):
                raise ValueError(f"layer_norm: {name} must have shape ({d},), the size of the "
                                 f"last axis of x (shape {tuple(x.shape)}), got "
                                 f"{tuple(p.shape)}")
        self.gamma = gamma
        self.dtypes = x.dtype, gamma.dtype, beta.dtype
        if kernels.usable(x, gamma, beta) and d <= _layernorm_cuda.MAX_WIDTH:
            self.x, self.x_hat = x, None
            y, self.mu, self.inv_sigma = LAYER_NORM_FORWARD(x, gamma, beta, self.eps)
            return y
        y, self.x_hat, self.inv_sigma = layer_norm_forward(x, gamma, beta, self.eps)
        return y

    def backward(self, dy):
        if self.x_hat is None:
            grads = LAYER_NORM_BACKWARD(dy, self.x, self.gamma, self.mu, self.inv_sigma,
                                        *self.slots())
        else:
            grads = layer_norm_backward(dy, self.x_hat, self.gamma, self.inv_sigma,
                                        *self.slots())
        return tuple(grad.astype(dtype, copy=False) for grad, dtype in zip(grads, self.dtypes))

    def slots(self):
        """Where dgamma and dbeta may be written: the parameters' gradient slots (or None)
        when the graph walk offers them and they have the parameters' dtype."""
        return tuple(self.grad_destination(i) if self.dtypes[i] == self.dtypes[0] else None
                     for i in (1, 2))


def layer_norm_forward(x, gamma, beta, eps):
    """LayerNorm's forward on raw arrays: (y, x_hat, 1/sigma), 1/sigma with a length-1
    last axis."""
    xp = array_module(x)
    centred = x - row_mean(x, keepdims=True)                      # x - mu
    sigma = xp.sqrt(row_mean(centred * centred, keepdims=True) + eps)
    inv_sigma = 1 / sigma
    x_hat = xp.multiply(centred, inv_sigma, out=centred)          # centred is done with
    y = x_hat * gamma
    y += beta
    return y, x_hat, inv_sigma


def layer_norm_backward(dy, x_hat, gamma, inv_sigma, dgamma=None, dbeta=None):
    """LayerNorm's backward on raw arrays: (dx, dgamma, dbeta); dgamma and dbeta written
    into the arrays given, if any."""
    g = dy * gamma                                        # dL/dx_hat
    dx = g - row_mean(g, keepdims=True)                   # dx = (g - mean(g)
    dx -= x_hat * row_mean(g * x_hat, keepdims=True)      #       - x_hat mean(g x_hat))
    dx *= inv_sigma                                       #      / sigma
    dgamma = column_sum(dy * x_hat, out=dgamma)
    dbeta = column_sum(dy, out=dbeta)
    return dx, dgamma, dbeta


# Fast path (GPU): the forward as one kernel that keeps mu and 1/sigma per row (not
# x_hat), the backward as two (dx per row, then the sums of dgamma and dbeta over rows),
# recomputing x_hat from x.  Their references are the two functions above.

def _forward_reference(x, gamma, beta, eps):
    """(y, mu, 1/sigma), mu and 1/sigma of shape x.shape[:-1]."""
    y, _, inv_sigma = layer_norm_forward(x, gamma, beta, eps)
    return y, row_mean(x), inv_sigma[..., 0]


def _backward_reference(dy, x, gamma, mu, inv_sigma, dgamma=None, dbeta=None):
    """(dx, dgamma, dbeta), x_hat recomputed from x, mu and 1/sigma."""
    x_hat = (x - mu[..., None]) * inv_sigma[..., None]
    return layer_norm_backward(dy, x_hat, gamma, inv_sigma[..., None], dgamma, dbeta)


LAYER_NORM_FORWARD = kernels.Kernel("layernorm_forward", "layernorm.cu",
                                    _layernorm_cuda.forward, _forward_reference,
                                    example=_layernorm_cuda.example_forward)
LAYER_NORM_BACKWARD = kernels.Kernel("layernorm_backward", "layernorm.cu",
                                     _layernorm_cuda.backward, _backward_reference,
                                     sample=kernels.leading(0, 1, 3, 4),
                                     example=_layernorm_cuda.example_backward)


def layer_norm(x, gamma, beta, eps=1e-6):
    """LayerNorm over the last axis of x: gamma * (x - mean) / sqrt(var + eps) + beta,
    with gamma and beta of shape (D,) for x of shape (..., D)."""
    return LayerNorm(eps)(x, gamma, beta)


class GroupNorm(Function):
    """GroupNorm (Wu & He 2018), the normalisation of the hybrid's ResNet stem (Sec. 3.1).

    Forward, for an image x (C, H, W) whose C channels form G groups of C/G consecutive
    channels: every group is one vector of n = (C/G) H W values, normalised like a
    LayerNorm vector (mu, sigma = sqrt(var + eps), x_hat = (x - mu) / sigma over the
    group), then each channel c is scaled and shifted:  y = gamma_c * x_hat + beta_c.
    (G = 32 and eps = 1e-6 are Flax's defaults, which the official hybrid uses.)

    Backward.  Within a group this is LayerNorm's derivation with D -> n, except that
    gamma varies across the group's channels; it enters only through g = dy * gamma =
    dL/dx_hat, so the same formula holds with that g:
        dx = (g - mean(g) - x_hat * mean(g * x_hat)) / sigma      (means over the group),
    and gamma, beta are shared by all images and pixels of a channel:
        dgamma_c = sum over (b, h, w) of dy * x_hat,   dbeta_c = sum over (b, h, w) of dy.
    """

    def __init__(self, num_groups=32, eps=1e-6):
        self.num_groups, self.eps = num_groups, eps

    def forward(self, x, gamma, beta):
        G = self.num_groups
        if x.ndim < 2:
            raise ValueError(f"group_norm expects x of shape (B, C, ...) with channels on axis "
                             f"1, got shape {tuple(x.shape)}")
        C = x.shape[1]
        if C % G:
            raise ValueError(f"group_norm: the {C} channels of x (shape {tuple(x.shape)}) do "
                             f"not split into {G} groups")
        for name, p in (("gamma", gamma), ("beta", beta)):
            if tuple(p.shape) != (C,):
                raise ValueError(f"group_norm: {name} must have shape ({C},), one value per "
                                 f"channel of x (shape {tuple(x.shape)}), got {tuple(p.shape)}")
        xp = array_module(x)
        self.x_shape = x.shape
        self.channel = (1, C) + (1,) * (x.ndim - 2)          # gamma as (1, C, 1, 1)
        groups = x.reshape(x.shape[0], G, -1)                 # (B, G, n): a group per row
        centred = groups - groups.mean(axis=-1, keepdims=True)
        var = (centred * centred).mean(axis=-1, keepdims=True)
        self.inv_sigma = 1 / xp.sqrt(var + self.eps)
        self.x_hat = (centred * self.inv_sigma).reshape(x.shape)
        self.gamma = gamma
        self.dtypes = x.dtype, gamma.dtype, beta.dtype
        return self.x_hat * gamma.reshape(self.channel) + beta.reshape(self.channel)

    def backward(self, dy):
        B, G = self.x_shape[0], self.num_groups
        x_hat = self.x_hat.reshape(B, G, -1)
        g = (dy * self.gamma.reshape(self.channel)).reshape(B, G, -1)
        dx = (g - g.mean(axis=-1, keepdims=True)
              - x_hat * (g * x_hat).mean(axis=-1, keepdims=True)) * self.inv_sigma
        over = (0,) + tuple(range(2, dy.ndim))                # every axis but the channel
        dgamma = (dy * self.x_hat).sum(axis=over)
        dbeta = dy.sum(axis=over)
        return tuple(grad.astype(dtype, copy=False) for grad, dtype in
                     zip((dx.reshape(self.x_shape), dgamma, dbeta), self.dtypes))


def group_norm(x, gamma, beta, num_groups=32, eps=1e-6):
    """GroupNorm of x (B, C, ...) over groups of C / num_groups consecutive channels and
    all positions, then gamma_c * x_hat + beta_c with gamma, beta of shape (C,)."""
    return GroupNorm(num_groups, eps)(x, gamma, beta)
