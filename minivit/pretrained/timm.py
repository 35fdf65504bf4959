"""timm's VisionTransformer weights (timm/models/vision_transformer.py) in and out of minivit.

A timm ViT is saved as its PyTorch state dict, in a .safetensors file alone or in a
folder with timm's config.json beside it (timm.models.save_for_hf; the hub's timm/...
repositories).  With P the patch size, C the channels, D the width, M the MLP width,
K the classes, N the patches and i = 0 .. L-1:

    timm key                       shape         minivit name            minivit shape
    patch_embed.proj.weight        (D, C, P, P)  patch_embed.kernel      (P*P*C, D)
    patch_embed.proj.bias          (D,)          patch_embed.bias
    cls_token                      (1, 1, D)     cls_token               (class_token=True)
    pos_embed                      (1, N+1, D)   pos_embed               (N rows with
                                                                          no_embed_class)
    blocks.i.norm1.{weight,bias}   (D,)          blocks.i.norm1.{scale,bias}
    blocks.i.attn.qkv.weight       (3D, D)       blocks.i.attn.qkv.weight  (D, 3D)
    blocks.i.attn.qkv.bias         (3D,)         blocks.i.attn.qkv.bias  (qkv_bias=True)
    blocks.i.attn.proj.{weight,bias}  (D, D)     blocks.i.attn.out.{weight,bias}
    blocks.i.norm2.{weight,bias}   (D,)          blocks.i.norm2.{scale,bias}
    blocks.i.mlp.fc1.{weight,bias} (M, D)        blocks.i.mlp.fc1.{weight,bias}  (D, M)
    blocks.i.mlp.fc2.{weight,bias} (D, M)        blocks.i.mlp.fc2.{weight,bias}  (M, D)
    norm.{weight,bias}             (D,)          norm.{scale,bias}
      or fc_norm.{weight,bias}     (D,)          norm.{scale,bias}, with fc_norm=True
    head.{weight,bias}             (K, D)        head.{weight,bias}      (D, K)

The differences, one by one:
  - the patch embedding is a Conv2d, weight (D, C, P, P): common.conv_to_kernel;
  - Linear weights are (out, in): transposed.  timm's qkv Linear computes
    x W^T + b, W (3D, D) with rows [q; k; v], each head after head (reshape to
    (3, H, d)), so its transpose is minivit's U_qkv with columns [q | k | v];
  - global_pool "token" reads the class token; "avg" the mean of the patch outputs.
    With fc_norm (the default for "avg") the final LayerNorm moves after the mean
    (key fc_norm.*, no norm.*): minivit's fc_norm=True.  "avg" with a class token
    (the token attends but is left out of the mean) has no minivit equivalent: refused;
  - class_token=False: no cls_token; only "avg" pooling then;
  - no_embed_class=True: pos_embed has rows for the N patches only, and the class token
    is added without a position embedding.  minivit adds [0; E_pos] instead: the same
    sums.  Saving writes no_embed_class=True when the [CLS] row is all zeros, so a load
    and save gives back the same tensors;
  - qkv_bias=False: no attn.qkv.bias, minivit's qkv_bias=False;
  - the head count is not in the tensors: it comes from model_args (config.json, or the
    "model_args" entry of the file's metadata, which save_timm writes), else from the
    width of timm's standard models (TIMM_HEADS);
  - LayerNorm eps is 1e-6 and the activation GELU (erf form) in timm's ViT, unless
    model_args say act_layer="gelu_tanh" (the tanh form).
Register tokens, DeiT's distillation token, LayerScale, QK-norm, CLIP's pre-norm,
attention pooling and the other options minivit does not build are refused by name.
"""
import json
import math
import pathlib
import re

from minivit import backend
from minivit.checkpoint import atomic_write, check_finite
from minivit.nn.vit import ViTConfig
from minivit.pretrained import safetensors
from minivit.pretrained.common import (Loaded, adapt, build, conv_to_kernel, kernel_to_conv,
                                       linear_to_weight, needs_head)

# Heads of timm's standard widths: vit_tiny, small, medium, betwixt, base, large, huge, giant,
# gigantic (timm/models/vision_transformer.py's model functions).
TIMM_HEADS = {192: 3, 384: 6, 512: 8, 640: 10, 768: 12, 1024: 16, 1280: 16, 1408: 16, 1664: 16}
ACTIVATIONS = {None: "erf", "gelu": "erf", "gelu_tanh": "tanh"}     # timm act_layer -> gelu

