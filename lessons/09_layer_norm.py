"""LayerNorm: every token normalised on its own.

Each encoder block normalises its input before attention and before the MLP, and
the [CLS] output is normalised once more at the end (the LN of Eq. 2, 3 and 4).
For one token x in R^D:

    mu = mean(x),   sigma = sqrt(mean((x - mu)^2) + eps),   x_hat = (x - mu) / sigma
    LN(x) = gamma * x_hat + beta                     (gamma, beta: (D,), learned)

z is (B, T, D) and LN works along the last axis only: each of the B*T tokens gets
its own mu and sigma.  BatchNorm, the norm of CNNs, goes the other way: each of the
D features gets one mu and sigma over the batch (and here the tokens).  So BatchNorm
makes a token's output depend on the other images in the batch, and needs running
averages at test time; LayerNorm gives every image the same output alone or in any
batch.

Backward.  With g = dL/dx_hat = dy * gamma, dmu/dx_j = 1/D and
dsigma/dx_j = x_hat_j / D, the chain rule gives

    dx = (g - mean(g) - x_hat * mean(g * x_hat)) / sigma
    dgamma = sum over tokens of dy * x_hat,      dbeta = sum over tokens of dy.

The two means take out of g what mu and sigma absorb: any shift (along the all-ones
vector) and any rescaling (along x_hat) of x leave x_hat unchanged.
"""
import matplotlib.pyplot as plt
import numpy as np

from common import Lesson

import minivit as mv

lesson = Lesson("09", "LayerNorm", __doc__)
rng = np.random.default_rng(0)
EPS = 1e-6


def layer_norm_by_hand(x, gamma, beta, eps=EPS):
    """Normalise each token (the last axis) with mean, subtract, multiply, sqrt, divide."""
    mu = x.mean(axis=-1, keepdims=True)                   # (B, T, 1)
    centred = x - mu
    sigma = ((centred * centred).mean(axis=-1, keepdims=True) + eps).sqrt()
    x_hat = centred / sigma                               # (B, T, D)
    return x_hat * gamma + beta


def batch_norm_by_hand(x, eps=EPS):
    """BatchNorm for comparison: each feature normalised over the batch and the tokens."""
    mu = x.mean(axis=(0, 1), keepdims=True)               # (1, 1, D)
    centred = x - mu
    sigma = ((centred * centred).mean(axis=(0, 1), keepdims=True) + eps).sqrt()
    return centred / sigma


B, T, D = 8, 5, 16
x = mv.tensor(rng.standard_normal((B, T, D)) * 3 + 1, requires_grad=True)
gamma = mv.tensor(1 + 0.1 * rng.standard_normal(D), requires_grad=True)
beta = mv.tensor(0.1 * rng.standard_normal(D), requires_grad=True)

# --- 1. Forward: the lesson's version and minivit's fused one ----------------------------
lesson.say(f"1. x {x.shape}: LayerNorm normalises each of the {B * T} tokens over its {D} "
           "features.")
y = layer_norm_by_hand(x, gamma, beta)
lesson.same("lesson LayerNorm == mv.layer_norm", y, mv.layer_norm(x, gamma, beta))
module = mv.nn.LayerNorm(D).astype("float64")
module.load_state_dict({"scale": gamma.numpy(), "bias": beta.numpy()})
lesson.same("lesson LayerNorm == mv.nn.LayerNorm", y, module(x))
x_hat = layer_norm_by_hand(x, 1.0, 0.0).numpy()
lesson.expect("every token of x_hat has mean 0 and variance 1",
              np.allclose(x_hat.mean(-1), 0) and np.allclose(x_hat.var(-1), 1, atol=1e-5))

# --- 2. Batch size does not matter to LayerNorm; it does to BatchNorm --------------------
lesson.say("", "2. Image 0 normalised alone, and inside the batch of 8:")
alone, in_batch = layer_norm_by_hand(x[:1], gamma, beta), layer_norm_by_hand(x, gamma, beta)
lesson.same("LayerNorm: image 0 alone == image 0 in the batch", alone, in_batch[:1])
bn_alone, bn_batch = batch_norm_by_hand(x[:1]), batch_norm_by_hand(x)
bn_change = np.abs(bn_alone.numpy() - bn_batch[:1].numpy()).max()
lesson.expect("BatchNorm: image 0's output changes with its batch", bn_change > 0.1,
              f"max difference {bn_change:.2f}")

# A picture: tokens at very different scales, normalised both ways.
scales = np.geomspace(0.2, 5, 12)[:, None]
picture = mv.tensor(rng.standard_normal((1, 12, D)) * scales + scales)     # (1, T=12, D)
panels = {"input z (token scale grows downwards)": picture.numpy()[0],
          "LayerNorm: each row mean 0, std 1": layer_norm_by_hand(picture, 1.0, 0.0).numpy()[0],
          "BatchNorm: each column mean 0, std 1": batch_norm_by_hand(picture).numpy()[0]}
fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)
for ax, (title, values) in zip(axes, panels.items()):
    limit = np.abs(values).max()
    image = ax.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit)
    ax.set(title=title, xlabel="feature (of D = 16)", ylabel="token")
    fig.colorbar(image, ax=ax, shrink=0.8, label="value")
fig.suptitle("Which axis is normalised: LayerNorm over a token's features, "
             "BatchNorm over the tokens (and images) per feature")
lesson.figure(fig, "layernorm_vs_batchnorm.png")

# --- 3. Backward: the formula by hand, autograd, and the fused op ------------------------
lesson.say("", "3. The backward pass three ways, for a random cotangent dy:")
dy = rng.standard_normal(x.shape)
xn, gn = x.numpy(), gamma.numpy()
mu = xn.mean(-1, keepdims=True)
sigma = np.sqrt(((xn - mu) ** 2).mean(-1, keepdims=True) + EPS)
xh = (xn - mu) / sigma
g = dy * gn                                                   # dL/dx_hat
formula = {"x": (g - g.mean(-1, keepdims=True) - xh * (g * xh).mean(-1, keepdims=True)) / sigma,
           "gamma": (dy * xh).sum(axis=(0, 1)),
           "beta": dy.sum(axis=(0, 1))}
for name, fn in (("autograd through the lesson's primitives", layer_norm_by_hand),
                 ("mv.layer_norm's hand-written backward", mv.layer_norm)):
    for t in (x, gamma, beta):
        t.grad = None
    fn(x, gamma, beta).backward(mv.tensor(dy))
    for wrt, t in (("x", x), ("gamma", gamma), ("beta", beta)):
        lesson.same(f"d{wrt}: formula == {name}", formula[wrt], t.grad)

# --- 4. Gradient check -------------------------------------------------------------------
lesson.say("", "4. Gradient checks wrt x, gamma, beta (float64, central differences):")
x_small = mv.tensor(rng.standard_normal((2, 3, 6)), requires_grad=True)
gamma_small = mv.tensor(1 + 0.1 * rng.standard_normal(6), requires_grad=True)
beta_small = mv.tensor(0.1 * rng.standard_normal(6), requires_grad=True)
for name, fn in (("lesson LayerNorm", layer_norm_by_hand), ("mv.layer_norm", mv.layer_norm)):
    lesson.gradcheck(name, fn, x_small, gamma_small, beta_small)
lesson.finish()
