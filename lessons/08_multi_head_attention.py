"""Multi-head self-attention: split, attend, merge.

One attention head mixes tokens by one notion of similarity.  Multi-head
self-attention (MSA, the paper's Appendix A) runs k heads side by side, each with
its own queries, keys and values of width D_h = D / k, and mixes their outputs with
one more matrix:

    [q, k, v] = z U_qkv,        U_qkv: (D, 3D) for all heads      (Eq. 5)
    SA_h(z) = softmax(q_h k_h^T / sqrt(D_h)) v_h,   h = 1..k       (Eq. 6-7)
    MSA(z) = [SA_1(z); SA_2(z); ...; SA_k(z)] U_msa,  U_msa: (D, D) (Eq. 8)

Shapes for a batch of B sequences of T tokens:

    z (B, T, D) --U_qkv--> (B, T, 3D) --cut--> q, k, v each (B, T, D)
      --split heads--> (B, k, T, D_h) --attention--> (B, k, T, D_h)
      --merge heads--> (B, T, D) --U_msa--> (B, T, D)

Columns of U_qkv: [q | k | v], D columns each, and within each block head after head
(column s*D + h*D_h + j is feature j of head h of q, k or v).  "Split heads" is then
a reshape (B, T, k, D_h) and a swap of the token and head axes: the heads become a
batch axis, and all k attentions run in one batched matmul.
"""
import math

import matplotlib.pyplot as plt
import numpy as np

from common import Lesson

import minivit as mv

lesson = Lesson("08", "multi-head self-attention", __doc__)
rng = np.random.default_rng(0)
B, T, D, heads = 2, 5, 8, 2
d_h = D // heads


def attend(q, k, v):
    """softmax(q k^T / sqrt(D_h)) v over the last two axes (lesson 07)."""
    return mv.softmax(q @ k.swapaxes(-1, -2) / math.sqrt(q.shape[-1]), axis=-1) @ v


# --- Eq. 8 as written: one head at a time ------------------------------------------------
def msa_head_by_head(z, w_qkv, b_qkv, w_out, b_out, heads):
    """Each head reads its own D_h columns of q, k and v; the outputs are concatenated."""
    D = z.shape[-1]
    d_h = D // heads
    qkv = z @ w_qkv + b_qkv                                  # (B, T, 3D)      Eq. 5
    outputs = []
    for h in range(heads):
        q, k, v = (qkv[..., s * D + h * d_h: s * D + (h + 1) * d_h] for s in range(3))
        outputs.append(attend(q, k, v))                      # (B, T, D_h)    Eq. 6-7
    return mv.concatenate(outputs, axis=-1) @ w_out + b_out  # (B, T, D)      Eq. 8


# --- All heads at once: split, attend, merge ---------------------------------------------
def msa_batched(z, w_qkv, b_qkv, w_out, b_out, heads):
    """The same, with the heads as a batch axis: no loop."""
    B, T, D = z.shape
    d_h = D // heads
    qkv = z @ w_qkv + b_qkv                                  # (B, T, 3D)      Eq. 5
    q, k, v = qkv[..., :D], qkv[..., D:2 * D], qkv[..., 2 * D:]

    def split(x):                                            # (B, T, D) -> (B, k, T, D_h)
        return x.reshape(B, T, heads, d_h).transpose(0, 2, 1, 3)

    out = attend(split(q), split(k), split(v))               # (B, k, T, D_h)  Eq. 6-7
    merged = out.transpose(0, 2, 1, 3).reshape(B, T, D)      # (B, T, k*D_h)  [SA_1; ...; SA_k]
    return merged @ w_out + b_out                            # (B, T, D)      Eq. 8


def randn(*shape, scale=1.0):
    return mv.tensor(scale * rng.standard_normal(shape), requires_grad=True)


# --- 1. Both ways, and the library's fused version -----------------------------------------
z = randn(B, T, D)
w_qkv, b_qkv = randn(D, 3 * D, scale=D ** -0.5), randn(3 * D, scale=0.1)
w_out, b_out = randn(D, D, scale=D ** -0.5), randn(D, scale=0.1)
weights = (w_qkv, b_qkv, w_out, b_out)

