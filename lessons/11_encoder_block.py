"""The Transformer encoder block: attention, then MLP, each on a residual path (Eq. 2-3).

ViT's encoder is L copies of one block.  Each block reads the sequence z (B, T, D)
and writes an update of the same shape, twice:

    z'_l = MSA(LN(z_{l-1})) + z_{l-1}          (Eq. 2)   tokens exchange information
    z_l  = MLP(LN(z'_l)) + z'_l                (Eq. 3)   each token is transformed

"Pre-norm": the LayerNorm sits at the entrance of each branch, and the residual
path z -> z + branch(z) carries z through untouched.  (The original Transformer
normalised after the addition instead.)  The residual path is what lets a deep stack
learn: every block only adds a correction, the gradient flows back along the
identity, and, as part 3 shows, the tokens keep their identity.  Without it,
attention -- which at initialisation averages nearly uniformly over all tokens --
makes every token the same vector within two blocks (Dong et al. 2021, "Attention
is not all you need: pure attention loses rank doubly exponentially with depth").

Shapes: z (B, T, D) -> LN -> MSA (lesson 08) -> (B, T, D), add; -> LN -> MLP
(lesson 10: D -> M -> D) -> (B, T, D), add.  Parameters per block:
2D (LN) + 3D^2 + 3D (U_qkv) + D^2 + D (U_msa) + 2D (LN) + 2DM + M + D (MLP).
"""
import matplotlib.pyplot as plt
import numpy as np

from common import Lesson

import minivit as mv

lesson = Lesson("11", "the encoder block", __doc__)
rng = np.random.default_rng(0)


def make_block(hidden_size, num_heads, mlp_dim, seed=0):
    config = mv.nn.ViTConfig(hidden_size=hidden_size, num_heads=num_heads, mlp_dim=mlp_dim)
    return mv.nn.EncoderBlock(config, mv.backend.generator(seed, "cpu"),
                              mv.nn.RandomSource(seed)).astype("float64")


def block_by_hand(z, b, num_heads):
    """Eq. 2-3 from the library's pieces, reading the parameters of EncoderBlock b."""
    h = mv.layer_norm(z, b.norm1.scale, b.norm1.bias)                       # LN
    a = mv.multi_head_attention(h, b.attn.qkv.weight, b.attn.qkv.bias,      # MSA
                                b.attn.out.weight, b.attn.out.bias, num_heads)
    z = a + z                                                               # Eq. 2
    h = mv.layer_norm(z, b.norm2.scale, b.norm2.bias)                       # LN
    m = mv.gelu(h @ b.mlp.fc1.weight + b.mlp.fc1.bias)                      # MLP: D -> M
    m = m @ b.mlp.fc2.weight + b.mlp.fc2.bias                               #      M -> D
    return m + z                                                            # Eq. 3


# --- 1. The block by hand == mv.nn.EncoderBlock ------------------------------------------
B, T, D, heads, M = 2, 5, 8, 2, 16
block = make_block(D, heads, M)
for p in block.parameters():          # move off the initial values (zero biases, gamma = 1)
    p.data += mv.tensor(0.1 * rng.standard_normal(p.shape)).data
z = mv.tensor(rng.standard_normal((B, T, D)), requires_grad=True)
lesson.say(f"1. One block, D = {D}, {heads} heads, MLP width {M}: z {z.shape} -> "
           f"{block_by_hand(z, block, heads).shape}")
for name, p in block.named_parameters():
    lesson.say(f"   {name:<16} {p.shape}")
n = block.num_parameters()
formula = 2 * D + 3 * D * D + 3 * D + D * D + D + 2 * D + 2 * D * M + M + D
lesson.expect("parameters: 2D + 3D^2 + 3D + D^2 + D + 2D + 2DM + M + D", n == formula,
              f"{n} = {formula}")
lesson.same("lesson block (Eq. 2-3) == mv.nn.EncoderBlock", block_by_hand(z, block, heads),
            block(z))

# --- 2. Gradient check of the whole block ------------------------------------------------
lesson.say("", "2. Gradient check wrt z and all 12 parameter arrays "
               f"({n + z.size} numbers; float64, central differences):")
lesson.gradcheck("lesson block", lambda z, *params: block_by_hand(z, block, heads),
                 z, *block.parameters())
lesson.gradcheck("mv.nn.EncoderBlock", lambda z, *params: block(z), z, *block.parameters())

# --- 3. Why the residual path: tokens through a stack of 12 blocks -----------------------
lesson.say("", "3. Twelve blocks (D = 32, 4 heads), with and without the residual additions:")
D, heads, depth = 32, 4, 12
stack = [make_block(D, heads, 4 * D, seed) for seed in range(depth)]


def without_residuals(z, b):
    return b.mlp(b.norm2(b.attn(b.norm1(z))))


def token_similarity(z):
    """Mean cosine similarity between different tokens of the same image."""
    z = z.numpy()
    unit = z / np.linalg.norm(z, axis=-1, keepdims=True)
    cos = unit @ unit.transpose(0, 2, 1)                   # (B, T, T)
    t = cos.shape[-1]
    return ((cos.sum(axis=(1, 2)) - t) / (t * (t - 1))).mean()


z0 = mv.tensor(rng.standard_normal((4, 17, D)))
similarity = {}
for name, step in (("with residuals (Eq. 2-3)", lambda z, b: b(z)),
                   ("without residuals", without_residuals)):
    z, similarity[name] = z0, [token_similarity(z0)]
    for b in stack:
        z = step(z, b)
        similarity[name].append(token_similarity(z))
    lesson.say(f"   {name:<26} token similarity after blocks 0, 1, 2, 12: "
               + ", ".join(f"{similarity[name][i]:.2f}" for i in (0, 1, 2, depth)))
with_res, without = similarity.values()
lesson.expect("without residuals the tokens collapse to one vector", without[-1] > 0.99)
lesson.expect("with them they stay distinct", with_res[-1] < 0.9)

fig, ax = plt.subplots(figsize=(7, 4))
for name, values in similarity.items():
    ax.plot(range(depth + 1), values, "o-", label=name)
ax.set(xlabel="blocks applied", ylabel="mean cosine similarity between tokens",
       ylim=(-0.05, 1.05), xticks=range(0, depth + 1, 2),
       title="Random-initialised encoder: residuals keep tokens apart")
ax.grid(alpha=0.3)
ax.legend()
lesson.figure(fig, "residual_token_similarity.png")
lesson.finish()
