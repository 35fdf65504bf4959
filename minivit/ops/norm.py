"""Layer normalisation, the LN of every Transformer block in ViT (Eq. 2-4)."""
from minivit import backend
from minivit.autograd import Function
from minivit.ops.basic import unbroadcast

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
        xp = array_module(x)
        centred = x - x.mean(axis=-1, keepdims=True)
        var = (centred * centred).mean(axis=-1, keepdims=True)
        self.inv_sigma = 1 / xp.sqrt(var + self.eps)
        self.x_hat = centred * self.inv_sigma
        self.gamma = gamma
        self.dtypes = x.dtype, gamma.dtype, beta.dtype
        return self.x_hat * gamma + beta

    def backward(self, dy):
        x_hat, d = self.x_hat, dy.shape[-1]
        g = dy * self.gamma
        dx = (g - g.mean(axis=-1, keepdims=True)
              - x_hat * (g * x_hat).mean(axis=-1, keepdims=True)) * self.inv_sigma
        dgamma = unbroadcast(dy * x_hat, (d,))
        dbeta = unbroadcast(dy, (d,))
        return tuple(grad.astype(dtype, copy=False)
                     for grad, dtype in zip((dx, dgamma, dbeta), self.dtypes))


def layer_norm(x, gamma, beta, eps=1e-6):
    """LayerNorm over the last axis of x: gamma * (x - mean) / sqrt(var + eps) + beta,
    with gamma and beta of shape (D,) for x of shape (..., D)."""
    return LayerNorm(eps)(x, gamma, beta)
