"""The Vision Transformer, as in Section 3.1 of the paper (Eq. 1-4).

    z_0  = [x_class; x_p^1 E; ...; x_p^N E] + E_pos       (1)  patch + position embedding
    z'_l = MSA(LN(z_{l-1})) + z_{l-1},     l = 1..L        (2)  attention, pre-norm, residual
    z_l  = MLP(LN(z'_l)) + z'_l,           l = 1..L        (3)  MLP, pre-norm, residual
    y    = LN(z_L^0)                                       (4)  the [CLS] output, normalised

followed by the classification head (a Linear layer, zero at first; optionally a
"pre-logits" Linear + tanh before it).  Details the paper leaves open follow the
official code (google-research/vision_transformer): LayerNorm eps 1e-6, [CLS] at
position 0, learned 1D position embeddings ~ N(0, 0.02^2), dropout after the
embeddings, after attention and inside the MLP, and the final LayerNorm applied to
every token.  With patch_dropout > 0 each training image keeps only a random part of
its patch tokens (PatchDropout, Liu et al. 2022; not in the paper), a cheaper step at
the same model.  With classifier="gap" there is no [CLS] token: the head reads the mean
of the N patch outputs (the paper's Appendix D.3); with fc_norm=True (timm's order for
average pooling) the final LayerNorm normalises that mean instead of every token.

The hybrid (Sec. 3.1, "Hybrid Architecture"; resnet_layers not None) runs a ResNet stem
(nn/resnet.py) first and embeds patches of its feature map instead of the image's; the
rest of the model is unchanged.
"""
import math
from dataclasses import asdict, dataclass, replace

from minivit import backend
from minivit.nn.layers import (GELU, Dropout, LayerNorm, Linear, PatchDropout, RandomSource,
                               host_generator, normal, param, zeros)
from minivit.nn.module import Module, Parameter
from minivit.nn.resnet import (GROUPS, ResNetStem, count_stem_parameters, feature_size,
                               resnet_width, stem_channels)
from minivit.ops.activation import GELU_APPROXIMATIONS, dropout_mask
from minivit.ops.attention import self_attention
from minivit.ops.basic import broadcast_to, concatenate, tanh
from minivit.ops.patch import patch_embed

CLASSIFIERS = ("token", "gap")
POSITION_EMBEDDINGS = ("learned", "sincos2d", "none")