# Keys of timm options minivit does not build, and what they are.
UNSUPPORTED = [
    (r"^reg_token$", "register tokens (reg_tokens > 0)"),
    (r"^dist_token$|^head_dist\.", "DeiT's distillation token (dist_token, head_dist)"),
    (r"\.ls[12]\.gamma$", "LayerScale (init_values, blocks.i.ls1/ls2)"),
    (r"\.attn\.[qk]_norm\.", "QK-norm (qk_norm=True)"),
    (r"^norm_pre\.", "a LayerNorm before the blocks (pre_norm=True, as CLIP)"),
    (r"^attn_pool\.", "attention pooling (global_pool='map' or 'prr')"),
    (r"\.attn\.norm\.|\.mlp\.norm\.", "extra norms inside the blocks (scale_attn_norm, "
                                      "scale_mlp_norm)"),
    (r"^patch_embed\.norm\.", "a norm in the patch embedding (embed_norm_layer)"),
    (r"\.mlp\.fc1_[gx]\.", "a gated MLP (SwiGLU)"),
]
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def _np():
    return backend.module_for("cpu")


# --- the layout ------------------------------------------------------------------------

def renames(config):
    """(minivit name, timm key, how) of every tensor but the position embedding; how is
    "same", "linear" (transposed) or "conv" (common.conv_to_kernel)."""
    c = config
    pairs = [("patch_embed.kernel", "patch_embed.proj.weight", "conv"),
             ("patch_embed.bias", "patch_embed.proj.bias", "same")]
    if c.classifier == "token":
        pairs.append(("cls_token", "cls_token", "same"))
    for i in range(c.depth):
        m = t = f"blocks.{i}."
        pairs += [(m + "norm1.scale", t + "norm1.weight", "same"),
                  (m + "norm1.bias", t + "norm1.bias", "same"),
                  (m + "attn.qkv.weight", t + "attn.qkv.weight", "linear"),
                  (m + "attn.out.weight", t + "attn.proj.weight", "linear"),
                  (m + "attn.out.bias", t + "attn.proj.bias", "same"),
                  (m + "norm2.scale", t + "norm2.weight", "same"),
                  (m + "norm2.bias", t + "norm2.bias", "same"),
                  (m + "mlp.fc1.weight", t + "mlp.fc1.weight", "linear"),
                  (m + "mlp.fc1.bias", t + "mlp.fc1.bias", "same"),
                  (m + "mlp.fc2.weight", t + "mlp.fc2.weight", "linear"),
                  (m + "mlp.fc2.bias", t + "mlp.fc2.bias", "same")]
        if c.qkv_bias:
            pairs.append((m + "attn.qkv.bias", t + "attn.qkv.bias", "same"))
    norm = "fc_norm" if c.fc_norm else "norm"
    pairs += [("norm.scale", norm + ".weight", "same"), ("norm.bias", norm + ".bias", "same"),
              ("head.weight", "head.weight", "linear"), ("head.bias", "head.bias", "same")]
    return pairs


def timm_shapes(config, no_embed_class=False, with_head=True):
    """{timm key: shape} of a model with this ViTConfig."""
    c = config
    D, M, P, C, K = c.hidden_size, c.mlp_dim, c.patch_size, c.in_channels, c.num_classes
    shapes = {key: (D,) for _, key, _ in renames(c)}      # most are (D,); the rest below
    shapes.update({"patch_embed.proj.weight": (D, C, P, P), "head.weight": (K, D),
                   "head.bias": (K,)})
    if c.classifier == "token":
        shapes["cls_token"] = (1, 1, D)
    if c.pos_embed != "none":
        shapes["pos_embed"] = (1, c.num_patches + (c.classifier == "token" and not no_embed_class),
                               D)
    for i in range(c.depth):
        b = f"blocks.{i}."
        shapes.update({b + "attn.qkv.weight": (3 * D, D), b + "attn.proj.weight": (D, D),
                       b + "mlp.fc1.weight": (M, D), b + "mlp.fc1.bias": (M,),
                       b + "mlp.fc2.weight": (D, M)})
        if c.qkv_bias:
            shapes[b + "attn.qkv.bias"] = (3 * D,)
    if not with_head:
        del shapes["head.weight"], shapes["head.bias"]
    return shapes


