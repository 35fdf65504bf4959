"""The official ViT checkpoints (google-research/vision_transformer): load, save, resize.

The released weights (ViT-B_16.npz, ViT-L_16.npz, the AugReg .npz files, ...) are flat
.npz files of float32 arrays whose keys are the '/'-joined paths of the Flax parameters
(vit_jax/models_vit.py).  With P the patch size, C the channels, D the width, H the heads,
d = D/H, M the MLP width, R the pre-logits width, K the classes, N the patches:

    embedding/kernel                      (P, P, C, D)   the patch embedding, a P x P conv
    embedding/bias                        (D,)              with stride P over NHWC images
    cls                                   (1, 1, D)      only with classifier "token"
    Transformer/posembed_input/pos_embedding   (1, N(+1), D)   absent without position
                                                              embeddings (add_position_embedding=False)
    Transformer/encoderblock_{i}/          i = 0 .. L-1, the names of pre-Linen Flax:
        LayerNorm_0/{scale,bias}          (D,)
        MultiHeadDotProductAttention_1/{query,key,value}/kernel   (D, H, d)
        MultiHeadDotProductAttention_1/{query,key,value}/bias     (H, d)
        MultiHeadDotProductAttention_1/out/kernel                 (H, d, D)
        MultiHeadDotProductAttention_1/out/bias                   (D,)
        LayerNorm_2/{scale,bias}          (D,)
        MlpBlock_3/Dense_0/{kernel,bias}  (D, M), (M,)
        MlpBlock_3/Dense_1/{kernel,bias}  (M, D), (D,)
    Transformer/encoder_norm/{scale,bias} (D,)
    pre_logits/{kernel,bias}              (D, R), (R,)   only with a representation layer
    head/{kernel,bias}                    (R or D, K), (K,)

Flax's Dense and DenseGeneral compute x @ kernel + bias, the layout of minivit's (in, out)
weights, so the mapping is reshapes only: the embedding kernel flattens to (P*P*C, D) rows
ordered (row in patch, column in patch, channel), as minivit's patchify orders a patch;
query, key and value kernels flatten to (D, D) with column h*d + j = feature j of head h,
and stand side by side as [q | k | v] in minivit's (D, 3D) qkv weight; the out kernel
flattens to (D, D) rows in the same head-major order.  The official model runs GELU in
its tanh form (Flax's nn.gelu default) and LayerNorm with eps 1e-6 (Flax's default);
attention scales q by 1/sqrt(d).

Hybrid models (R50+ViT-B_16.npz, R26+ViT-S_32.npz, R+ViT-Ti_16.npz, ...; paper Sec. 3.1)
add a ResNet stem of width w = int(64 * width_factor), whose arrays sit at the top level
of the file, with the names models_vit.py gives the root and the stages (no prefix):

    conv_root/kernel                      (7, 7, C, w)     StdConv, no bias
    gn_root/{scale,bias}                  (w,)             GroupNorm, 32 groups
    block{i}/unit{j}/conv1/kernel         (1, 1, c_in, f)  i = 1.. stages, j = 1.. units,
    block{i}/unit{j}/conv2/kernel         (3, 3, f, f)     f = w 2^(i-1), c_in = the unit's
    block{i}/unit{j}/conv3/kernel         (1, 1, f, 4f)    input channels
    block{i}/unit{j}/gn{1,2,3}/{scale,bias}   (f,), (f,), (4f,)
    block{i}/unit{j}/conv_proj/kernel     (1, 1, c_in, 4f) only where the residual is
    block{i}/unit{j}/gn_proj/{scale,bias} (4f,)            projected (unit1 of each stage)

(older files store the GroupNorm scale and bias as (1, 1, 1, n): they are read as (n,));
the embedding kernel then reads the feature map: (P, P, channels of the feature map, D).
minivit keeps these arrays as they are, under resnet.conv_root.kernel,
resnet.stages.{i-1}.units.{j-1}.conv1.kernel, ... (nn/resnet.py).

Position embeddings for another image size: the official fine-tuning (vit_jax/checkpoint.py,
load_pretrained) keeps the [CLS] row and zooms the sqrt(N) x sqrt(N) grid of patch rows
with scipy.ndimage.zoom(grid, (new/old, new/old, 1), order=1); resize_position_embedding
does the same arithmetic without scipy (see its docstring).
"""
import math
import pathlib
import re
import zipfile
from dataclasses import replace