@dataclass(frozen=True)
class ViTConfig:
    """Everything that fixes a model's shape and behaviour (the names of Table 1)."""
    image_size: int = 224
    patch_size: int = 16
    num_classes: int = 1000
    hidden_size: int = 768          # D
    depth: int = 12                 # L, the number of encoder blocks
    num_heads: int = 12             # k
    mlp_dim: int = 3072             # the MLP's hidden width
    in_channels: int = 3
    classifier: str = "token"       # "token" ([CLS]) or "gap" (mean of the patch outputs)
    representation_size: int = None  # width of the pre-logits layer, None for none
    pos_embed: str = "learned"      # "learned" (1D), "sincos2d" (fixed) or "none"
    dropout: float = 0.0
    attention_dropout: float = 0.0
    patch_dropout: float = 0.0      # the share of patch tokens each training image drops
    gelu: str = "erf"               # "erf" (exact) or "tanh" (the official code's)
    resnet_layers: tuple = None     # None: pure ViT; a tuple: the hybrid's ResNet stages
                                    # (units per stage; () for the root block alone)
    width_factor: float = 1.0       # the ResNet's width is int(64 * width_factor)
    layer_norm_eps: float = 1e-6    # every LayerNorm's eps (1e-12 in Hugging Face's ViT configs)
    qkv_bias: bool = True           # False: q, k, v have no bias (U_qkv alone)
    fc_norm: bool = False           # "gap" only: the final LayerNorm normalises the mean of
                                    # the patch outputs instead of every token (timm's fc_norm)

    def __post_init__(self):
        def fail(what):
            raise ValueError(f"ViTConfig: {what}")
        if self.resnet_layers is not None:             # a list (e.g. from JSON) -> tuple
            layers = self.resnet_layers
            if (not isinstance(layers, (tuple, list)) or not all(
                    isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in layers)):
                fail(f"resnet_layers must be None (a pure ViT) or a tuple of unit counts >= 1 "
                     f"(() for the root block alone), got {layers!r}")
            object.__setattr__(self, "resnet_layers", tuple(layers))
            width = resnet_width(self.width_factor)
            if width < GROUPS or width % GROUPS:
                fail(f"the ResNet width int(64 * width_factor) = {width} must be a positive "
                     f"multiple of the {GROUPS} GroupNorm groups (width_factor "
                     f"{self.width_factor})")
        if self.feature_size % self.patch_size:
            what = (f"image_size {self.image_size}" if self.resnet_layers is None else
                    f"the ResNet's {self.feature_size}x{self.feature_size} feature map (from "
                    f"{self.image_size} px images)")
            fail(f"{what} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            fail(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.classifier not in CLASSIFIERS:
            fail(f"classifier must be one of {CLASSIFIERS}, got {self.classifier!r}")
        if self.pos_embed not in POSITION_EMBEDDINGS:
            fail(f"pos_embed must be one of {POSITION_EMBEDDINGS}, got {self.pos_embed!r}")
        if self.pos_embed == "sincos2d" and self.hidden_size % 4:
            fail(f"sincos2d position embeddings need hidden_size divisible by 4, "
                 f"got {self.hidden_size}")
        for name in ("dropout", "attention_dropout", "patch_dropout"):
            p = getattr(self, name)
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
                fail(f"{name} must be a fraction in [0, 1), got {p!r}")
        if self.gelu not in GELU_APPROXIMATIONS:
            fail(f"gelu must be one of {GELU_APPROXIMATIONS}, got {self.gelu!r}")
        if not self.layer_norm_eps > 0:
            fail(f"layer_norm_eps must be positive, got {self.layer_norm_eps!r}")
        if self.fc_norm and self.classifier != "gap":
            fail(f"fc_norm (LayerNorm after the mean of the patch outputs) needs classifier "
                 f"'gap', got {self.classifier!r}")

    @property
    def hybrid(self):
        return self.resnet_layers is not None

    @property
    def feature_size(self):
        """Side of what the patch embedding cuts into patches: the image, or the hybrid's
        feature map (image_size / 4 for the root alone, / 16 for R50's 3 stages, ...)."""
        if self.resnet_layers is None:
            return self.image_size
        return feature_size(self.image_size, self.resnet_layers)

    @property
    def embed_channels(self):
        """Channels of what the patch embedding reads: the image's, or the feature map's."""
        if self.resnet_layers is None:
            return self.in_channels
        return stem_channels(resnet_width(self.width_factor), self.resnet_layers)

    @property
    def grid_size(self):
        """Patches per side: sqrt(N)."""
        return self.feature_size // self.patch_size

    @property
    def num_patches(self):
        return self.grid_size ** 2

    @property
    def num_tokens(self):
        return self.num_patches + (self.classifier == "token")


def _model(hidden_size, depth, num_heads, mlp_dim, patch_size, **overrides):
    return dict(hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_dim=mlp_dim,
                patch_size=patch_size, **overrides)


# Table 1 of the paper (and Ti/S from the official repository), at 224 px, ImageNet's
# 1000 classes; and small models for CIFAR-10's 32x32 images with 4x4 patches.
PRESETS = {
    "Ti/16": _model(192, 12, 3, 768, 16),
    "S/16": _model(384, 12, 6, 1536, 16),
    "B/16": _model(768, 12, 12, 3072, 16),
    "B/32": _model(768, 12, 12, 3072, 32),
    "L/16": _model(1024, 24, 16, 4096, 16),
    "L/32": _model(1024, 24, 16, 4096, 32),
    "H/14": _model(1280, 32, 16, 5120, 14),
    "cifar-tiny": _model(64, 4, 4, 128, 4, image_size=32, num_classes=10),
    "cifar-small": _model(192, 6, 3, 384, 4, image_size=32, num_classes=10),
    "cifar-base": _model(384, 7, 12, 384 * 3, 4, image_size=32, num_classes=10),
    # The hybrids of the official repository (Sec. 3.1): ResNet stages, then 1x1 patches of
    # the feature map (8x8 for R+Ti/16, whose stem is the root alone: at 224 px its 56x56
    # map gives 7x7 tokens, as a /32 model, despite the name).
    "R50+B/16": _model(768, 12, 12, 3072, 1, resnet_layers=(3, 4, 9)),
    "R26+S/32": _model(384, 12, 6, 1536, 1, resnet_layers=(2, 2, 2, 2)),
    "R26+B/32": _model(768, 12, 12, 3072, 1, resnet_layers=(2, 2, 2, 2)),
    "R50+L/32": _model(1024, 24, 16, 4096, 1, resnet_layers=(3, 4, 6, 3)),
    "R+Ti/16": _model(192, 12, 3, 768, 8, resnet_layers=()),
    # CIFAR: the root block alone at width 32 turns 32x32 images into an 8x8 feature map;
    # its 1x1 patches are 64 tokens, as many as cifar-tiny's 4x4 patches, for the same
    # encoder as cifar-tiny.
    "cifar-hybrid": _model(64, 4, 4, 128, 1, image_size=32, num_classes=10, resnet_layers=(),
                           width_factor=0.5),
}


def preset(name, **overrides):
    """The ViTConfig of a named preset (see PRESETS), with any field overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(ViTConfig(**PRESETS[name]), **overrides)


def count_parameters(config):
    """The number of learned parameters of a config, from its shapes alone (nothing allocated)."""
    c = config
    D, M, P = c.hidden_size, c.mlp_dim, c.patch_size
    embed = P * P * c.embed_channels * D + D                  # E and its bias
    if c.hybrid:                                              # the ResNet stem
        embed += count_stem_parameters(c.in_channels, resnet_width(c.width_factor),
                                       c.resnet_layers)
    cls = D if c.classifier == "token" else 0
    pos = c.num_tokens * D if c.pos_embed == "learned" else 0
    block = (2 * D                                            # LN before MSA
             + D * 3 * D + 3 * D * c.qkv_bias + D * D + D     # U_qkv, U_msa and biases
             + 2 * D                                          # LN before MLP
             + D * M + M + M * D + D)                         # the MLP's two layers
    head_in = c.representation_size or D
    pre_logits = D * head_in + head_in if c.representation_size else 0
    head = head_in * c.num_classes + c.num_classes
    return embed + cls + pos + c.depth * block + 2 * D + pre_logits + head


def sincos_2d_position_embedding(grid_size, dim, temperature=10000.0):
    """Fixed 2D sin-cos position embeddings of a grid_size x grid_size patch grid, (N, dim).

    A quarter of the features each are sin(x w), cos(x w), sin(y w), cos(y w) for the
    patch's column x and row y, at frequencies w_k = temperature^(-k / (dim/4 - 1)),
    as in the official big_vision code.
    """
    np_ = backend.module_for("cpu")          # computed once, on the host
    quarter = dim // 4
    omega = 1.0 / temperature ** (np_.arange(quarter) / max(quarter - 1, 1))
    y, x = np_.meshgrid(np_.arange(grid_size), np_.arange(grid_size), indexing="ij")
    x = x.reshape(-1, 1) * omega
    y = y.reshape(-1, 1) * omega
    return np_.concatenate([np_.sin(x), np_.cos(x), np_.sin(y), np_.cos(y)], axis=1)


# --- the blocks -----------------------------------------------------------------------

class PatchEmbedding(Module):
    """x_p E + b: every P x P patch, flattened as (row, column, channel), mapped to D (Eq. 1)."""

    def __init__(self, patch_size, in_channels, hidden_size, rng):
        fan_in = patch_size * patch_size * in_channels
        self.patch_size = patch_size
        self.kernel = param(normal(rng, (fan_in, hidden_size), math.sqrt(1 / fan_in)))
        self.bias = param(zeros((hidden_size,)))

    def forward(self, images):
        return patch_embed(images, self.kernel, self.bias, self.patch_size)


class MultiHeadSelfAttention(Module):
    """MSA(z) = [SA_1(z); ...; SA_k(z)] U_msa with [q, k, v] = z U_qkv (Appendix A).

    With keep_weights set, each forward pass leaves its attention weights A
    (B, heads, T, T) on `self.weights` (VisionTransformer.features sets it)."""

    def __init__(self, hidden_size, num_heads, attention_dropout, rng, random_source,
                 qkv_bias=True):
        self.num_heads = num_heads
        self.attention_dropout = attention_dropout
        self.random_source = random_source
        self.qkv = Linear(hidden_size, 3 * hidden_size, rng, bias=qkv_bias)   # U_qkv: (D, 3D)
        self.out = Linear(hidden_size, hidden_size, rng)            # U_msa: (D, D)
        self.keep_weights, self.weights = False, None

    def forward(self, z):
        B, T, D = z.shape
        mask = None
        if self.training and self.attention_dropout > 0:
            mask = dropout_mask(self.random_source.get(z.device), (B, self.num_heads, T, T),
                                self.attention_dropout, z.dtype)
        heads = self_attention(self.qkv(z), self.num_heads, mask,
                               return_weights=self.keep_weights)    # Eq. 5-7, heads merged
        if self.keep_weights:
            heads, self.weights = heads
        return self.out(heads)                                      # Eq. 8


class MLP(Module):
    """Linear(D -> M), GELU, dropout, Linear(M -> D), dropout (the paper's Eq. 3 MLP)."""

    def __init__(self, hidden_size, mlp_dim, dropout, gelu, rng, random_source):
        self.fc1 = Linear(hidden_size, mlp_dim, rng, bias_std=1e-6)
        self.act = GELU(gelu)
        self.drop1 = Dropout(dropout, random_source)
        self.fc2 = Linear(mlp_dim, hidden_size, rng, bias_std=1e-6)
        self.drop2 = Dropout(dropout, random_source)

    def forward(self, x):
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class EncoderBlock(Module):
    """One Transformer encoder layer with pre-LayerNorm and residuals (Eq. 2-3)."""

    def __init__(self, config, rng, random_source):
        c = config
        self.norm1 = LayerNorm(c.hidden_size, c.layer_norm_eps)
        self.attn = MultiHeadSelfAttention(c.hidden_size, c.num_heads, c.attention_dropout,
                                           rng, random_source, c.qkv_bias)
        self.drop = Dropout(c.dropout, random_source)
        self.norm2 = LayerNorm(c.hidden_size, c.layer_norm_eps)
        self.mlp = MLP(c.hidden_size, c.mlp_dim, c.dropout, c.gelu, rng, random_source)

    def forward(self, z):
        z = self.drop(self.attn(self.norm1(z))) + z                 # Eq. 2
        z = self.mlp(self.norm2(z)) + z                             # Eq. 3
        return z


class VisionTransformer(Module):
    """ViT: NCHW images (B, C, H, W) in, logits (B, num_classes) out.

    Build it from a ViTConfig, a preset name, or keyword arguments:
        VisionTransformer(preset("B/16"))
        VisionTransformer("cifar-small", num_classes=10)
        VisionTransformer(image_size=32, patch_size=4, num_classes=10, hidden_size=192, ...)
    `seed` fixes the initial values (drawn on the host, the same on either backend)
    and the dropout masks.
    """

    def __init__(self, config=None, seed=0, **fields):
        if isinstance(config, str):
            config = preset(config, **fields)
        elif config is None:
            config = ViTConfig(**fields)
        elif fields:
            config = replace(config, **fields)
        self.config = c = config
        rng, self.random_source = host_generator(seed), RandomSource(seed)
        grid = c.grid_size

        self.resnet = None                                 # the hybrid's stem (Sec. 3.1)
        if c.hybrid:
            self.resnet = ResNetStem(c.in_channels, resnet_width(c.width_factor),
                                     c.resnet_layers, rng)
        self.patch_embed = PatchEmbedding(c.patch_size, c.embed_channels, c.hidden_size, rng)
        self.cls_token = param(zeros((1, 1, c.hidden_size))) if c.classifier == "token" else None
        self.pos_embed = None
        if c.pos_embed == "learned":
            self.pos_embed = param(normal(rng, (1, c.num_tokens, c.hidden_size), 0.02))
        elif c.pos_embed == "sincos2d":                    # fixed: a buffer, not a Parameter
            table = sincos_2d_position_embedding(grid, c.hidden_size)
            if c.classifier == "token":                    # [CLS] gets a zero embedding
                table = backend.module_for("cpu").concatenate([zeros((1, c.hidden_size)), table])
            self.pos_embed = backend.asarray(table[None], dtype="float32")
        self.patch_drop = PatchDropout(c.patch_dropout, self.random_source,
                                       num_prefix=int(c.classifier == "token"))
        self.embed_drop = Dropout(c.dropout, self.random_source)
        self.blocks = [EncoderBlock(c, rng, self.random_source) for _ in range(c.depth)]
        self.norm = LayerNorm(c.hidden_size, c.layer_norm_eps)
        self.pre_logits = None
        if c.representation_size:
            self.pre_logits = Linear(c.hidden_size, c.representation_size, rng,
                                     init="lecun_normal")
        self.head = Linear(c.representation_size or c.hidden_size, c.num_classes, rng,
                           init="zeros")

    def embed(self, images):
        """z_0 of Eq. 1: patch embeddings, the [CLS] token in front, plus E_pos.  A hybrid
        embeds patches of its ResNet's feature map instead of the image's.  In training,
        patch dropout then keeps a random part of the patch tokens (all of them when
        config.patch_dropout is 0)."""
        c = self.config
        if images.ndim != 4 or images.shape[1:] != (c.in_channels, c.image_size, c.image_size):
            raise ValueError(f"VisionTransformer expects images of shape (B, {c.in_channels}, "
                             f"{c.image_size}, {c.image_size}), got {tuple(images.shape)}")
        x = images if self.resnet is None else self.resnet(images)       # (B, C', h, w)
        z = self.patch_embed(x)                                          # (B, N, D)
        if self.cls_token is not None:
            cls = broadcast_to(self.cls_token, (z.shape[0], 1, c.hidden_size))
            z = concatenate([cls, z], axis=1)                            # (B, N+1, D)
        if self.pos_embed is not None:
            z = z + self.pos_embed
        return self.embed_drop(self.patch_drop(z))

    def features(self, images, return_attention=False):
        """The normalised representation the head reads (Eq. 4), (B, D); with
        return_attention=True also each block's attention weights (B, heads, T, T)."""
        for block in self.blocks:
            block.attn.keep_weights, block.attn.weights = return_attention, None
        z = self.embed(images)
        for block in self.blocks:
            z = block(z)
        if self.config.fc_norm:                        # timm's fc_norm: pool, then normalise
            y = self.norm(z.mean(axis=1))
        else:
            z = self.norm(z)
            y = z[:, 0] if self.config.classifier == "token" else z.mean(axis=1)
        if return_attention:
            return y, [block.attn.weights for block in self.blocks]
        return y

    def forward(self, images, return_attention=False):
        """Logits (B, num_classes); with return_attention=True also the attention weights
        of each block, as features gives them."""
        y = self.features(images, return_attention)
        y, maps = y if return_attention else (y, None)
        if self.pre_logits is not None:
            y = tanh(self.pre_logits(y))
        logits = self.head(y)
        return (logits, maps) if return_attention else logits

    def no_weight_decay(self):
        """Parameters that weight decay should leave alone although they have several axes:
        the [CLS] token and the learned position embeddings (as timm and big_vision do)."""
        return [p for p in (self.cls_token, self.pos_embed) if isinstance(p, Parameter)]

    @classmethod
    def from_pretrained(cls, path, num_classes=None, image_size=None, dtype=None, format=None):
        """A model with the weights of a minivit checkpoint, an official .npz, a timm
        .safetensors or a Hugging Face folder (see minivit.pretrained.from_pretrained)."""
        from minivit.pretrained import from_pretrained
        return from_pretrained(path, num_classes=num_classes, image_size=image_size,
                               dtype=dtype, format=format)

    def save_pretrained(self, path, format="minivit", class_names=None, normalization=None):
        """Write this model as format "minivit", "official", "timm" or "hf" (see
        minivit.pretrained.save_pretrained)."""
        from minivit.pretrained import save_pretrained
        return save_pretrained(self, path, format=format, class_names=class_names,
                               normalization=normalization)

    def describe(self):
        c = self.config
        fields = ", ".join(f"{k}={v}" for k, v in asdict(c).items())
        return f"VisionTransformer({fields}): {count_parameters(c):,} parameters"