# --- reading ---------------------------------------------------------------------------

def _refuse_unsupported(keys, source):
    found = []
    for pattern, what in UNSUPPORTED:
        hits = sorted(k for k in keys if re.search(pattern, k))
        if hits:
            found.append(f"{what}: {hits[:3]}{' ...' if len(hits) > 3 else ''}")
    if found:
        raise ValueError(f"{source}: this timm model uses what minivit's ViT does not have, "
                         f"so it is not loaded (never approximately):\n  " + "\n  ".join(found))


def _square_grid(n):
    g = math.isqrt(n) if n > 0 else 0
    return g if g > 0 and g * g == n else None


def read_config(arrays, model_args=None, global_pool=None, image_size=None, source="timm"):
    """(ViTConfig, no_embed_class, has_head) of a timm state dict {key: array}, after
    checking every key and shape against it.  model_args: timm's constructor arguments
    where known (num_heads, act_layer, ...)."""
    args = dict(model_args or {})
    keys = set(arrays)
    _refuse_unsupported(keys, source)
    if args.get("reg_tokens"):
        raise ValueError(f"{source}: reg_tokens={args['reg_tokens']}: register tokens are not "
                         f"built by minivit")
    act = args.get("act_layer")
    if act not in ACTIVATIONS:
        raise ValueError(f"{source}: act_layer={act!r}: minivit's MLP runs GELU only, in its "
                         f"erf form (timm's default, 'gelu') or tanh form ('gelu_tanh')")
    if args.get("norm_layer") not in (None, "layernorm"):
        raise ValueError(f"{source}: norm_layer={args['norm_layer']!r}: minivit runs LayerNorm "
                         f"(eps 1e-6) only")
    weight = arrays.get("patch_embed.proj.weight")
    if weight is None or weight.ndim != 4 or weight.shape[2] != weight.shape[3]:
        got = "no such tensor" if weight is None else f"shape {tuple(weight.shape)}"
        raise ValueError(f"{source}: not a timm ViT state dict: expected "
                         f"patch_embed.proj.weight of shape (D, C, P, P), got {got}")
    D, C, P = (int(n) for n in weight.shape[:3])
    depth = 1 + max((int(m.group(1)) for m in map(_BLOCK.match, keys) if m), default=-1)
    has_cls = "cls_token" in keys
    if "fc_norm.weight" in keys or "fc_norm.bias" in keys:
        pool, fc_norm = "avg", True
    elif "norm.weight" in keys or "norm.bias" in keys:
        pool, fc_norm = ("token" if has_cls else "avg"), False
    else:
        raise ValueError(f"{source}: neither norm.* nor fc_norm.*: a timm ViT without its final "
                         f"LayerNorm (final_norm=False) is not built by minivit")
    pool = global_pool or args.get("global_pool") or pool
    if pool not in ("token", "avg"):
        raise ValueError(f"{source}: global_pool={pool!r}: minivit pools with the class token "
                         f"('token') or the mean of the patch outputs ('avg') only")
    if pool == "avg" and has_cls:
        raise ValueError(f"{source}: global_pool='avg' with a class token (timm leaves the "
                         f"token out of the mean): minivit's 'gap' models have no class token")
    if pool == "token" and not has_cls:
        raise ValueError(f"{source}: global_pool='token' but there is no cls_token")
    if args.get("fc_norm") is not None and bool(args["fc_norm"]) != fc_norm:
        raise ValueError(f"{source}: model_args say fc_norm={args['fc_norm']} but the tensors "
                         f"have {'fc_norm.*' if fc_norm else 'norm.*'}")

    pos = arrays.get("pos_embed")
    no_embed_class = False
    if pos is None:
        size = image_size or args.get("img_size")
        if isinstance(size, (list, tuple)):           # timm writes [H, W]
            size = size[0] if len(size) == 2 and size[0] == size[1] else None
        if size is None:
            raise ValueError(f"{source}: there is no pos_embed, so the tensors do not record "
                             f"the image size: pass image_size=")
        grid = None
    else:
        if pos.ndim != 3 or pos.shape[0] != 1:
            raise ValueError(f"{source}: pos_embed must have shape (1, T, D), got {pos.shape}")
        rows = int(pos.shape[1])
        wanted = args.get("no_embed_class")
        if has_cls and not wanted and _square_grid(rows - 1):
            grid = _square_grid(rows - 1)
        elif _square_grid(rows) and (has_cls or not wanted):
            grid, no_embed_class = _square_grid(rows), has_cls
        else:
            raise ValueError(f"{source}: pos_embed has {rows} rows: not a square grid of "
                             f"patches{' (plus the class token)' if has_cls else ''}")
        size = grid * P
    heads = args.get("num_heads") or TIMM_HEADS.get(D)
    if heads is None:
        raise ValueError(f"{source}: the number of heads is not stored in a timm state dict, "
                         f"and width {D} is not one of timm's standard widths {sorted(TIMM_HEADS)}: "
                         f"put timm's config.json (with model_args.num_heads) beside the file")
    fc1 = arrays.get("blocks.0.mlp.fc1.weight")
    head = arrays.get("head.weight")
    has_head = head is not None or "head.bias" in keys
    config = ViTConfig(
        image_size=int(size), patch_size=P, in_channels=C, hidden_size=D, depth=depth,
        num_heads=int(heads), mlp_dim=int(fc1.shape[0]) if fc1 is not None and fc1.ndim == 2 else 1,
        num_classes=int(head.shape[0]) if head is not None and head.ndim == 2 else 1,
        classifier="token" if pool == "token" else "gap", fc_norm=fc_norm,
        pos_embed="learned" if pos is not None else "none", gelu=ACTIVATIONS[act],
        qkv_bias=any(k.endswith(".attn.qkv.bias") for k in keys))
    expected = timm_shapes(config, no_embed_class, with_head=has_head)
    missing = sorted(set(expected) - keys)
    unexpected = sorted(keys - set(expected))
    wrong = sorted(f"{k}: {tuple(arrays[k].shape)}, expected {expected[k]}"
                   for k in set(expected) & keys if tuple(arrays[k].shape) != expected[k])
    problems = [f"{what}: {names}" for what, names in
                [("missing keys", missing), ("unexpected keys", unexpected),
                 ("wrong shapes", wrong)] if names]
    if not depth:
        problems.append("no blocks.{i} tensors at all")
    if problems:
        raise ValueError(f"{source}: not a valid timm ViT state dict (read as D={D}, P={P}, "
                         f"C={C}, {depth} blocks, {config.num_heads} heads, global_pool "
                         f"{pool!r}):\n  " + "\n  ".join(problems))
    return config, no_embed_class, has_head