from minivit import backend
from minivit.checkpoint import atomic_write, check_finite
from minivit.nn.resnet import resnet_width
from minivit.nn.vit import ViTConfig, VisionTransformer

OFFICIAL_GELU = "tanh"          # Flax's nn.gelu(x) is the tanh approximation
POS_KEY = "Transformer/posembed_input/pos_embedding"
ATTN, MLP = "MultiHeadDotProductAttention_1", "MlpBlock_3"
_BLOCK = re.compile(r"^Transformer/encoderblock_(\d+)/")
_HYBRID = re.compile(r"^(conv_root|gn_root|block\d+)/")
_UNIT = re.compile(r"^block(\d+)/unit(\d+)/")
_GROUP_NORM = re.compile(r"^(gn_root|block\d+/unit\d+/gn(1|2|3|_proj))/(scale|bias)$")


def _np():
    return backend.module_for("cpu")


# --- reading a file --------------------------------------------------------------------

def _read_npz(path):
    """{key: array} of an .npz file, never unpickling; a clear error for anything else."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        data = _np().load(path, allow_pickle=False)
        if not hasattr(data, "files"):           # a single array: an .npy, not an .npz
            raise ValueError("it holds a single array, an .npy")
        with data:
            arrays = {key: data[key] for key in data.files}
    except ValueError as e:
        if "Object arrays" in str(e):
            raise ValueError(f"{path} holds Python objects (pickled arrays), refused: loading "
                             "them could run code; a checkpoint holds only numbers") from None
        raise ValueError(f"{path} is not an .npz file of arrays that can be read: {e}") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path} is not an .npz file of arrays that can be read: {e}") from None
    check_finite(arrays, path)
    return arrays


def is_official(path):
    """True when `path` is an .npz in the official layout (it has "embedding/kernel");
    False for minivit's own checkpoints (they have a "meta" entry) and for anything that
    is not a readable .npz.  Only the file's index is read, not its arrays."""
    try:
        with _np().load(pathlib.Path(path), allow_pickle=False) as data:
            return "embedding/kernel" in data.files
    except Exception:                 # not a file, not a zip, an .npy, ...: not official
        return False


# --- the layout ------------------------------------------------------------------------

def _block_renames(i):
    """(minivit name, official key) of block i's arrays that keep their shape."""
    b, m = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
    return [(m + "norm1.scale", b + "LayerNorm_0/scale"), (m + "norm1.bias", b + "LayerNorm_0/bias"),
            (m + "attn.out.bias", b + ATTN + "/out/bias"),
            (m + "norm2.scale", b + "LayerNorm_2/scale"), (m + "norm2.bias", b + "LayerNorm_2/bias"),
            (m + "mlp.fc1.weight", b + MLP + "/Dense_0/kernel"),
            (m + "mlp.fc1.bias", b + MLP + "/Dense_0/bias"),
            (m + "mlp.fc2.weight", b + MLP + "/Dense_1/kernel"),
            (m + "mlp.fc2.bias", b + MLP + "/Dense_1/bias")]


def _stem_renames(config):
    """(minivit name, official key) of the hybrid's ResNet arrays, which all keep their shape."""
    if not config.hybrid:
        return []
    pairs = [("resnet.conv_root.kernel", "conv_root/kernel"),
             ("resnet.gn_root.scale", "gn_root/scale"), ("resnet.gn_root.bias", "gn_root/bias")]
    for i, _, j, projected in _units(config):
        m, o = f"resnet.stages.{i}.units.{j}.", f"block{i + 1}/unit{j + 1}/"
        for conv, gn in [("conv1", "gn1"), ("conv2", "gn2"), ("conv3", "gn3")] + (
                [("conv_proj", "gn_proj")] if projected else []):
            pairs += [(f"{m}{conv}.kernel", f"{o}{conv}/kernel"),
                      (f"{m}{gn}.scale", f"{o}{gn}/scale"), (f"{m}{gn}.bias", f"{o}{gn}/bias")]
    return pairs


def _units(config):
    """(stage i, features f, unit j, projected?) of every bottleneck unit, from 0."""
    width = channels = resnet_width(config.width_factor)
    for i, num_units in enumerate(config.resnet_layers or ()):
        f = width * 2 ** i
        for j in range(num_units):
            yield i, f, j, channels != 4 * f or (i > 0 and j == 0)
            channels = 4 * f


