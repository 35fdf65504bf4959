"""The Vision Transformer: patches in, class scores out (Eq. 1-4).

Everything is in place; the model of Section 3.1 is four lines:

    z_0  = [x_class; x_p^1 E; ...; x_p^N E] + E_pos     (Eq. 1)  embed patches, add positions
    z'_l = MSA(LN(z_{l-1})) + z_{l-1},   l = 1..L       (Eq. 2)  } L encoder blocks
    z_l  = MLP(LN(z'_l)) + z'_l,         l = 1..L       (Eq. 3)  } (lesson 11)
    y    = LN(z_L^0)                                    (Eq. 4)  the [CLS] token's output

and a Linear head maps y to K class scores.  The shapes, for B images of C x H x W
in patches of P x P, N = HW / P^2 of them:

    images (B, C, H, W) -> patches x_p (B, N, P^2 C) -> x_p E (B, N, D)
    -> [x_class; ...] (B, N+1, D) -> + E_pos -> L blocks (B, N+1, D)
    -> token 0 (B, D) -> LN -> head (B, K)

The learned parameters: E (P^2 C x D) and its bias, x_class (D), E_pos ((N+1) x D),
L blocks of 12 D^2 + 13 D parameters (with M = 4D), the final LN (2D) and the head
(D K + K).  For ViT-B/16 on 224 x 224 ImageNet images that is "86M" in Table 1.
"""
import matplotlib.pyplot as plt
import numpy as np

from common import Lesson

import minivit as mv

lesson = Lesson("12", "the Vision Transformer", __doc__)
rng = np.random.default_rng(0)


# --- 1. Counting parameters from the shapes alone ----------------------------------------
def breakdown(c):
    """Parameters of a ViTConfig by part, from Eq. 1-4 (no arrays are made)."""
    D, M, P, N = c.hidden_size, c.mlp_dim, c.patch_size, c.num_patches
    block = 2 * D + (D * 3 * D + 3 * D) + (D * D + D) + 2 * D + (D * M + M) + (M * D + D)
    return {"embedding (E, x_class, E_pos)": P * P * c.in_channels * D + D + D + (N + 1) * D,
            "encoder blocks": c.depth * block,
            "final LN and head": 2 * D + D * c.num_classes + c.num_classes}


TABLE_1 = {"B/16": 86e6, "L/16": 307e6, "H/14": 632e6}
lesson.say("1. Parameters at 224 x 224 with 1000 classes (Table 1 gives 86M, 307M, 632M):",
           f"   {'model':<6} {'embedding':>12} {'blocks':>14} {'LN + head':>10} "
           f"{'total':>14} {'Table 1':>8}")
parts = {}
for name, table in TABLE_1.items():
    config = mv.nn.preset(name)
    parts[name] = breakdown(config)
    total = mv.nn.count_parameters(config)
    embedding, blocks, head = parts[name].values()
    lesson.say(f"   {name:<6} {embedding:>12,} {blocks:>14,} {head:>10,} {total:>14,} "
               f"{table / 1e6:>7.0f}M")
    lesson.expect(f"{name}: the parts add up to mv.nn.count_parameters",
                  sum(parts[name].values()) == total)
    lesson.expect(f"{name}: within 1% of Table 1", abs(total / table - 1) < 0.01,
                  f"{total / 1e6:.1f}M vs {table / 1e6:.0f}M")
lesson.expect("ViT-B/16 has exactly 86,567,656 parameters",
              mv.nn.count_parameters(mv.nn.preset("B/16")) == 86_567_656)
lesson.say("   (Table 1 lists 307M for ViT-L; its layers add up to 304.3M, the figure timm "
           "reports too.)")

fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4), gridspec_kw={"width_ratios": [3, 2]})
names, width = list(parts), 0.27
for i, part in enumerate(parts["B/16"]):
    counts = [parts[name][part] for name in names]
    bars = left.barh(np.arange(3) + (i - 1) * width, counts, width, label=part)
    left.bar_label(bars, [f"{n / 1e6:.2f}M" for n in counts], padding=3, fontsize=8)