def minivit_state(arrays, config, no_embed_class=False):
    """{minivit name: array} of a checked timm state dict."""
    convert = {"same": lambda a: a, "linear": linear_to_weight, "conv": conv_to_kernel}
    state = {name: convert[how](arrays[key]) for name, key, how in renames(config)
             if key in arrays}
    if config.pos_embed == "learned":
        pos = arrays["pos_embed"]
        if no_embed_class and config.classifier == "token":       # [CLS] gets a zero row
            pos = _np().concatenate([_np().zeros_like(pos[:, :1]), pos], axis=1)
        state["pos_embed"] = pos
    return state


def _find(path):
    """(weights file, timm's config.json as a dict or {}) of a file or a folder."""
    path = pathlib.Path(path)
    weights = path / "model.safetensors" if path.is_dir() else path
    config_file = weights.parent / "config.json"
    config = {}
    if config_file.is_file():
        config = json.loads(config_file.read_text(encoding="utf-8"))
        if "architecture" not in config:          # not timm's (e.g. a transformers config)
            config = {}
    return weights, config


def load_timm(path, num_classes=None, image_size=None, dtype=None):
    """Loaded(model, "timm", class names, normalisation) of a timm .safetensors file or
    folder (model.safetensors and timm's config.json)."""
    weights, config = _find(path)
    arrays, metadata = safetensors.load(weights)
    check_finite(arrays, weights)
    model_args = config.get("model_args")
    if model_args is None and "model_args" in metadata:
        model_args = json.loads(metadata["model_args"])
    vit, no_embed_class, has_head = read_config(arrays, model_args, config.get("global_pool"),
                                                image_size, source=str(weights))
    if not has_head:
        needs_head(weights, num_classes)
    state = minivit_state(arrays, vit, no_embed_class)
    vit, state = adapt(vit, state, num_classes, image_size)
    pretrained_cfg = config.get("pretrained_cfg", {})
    names = config.get("label_names") or pretrained_cfg.get("label_names")
    if isinstance(names, dict):
        names = [names[k] for k in sorted(names, key=int)]
    if names is not None and len(names) != vit.num_classes:
        names = None
    normalization = None
    if "mean" in pretrained_cfg and "std" in pretrained_cfg:
        normalization = {"mean": list(pretrained_cfg["mean"]), "std": list(pretrained_cfg["std"])}
    return Loaded(build(vit, state, dtype), "timm", names, normalization)