def _top_renames(config):
    """(minivit name, official key) of the arrays outside the blocks that keep their shape."""
    pairs = _stem_renames(config) + [
        ("patch_embed.bias", "embedding/bias"), ("norm.scale", "Transformer/encoder_norm/scale"),
        ("norm.bias", "Transformer/encoder_norm/bias"),
        ("head.weight", "head/kernel"), ("head.bias", "head/bias")]
    if config.classifier == "token":
        pairs.append(("cls_token", "cls"))
    if config.representation_size:
        pairs += [("pre_logits.weight", "pre_logits/kernel"), ("pre_logits.bias", "pre_logits/bias")]
    return pairs


def official_shapes(config, pos_tokens=None):
    """{official key: shape} of a model with this ViTConfig; the position embedding gets
    `pos_tokens` rows (default: the config's), None for a model without one."""
    c = config
    D, H, M, P = c.hidden_size, c.num_heads, c.mlp_dim, c.patch_size
    d, R = D // H, c.representation_size or c.hidden_size
    shapes = {"embedding/kernel": (P, P, c.embed_channels, D), "embedding/bias": (D,),
              "Transformer/encoder_norm/scale": (D,), "Transformer/encoder_norm/bias": (D,),
              "head/kernel": (R, c.num_classes), "head/bias": (c.num_classes,)}
    if c.classifier == "token":
        shapes["cls"] = (1, 1, D)
    if c.pos_embed != "none":
        shapes[POS_KEY] = (1, pos_tokens or c.num_tokens, D)
    if c.representation_size:
        shapes.update({"pre_logits/kernel": (D, R), "pre_logits/bias": (R,)})
    if c.hybrid:
        w = resnet_width(c.width_factor)
        shapes.update({"conv_root/kernel": (7, 7, c.in_channels, w),
                       "gn_root/scale": (w,), "gn_root/bias": (w,)})
        channels = w
        for i, f, j, projected in _units(c):
            o = f"block{i + 1}/unit{j + 1}/"
            convs = {"1": (1, 1, channels, f), "2": (3, 3, f, f), "3": (1, 1, f, 4 * f)}
            if projected:
                convs["_proj"] = (1, 1, channels, 4 * f)
            for k, kernel in convs.items():
                shapes.update({f"{o}conv{k}/kernel": kernel, f"{o}gn{k}/scale": kernel[-1:],
                               f"{o}gn{k}/bias": kernel[-1:]})
            channels = 4 * f
    for i in range(c.depth):
        b = f"Transformer/encoderblock_{i}/"
        for name in ("LayerNorm_0", "LayerNorm_2"):
            shapes.update({f"{b}{name}/scale": (D,), f"{b}{name}/bias": (D,)})
        for name in ("query", "key", "value"):
            shapes.update({f"{b}{ATTN}/{name}/kernel": (D, H, d), f"{b}{ATTN}/{name}/bias": (H, d)})
        shapes.update({f"{b}{ATTN}/out/kernel": (H, d, D), f"{b}{ATTN}/out/bias": (D,),
                       f"{b}{MLP}/Dense_0/kernel": (D, M), f"{b}{MLP}/Dense_0/bias": (M,),
                       f"{b}{MLP}/Dense_1/kernel": (M, D), f"{b}{MLP}/Dense_1/bias": (D,)})
    return shapes