left.set(xscale="log", xlim=(1e5, 3e9), yticks=range(3), yticklabels=names,
         xlabel="parameters (log scale)", title="ViT-B/16, L/16, H/14: almost all in the blocks")
left.invert_yaxis()
left.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, fontsize=9)
D, M = 768, 3072                                       # one block of ViT-B/16
block = {"LN (x2)": 4 * D, "U_qkv": 3 * D * D + 3 * D, "U_msa": D * D + D,
         "MLP W_1": D * M + M, "MLP W_2": M * D + D}
bars = right.bar(list(block), np.array(list(block.values())) / 1e6,
                 color=["C7", "C0", "C0", "C1", "C1"])
right.bar_label(bars, [f"{100 * n / sum(block.values()):.2g}%" for n in block.values()])
right.set(ylabel="parameters (millions)", ylim=(0, 2.8),
          title="One ViT-B/16 block: 1/3 attention, 2/3 MLP")
fig.tight_layout()
lesson.figure(fig, "vit_parameters.png")

# --- 2. A tiny ViT, assembled by hand from Eq. 1-4 ---------------------------------------
config = mv.nn.ViTConfig(image_size=8, patch_size=4, num_classes=3, hidden_size=8,
                         depth=2, num_heads=2, mlp_dim=16)
model = mv.nn.VisionTransformer(config, seed=0).astype("float64")
for p in model.parameters():     # the head starts at zero, which would zero every gradient
    p.data += mv.tensor(0.1 * rng.standard_normal(p.shape)).data
images = mv.tensor(rng.standard_normal((2, 3, 8, 8)), requires_grad=True)


def vit_by_hand(images, model):
    c = model.config
    B = images.shape[0]
    x_p = mv.patchify(images, c.patch_size)                              # (B, N, P^2 C)
    tokens = x_p @ model.patch_embed.kernel + model.patch_embed.bias     # (B, N, D)
    x_class = model.cls_token.broadcast_to((B, 1, c.hidden_size))        # (B, 1, D)
    z = mv.concatenate([x_class, tokens], axis=1) + model.pos_embed      # Eq. 1 (B, N+1, D)
    for block in model.blocks:
        z = block(z)                                                     # Eq. 2-3
    # Eq. 4: LN of the [CLS] output; the library normalises every token and then takes
    # token 0, the same thing, since LayerNorm works on each token alone (lesson 09)
    y = mv.layer_norm(z[:, 0], model.norm.scale, model.norm.bias)        # (B, D)
    return y @ model.head.weight + model.head.bias                       # (B, K)


lesson.say("", f"2. A tiny ViT: {config.image_size} x {config.image_size} images, "
               f"{config.patch_size} x {config.patch_size} patches (N = {config.num_patches}), "
               f"D = {config.hidden_size}, {config.num_heads} heads, L = {config.depth}, "
               f"K = {config.num_classes} classes")
logits = vit_by_hand(images, model)
lesson.say(f"   images {images.shape} -> logits {logits.shape}; "
           f"{model.num_parameters():,} parameters in {len(model.parameters())} arrays")
lesson.expect("count_parameters(config) == the parameters the model holds",
              mv.nn.count_parameters(config) == model.num_parameters())
lesson.same("lesson ViT (Eq. 1-4) == mv.nn.VisionTransformer", logits, model(images))

# --- 3. Gradient check of everything ------------------------------------------------------
lesson.say("", f"3. Gradient check wrt the images and all {len(model.parameters())} parameter "
               f"arrays ({model.num_parameters() + images.size:,} numbers; float64):")
lesson.gradcheck("lesson ViT", lambda images, *params: vit_by_hand(images, model),
                 images, *model.parameters())
lesson.gradcheck("mv.nn.VisionTransformer", lambda images, *params: model(images),
                 images, *model.parameters())
lesson.finish()