# --- writing ---------------------------------------------------------------------------

def _refuse(config):
    c = config
    what = [(c.hybrid, "a ResNet stem (hybrid): timm's hybrids are another model"),
            (c.representation_size, "a pre-logits layer (representation_size): timm's ViT "
                                    "has none"),
            (c.layer_norm_eps != 1e-6, f"LayerNorm eps {c.layer_norm_eps:g}: timm's ViT runs "
                                       f"1e-6"),
            (int(c.hidden_size * (c.mlp_dim / c.hidden_size)) != c.mlp_dim,
             f"MLP width {c.mlp_dim}: timm's mlp_ratio {c.mlp_dim}/{c.hidden_size} does not "
             f"give it back")]
    found = [text for bad, text in what if bad]
    if found:
        raise ValueError("save_pretrained(format='timm'): timm's VisionTransformer cannot "
                         "represent " + "; ".join(found))


def timm_arrays(model):
    """({timm key: array}, timm model_args) of a minivit VisionTransformer."""
    c, s = model.config, model.state_dict()
    _refuse(c)
    out = {}
    for name, key, how in renames(c):
        value = s[name]
        if how == "linear":
            value = linear_to_weight(value)
        elif how == "conv":
            value = kernel_to_conv(value, c.patch_size, c.in_channels)
        out[key] = value
    no_embed_class = False
    if c.pos_embed != "none":
        pos = s["pos_embed"] if c.pos_embed == "learned" else backend.to_numpy(model.pos_embed)
        if c.classifier == "token" and not pos[0, 0].any():     # a zero [CLS] row
            pos, no_embed_class = pos[:, 1:], True
        out["pos_embed"] = _np().ascontiguousarray(pos)
    args = dict(img_size=c.image_size, patch_size=c.patch_size, in_chans=c.in_channels,
                embed_dim=c.hidden_size, depth=c.depth, num_heads=c.num_heads,
                mlp_ratio=c.mlp_dim / c.hidden_size, qkv_bias=c.qkv_bias,
                class_token=c.classifier == "token",
                global_pool="token" if c.classifier == "token" else "avg",
                fc_norm=c.fc_norm, no_embed_class=no_embed_class,
                pos_embed="learn" if c.pos_embed != "none" else "none",
                act_layer="gelu" if c.gelu == "erf" else "gelu_tanh")
    return out, args


def save_timm(model, path, class_names=None, normalization=None):
    """Write a minivit VisionTransformer in timm's layout: to PATH.safetensors the state
    dict alone (its metadata holding timm's model_args), to any other path a folder as
    timm.models.save_for_hf writes it (model.safetensors and config.json), which
    timm.create_model("local-dir:PATH", pretrained=True) reads."""
    arrays, args = timm_arrays(model)
    metadata = {"format": "pt", "model_args": json.dumps(args, sort_keys=True)}
    path = pathlib.Path(path)
    if path.suffix == ".safetensors":
        return safetensors.save(path, arrays, metadata)
    c = model.config
    pretrained_cfg = {"input_size": [c.in_channels, c.image_size, c.image_size],
                      "fixed_input_size": True, "interpolation": "bicubic", "crop_pct": 1.0,
                      "crop_mode": "center", "num_classes": c.num_classes,
                      "first_conv": "patch_embed.proj", "classifier": "head"}
    if normalization is not None:
        pretrained_cfg.update(mean=list(normalization["mean"]), std=list(normalization["std"]))
    config = {"architecture": "vit_base_patch16_224", "num_classes": c.num_classes,
              "num_features": c.hidden_size, "global_pool": args["global_pool"],
              "model_args": args, "pretrained_cfg": pretrained_cfg}
    if class_names is not None:
        config["label_names"] = list(class_names)
    path.mkdir(parents=True, exist_ok=True)
    safetensors.save(path / "model.safetensors", arrays, metadata)
    atomic_write(path / "config.json",
                 lambda f: f.write(json.dumps(config, indent=2).encode("utf-8")))
    return path