def official_arrays(model):
    """The parameters of a minivit VisionTransformer as {official key: host array}."""
    c, s = model.config, model.state_dict()
    D, H, P = c.hidden_size, c.num_heads, c.patch_size
    out = {key: s[name] for name, key in _top_renames(c)}
    out["embedding/kernel"] = s["patch_embed.kernel"].reshape(P, P, c.embed_channels, D)
    if c.pos_embed != "none":        # learned, or sincos2d's fixed table written as a table
        out[POS_KEY] = (s["pos_embed"] if c.pos_embed == "learned"
                        else backend.to_numpy(model.pos_embed).copy())
    for i in range(c.depth):
        out.update({key: s[name] for name, key in _block_renames(i)})
        b, m = f"Transformer/encoderblock_{i}/{ATTN}/", f"blocks.{i}.attn."
        weight = s[m + "qkv.weight"]
        bias = s.get(m + "qkv.bias")             # qkv_bias=False: zero biases, the same sums
        if bias is None:
            bias = _np().zeros(3 * D, dtype=weight.dtype)
        for j, name in enumerate(("query", "key", "value")):
            out[f"{b}{name}/kernel"] = weight[:, j * D:(j + 1) * D].reshape(D, H, D // H)
            out[f"{b}{name}/bias"] = bias[j * D:(j + 1) * D].reshape(H, D // H)
        out[b + "out/kernel"] = s[m + "out.weight"].reshape(H, D // H, D)
    return out


def _minivit_state(arrays, config):
    """The inverse of official_arrays: {minivit parameter name: array}."""
    np, c = _np(), config
    D = c.hidden_size
    state = {name: arrays[key] for name, key in _top_renames(c)}
    state["patch_embed.kernel"] = arrays["embedding/kernel"].reshape(-1, D)
    if c.pos_embed == "learned":
        state["pos_embed"] = arrays[POS_KEY]
    for i in range(c.depth):
        state.update({name: arrays[key] for name, key in _block_renames(i)})
        b, m = f"Transformer/encoderblock_{i}/{ATTN}/", f"blocks.{i}.attn."
        names = ("query", "key", "value")
        state[m + "qkv.weight"] = np.concatenate(
            [arrays[f"{b}{n}/kernel"].reshape(D, D) for n in names], axis=1)
        state[m + "qkv.bias"] = np.concatenate([arrays[f"{b}{n}/bias"].reshape(D) for n in names])
        state[m + "out.weight"] = arrays[b + "out/kernel"].reshape(D, D)
    return state


# --- the architecture, read off the arrays ---------------------------------------------

def _squeeze_group_norms(arrays):
    """The arrays with every GroupNorm scale and bias of shape (1, 1, 1, n) (older files,
    written by the pre-Linen Flax) reshaped to (n,), the shape the Linen code writes."""
    return {k: (v.reshape(-1) if _GROUP_NORM.match(k) and v.ndim == 4 and v.shape[:3] == (1, 1, 1)
                else v) for k, v in arrays.items()}


def _hybrid_fields(arrays):
    """{in_channels, resnet_layers, width_factor} of a hybrid's arrays, {} for a pure ViT.

    The width and image channels come from conv_root/kernel (7, 7, C, w); the stages from
    the block{i}/unit{j} keys, as the number of units of each block.  What cannot be read
    gets a placeholder, and the missing keys are reported with the rest."""
    if not any(_HYBRID.match(k) for k in arrays):
        return {}
    root = arrays.get("conv_root/kernel")
    channels, width = (int(root.shape[2]), int(root.shape[3])) if (
        root is not None and root.ndim == 4) else (3, 64)
    units = {}
    for m in filter(None, map(_UNIT.match, arrays)):
        i, j = int(m.group(1)), int(m.group(2))
        units[i] = max(units.get(i, 1), j)
    layers = tuple(units.get(i, 1) for i in range(1, max(units, default=0) + 1))
    width_factor = width / 64 if width >= 32 and width % 32 == 0 else 1.0
    return dict(in_channels=channels, resnet_layers=layers, width_factor=width_factor)


def _first_dim(arrays, keys, axis):
    """Size of `axis` of the first of `keys` present with enough axes, else None."""
    for key in keys:
        if key in arrays and arrays[key].ndim > axis:
            return int(arrays[key].shape[axis])
    return None


def config_from_official(arrays, image_size=None, gelu=OFFICIAL_GELU, **fields):
    """The ViTConfig of official arrays {key: array}, after checking every key and shape.

    Patch size, channels and width come from embedding/kernel, the depth from the
    encoderblock_{i} keys, a hybrid's ResNet from conv_root/kernel (the image channels and
    the width, so width_factor = width / 64) and the block{i}/unit{j} keys (units per
    stage), the heads from the query kernels, the MLP width from Dense_0,
    the classes from the head, the classifier from `cls` ("token" when present, else
    "gap"), the representation size from pre_logits, and the image size from the number of
    position-embedding rows: sqrt(N) patches a side times P (times the stem's
    downsampling, 4 for the root alone and 2 more per stage after the first, for a
    hybrid).  GroupNorm arrays of shape (1, 1, 1, n) are read as (n,).  A checkpoint without
    position embeddings does not record its image size: pass image_size.  Missing keys,
    unexpected keys and wrong shapes are all listed in one ValueError.
    """
    arrays = _squeeze_group_norms(arrays)
    keys = set(arrays)
    kernel = arrays.get("embedding/kernel")
    if kernel is None:
        hint = ("; it is a minivit checkpoint: load it with minivit.checkpoint.load_checkpoint"
                if "meta" in keys else "")
        raise ValueError(f"not an official ViT checkpoint: there is no 'embedding/kernel' "
                         f"array (keys: {sorted(keys)[:8]}{' ...' if len(keys) > 8 else ''})"
                         f"{hint}")
    if kernel.ndim != 4 or kernel.shape[0] != kernel.shape[1]:
        raise ValueError(f"embedding/kernel must have shape (P, P, C, D), got {kernel.shape}")
    P, _, C, D = (int(n) for n in kernel.shape)
    hybrid = _hybrid_fields(arrays)
    if hybrid:
        C = hybrid["in_channels"]          # the image's; the embedding reads the feature map

    blocks = sorted({int(m.group(1)) for m in map(_BLOCK.match, keys) if m})
    depth = blocks[-1] + 1 if blocks else 0
    prefixes = [f"Transformer/encoderblock_{i}/" for i in blocks]
    heads = _first_dim(arrays, [b + ATTN + "/query/kernel" for b in prefixes], 1)
    mlp_dim = _first_dim(arrays, [b + MLP + "/Dense_0/kernel" for b in prefixes], 1)
    num_classes = _first_dim(arrays, ["head/kernel"], 1) or _first_dim(arrays, ["head/bias"], 0)
    representation = (_first_dim(arrays, ["pre_logits/kernel"], 1)
                      or _first_dim(arrays, ["pre_logits/bias"], 0))
    classifier = "token" if "cls" in keys else "gap"
    has_cls = classifier == "token"

    pos = arrays.get(POS_KEY)
    pos_tokens = int(pos.shape[1]) if pos is not None and pos.ndim == 3 else None
    if pos is None:
        if image_size is None:
            raise ValueError("this checkpoint has no position embeddings, so it does not "
                             "record its image size: pass image_size=")
        checkpoint_size = image_size
    else:
        if pos_tokens is None:
            raise ValueError(f"{POS_KEY} must have shape (1, T, D), got {pos.shape}")
        grid = math.isqrt(max(pos_tokens - has_cls, 0))
        if grid * grid != pos_tokens - has_cls or grid == 0:
            raise ValueError(f"{POS_KEY} has {pos_tokens} rows: with classifier {classifier!r} "
                             f"that is {pos_tokens - has_cls} patches, not a square grid")
        checkpoint_size = grid * P
        if hybrid:                         # the stem's downsampling: 4, then 2 per stage
            checkpoint_size *= 2 ** (2 + max(len(hybrid["resnet_layers"]) - 1, 0))

    # Build the expected layout with whatever could be read (an unreadable dimension
    # leaves its keys missing, which is reported below with everything else).
    config_fields = dict(image_size=checkpoint_size, patch_size=P, in_channels=C, hidden_size=D,
                         depth=depth, num_heads=heads or 1, mlp_dim=mlp_dim or 1,
                         num_classes=num_classes or 1, classifier=classifier,
                         representation_size=representation,
                         pos_embed="learned" if pos is not None else "none", gelu=gelu)
    if hybrid:
        config_fields.update(resnet_layers=hybrid["resnet_layers"],
                             width_factor=hybrid["width_factor"])
    problems = []
    if heads and D % heads:
        problems.append(f"the width D={D} is not divisible by the {heads} heads of the query "
                        f"kernels")
        config_fields["num_heads"] = 1
    config = ViTConfig(**config_fields)
    expected = official_shapes(config, pos_tokens)
    missing = sorted(set(expected) - keys)
    unexpected = sorted(keys - set(expected))
    wrong = sorted(f"{k}: {tuple(arrays[k].shape)}, expected {expected[k]}"
                   for k in set(expected) & keys if tuple(arrays[k].shape) != expected[k])
    if missing:
        problems.append(f"missing keys: {missing}")
    if unexpected:
        problems.append(f"unexpected keys: {unexpected}")
    if wrong:
        problems.append(f"wrong shapes: {wrong}")
    if not blocks:
        problems.append("no Transformer/encoderblock_{i} arrays at all")
    if problems:
        listing = "\n  ".join(problems)
        stem = (f"a ResNet stem {hybrid['resnet_layers']} of width_factor "
                f"{hybrid['width_factor']}, " if hybrid else "")
        raise ValueError(f"not a valid official ViT checkpoint (read as {stem}D={D}, P={P}, "
                         f"C={C}, {depth} blocks, classifier {classifier!r}):\n  {listing}")
    return replace(config, **fields) if fields else config


# --- position embeddings at another resolution -----------------------------------------

def _zoom_axis(old, new):
    """Where scipy.ndimage.zoom(order=1, grid_mode=False) samples an axis of `old` points
    to give `new`: output i reads input c_i = i * (old - 1)/(new - 1) (the corners stay
    aligned; factor 1 when new == 1), blending floor(c_i) and the next point with
    weights w0 = 1 - frac(c_i) and w1 = 1 - w0, computed as scipy computes them."""
    np = _np()
    factor = (old - 1) / (new - 1) if new > 1 else 1.0
    c = np.minimum(np.arange(new) * factor, old - 1)   # round-off past the edge: clamp
    i0 = np.floor(c).astype(np.int64)
    w0 = 1.0 - (c - i0)
    return i0, np.minimum(i0 + 1, old - 1), w0, 1.0 - w0


def resize_position_embedding(pos_embed, new_grid, has_cls):
    """(1, T, D) position embeddings -> (1, new_grid^2 (+1), D) for a new_grid x new_grid
    patch grid, as the official fine-tuning code resizes them.

    The [CLS] row (the first, when has_cls) is kept as it is; the N = T (-1) patch rows,
    a sqrt(N) x sqrt(N) grid in row-major order, are zoomed like
    scipy.ndimage.zoom(grid, (new/old, new/old, 1), order=1): a bilinear blend where
    output (i, j) samples the input at (c_i, c_j), c_i = i (old - 1)/(new - 1), so the four
    corners map onto the four corners.  Computed in float64 with the same weights and the
    same order of sums as scipy, and returned in the input's dtype.  One difference: where
    round-off puts c_i a hair beyond old - 1 (e.g. 8 -> 26), scipy's default
    mode="constant" returns 0 for that whole edge row; here the edge row is kept.
    """
    xp = backend.array_module(pos_embed)
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"resize_position_embedding: expected position embeddings of shape "
                         f"(1, T, D), got {tuple(pos_embed.shape)}")
    if isinstance(new_grid, bool) or not isinstance(new_grid, int) or new_grid < 1:
        raise ValueError(f"resize_position_embedding: new_grid must be a positive int, "
                         f"got {new_grid!r}")
    T, D = pos_embed.shape[1], pos_embed.shape[2]
    n = T - bool(has_cls)
    old = math.isqrt(max(n, 0))
    if old * old != n or n == 0:
        raise ValueError(f"resize_position_embedding: {n} patch rows (T={T}, has_cls={has_cls}) "
                         f"do not form a square grid")
    if new_grid == old:
        return pos_embed.copy()
    cls, grid = pos_embed[:, :T - n], pos_embed[0, T - n:].reshape(old, old, D)
    device = backend.device_of(pos_embed)
    i0, i1, w0, w1 = (backend.to_device(a, device) for a in _zoom_axis(old, new_grid))
    g = grid.astype(xp.float64)
    top, bottom = g[i0], g[i1]                 # rows floor(c_i) and floor(c_i) + 1: (new, old, D)
    wr0, wr1 = w0[:, None, None], w1[:, None, None]
    wc0, wc1 = w0[None, :, None], w1[None, :, None]
    out = ((top[:, i0] * wr0) * wc0 + (top[:, i1] * wr0) * wc1       # scipy's order of sums
           + (bottom[:, i0] * wr1) * wc0 + (bottom[:, i1] * wr1) * wc1)
    out = out.astype(pos_embed.dtype).reshape(1, new_grid * new_grid, D)
    return xp.concatenate([cls, out], axis=1)


# --- loading and saving ----------------------------------------------------------------

def adapt(config, state, num_classes=None, image_size=None, keep_pre_logits=False):
    """(config, state) for another image size (position embeddings resized to the new
    patch grid) and another number of classes (the official "drop head" start: a new
    head of zeros and, unless keep_pre_logits, no pre-logits layer)."""
    if image_size is not None and image_size != config.image_size:
        config = replace(config, image_size=image_size)
        if config.pos_embed == "learned":
            state["pos_embed"] = resize_position_embedding(
                state["pos_embed"], config.grid_size, config.classifier == "token")
    if num_classes is not None and num_classes != config.num_classes:
        if config.representation_size and not keep_pre_logits:
            config = replace(config, representation_size=None)
            del state["pre_logits.weight"], state["pre_logits.bias"]
        width = config.representation_size or config.hidden_size
        config = replace(config, num_classes=num_classes)
        state["head.weight"] = _np().zeros((width, num_classes), dtype="float32")
        state["head.bias"] = _np().zeros((num_classes,), dtype="float32")
    return config, state


def load_official(path, num_classes=None, image_size=None, seed=0, *, gelu=OFFICIAL_GELU,
                  dropout=0.0, attention_dropout=0.0, patch_dropout=0.0, keep_pre_logits=False,
                  dtype="float32"):
    """A minivit VisionTransformer with the weights of an official .npz checkpoint.

    The architecture is read off the arrays (see config_from_official), hybrids (a ResNet
    stem, e.g. R50+ViT-B_16.npz) included.  The official
    code runs GELU in its tanh form and LayerNorm with eps 1e-6, so the model's config
    says gelu="tanh" (pass gelu="erf" to reload a file that save_official wrote from an
    erf model) and minivit's LayerNorm uses eps 1e-6 throughout.  Dropout rates (and
    patch dropout's) are not stored in checkpoints: give them for fine-tuning.

    num_classes different from the checkpoint's: the official "drop head" start for
    fine-tuning -- a new head of zeros with num_classes outputs and, as the official
    fine-tuning configs do (representation_size=None), no pre-logits layer; with
    keep_pre_logits=True the pre-logits layer stays and the new head reads its output.
    image_size different from the checkpoint's: the position embeddings are resized to the
    new patch grid (resize_position_embedding).  Images must then be image_size square.
    dtype: the model's parameters ("float32", as the released files are; "float64" loads a
    float64 file exactly, e.g. to compare with another implementation).
    """
    arrays = _squeeze_group_norms(_read_npz(path))
    try:
        found = config_from_official(arrays, image_size=image_size, gelu=gelu,
                                     dropout=dropout, attention_dropout=attention_dropout,
                                     patch_dropout=patch_dropout)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    config, state = adapt(found, _minivit_state(arrays, found), num_classes, image_size,
                          keep_pre_logits)
    model = VisionTransformer(config, seed=seed)
    if dtype != "float32":
        model.astype(dtype)
    model.load_state_dict(state)
    return model


def save_official(model, path):
    """Write a minivit VisionTransformer as an official .npz checkpoint, atomically.

    load_official(path) gives back a model with identical logits.  Everything minivit
    can build has a place in the official layout:
      - pos_embed="learned": the pos_embedding array; "none": no pos_embedding (the
        official Encoder's add_position_embedding=False), so load_official then needs
        image_size; "sincos2d": the fixed table is written as the pos_embedding, which is
        what the official code would add -- it comes back as pos_embed="learned";
      - the GELU form is not stored: the official code runs the tanh form, so a model
        with gelu="erf" computes slightly different logits there (reload it in minivit
        with load_official(path, gelu="erf")).
      - qkv_bias=False: the query, key and value biases are written as zeros.
    Dropout rates are not stored either.  The official model has no place for a LayerNorm
    eps other than 1e-6 or for fc_norm (LayerNorm after the mean): such models are refused.
    """
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"save_official: expected a minivit VisionTransformer, "
                        f"got {type(model).__name__}")
    c = model.config
    if c.layer_norm_eps != 1e-6:
        raise ValueError(f"save_official: the official ViT runs LayerNorm with eps 1e-6; this "
                         f"model uses layer_norm_eps={c.layer_norm_eps:g}, which the official "
                         f"layout cannot record")
    if c.fc_norm:
        raise ValueError("save_official: the official 'gap' classifier normalises every token "
                         "before the mean; this model has fc_norm=True (LayerNorm after the "
                         "mean), which the official layout cannot represent")
    arrays = official_arrays(model)
    np = _np()
    return atomic_write(path, lambda f: np.savez(f, **arrays))