lesson.say(f"1. z {z.shape}, {heads} heads of width D_h = {d_h}: U_qkv {w_qkv.shape}, "
           f"U_msa {w_out.shape}")
one_by_one = msa_head_by_head(z, *weights, heads)
batched = msa_batched(z, *weights, heads)
library = mv.multi_head_attention(z, *weights, num_heads=heads)
lesson.same("head by head (Eq. 8 as written) == split/attend/merge", one_by_one, batched)
lesson.same("lesson MSA == mv.multi_head_attention", batched, library)

# --- 2. The module: the same function holding its own parameters --------------------------
lesson.say("", "2. The module mv.nn.MultiHeadSelfAttention holds U_qkv and U_msa as two Linear "
               "layers; copy our weights into it:")
module = mv.nn.MultiHeadSelfAttention(D, heads, attention_dropout=0.0,
                                      rng=mv.backend.generator(0, "cpu"),
                                      random_source=mv.nn.RandomSource(0))
module.astype("float64")
names = ("qkv.weight", "qkv.bias", "out.weight", "out.bias")
module.load_state_dict({name: w.numpy() for name, w in zip(names, weights)})
for name, p in module.named_parameters():
    lesson.say(f"   {name:<11} {p.shape}")
lesson.same("lesson MSA == mv.nn.MultiHeadSelfAttention", batched, module(z))

# --- Pictures: the columns of U_qkv, and what the heads look at ---------------------------
fig, ax = plt.subplots(figsize=(12, 1.6))
D_fig, heads_fig = 12, 3
d_fig = D_fig // heads_fig
column_head = (np.arange(3 * D_fig) % D_fig) // d_fig     # the head of each column
ax.imshow(column_head[None, :], cmap="Pastel1", aspect="auto", vmin=0, vmax=8)
for s, name in enumerate("qkv"):
    ax.axvline(s * D_fig - 0.5, color="k", lw=2)
    for h in range(heads_fig):
        ax.text(s * D_fig + h * d_fig + (d_fig - 1) / 2, 0, f"{name}, head {h + 1}",
                ha="center", va="center")
ax.set(yticks=[], xticks=range(0, 3 * D_fig, d_fig), xlabel="column of U_qkv (and of z U_qkv)",
       title=f"The columns of U_qkv for D = {D_fig}, {heads_fig} heads of D_h = {d_fig}: "
             "[q | k | v], head after head")
lesson.figure(fig, "qkv_columns.png")

z_map = mv.tensor(rng.standard_normal((1, 8, 16)))         # one sequence of 8 tokens, D = 16
w_qkv_map = mv.tensor(0.5 * rng.standard_normal((16, 48)))
w_out_map = mv.tensor(0.25 * rng.standard_normal((16, 16)))
_, maps = mv.multi_head_attention(z_map, w_qkv_map, None, w_out_map, None, num_heads=4,
                                  return_weights=True)
maps = maps.numpy()[0]                                      # (heads, T, T)
fig, axes = plt.subplots(1, 4, figsize=(14, 3.8), constrained_layout=True)
for h, ax in enumerate(axes):
    image = ax.imshow(maps[h], cmap="viridis", vmin=0, vmax=1)
    ax.set(title=f"head {h + 1}", xlabel="key token", ylabel="query token" if h == 0 else None)
fig.colorbar(image, ax=axes, label="attention weight", shrink=0.85)
fig.suptitle("Four heads of one MSA layer (random weights, D = 16, D_h = 4): "
             "each head has its own attention map")
lesson.figure(fig, "attention_heads.png")

# --- 3. Gradient checks ------------------------------------------------------------------
lesson.say("", "3. Gradient checks wrt z, U_qkv, b_qkv, U_msa, b_msa (float64, central "
               "differences):")
lesson.gradcheck("lesson MSA (split/attend/merge)",
                 lambda *a: msa_batched(*a, heads), z, *weights)
lesson.gradcheck("mv.multi_head_attention",
                 lambda *a: mv.multi_head_attention(*a, num_heads=heads), z, *weights)
lesson.gradcheck("mv.nn.MultiHeadSelfAttention (its parameters in place)",
                 lambda z, *params: module(z), z, *module.parameters())
lesson.finish()
