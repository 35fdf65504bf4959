"""Hugging Face transformers' ViT (models/vit/modeling_vit.py) in and out of minivit.

A transformers ViT is a folder: config.json (configuration_vit.py's ViTConfig), the
weights in model.safetensors (or shards listed by model.safetensors.index.json), and often
preprocessor_config.json (the image mean and std).  ViTForImageClassification's tensors
sit under "vit." and its head is "classifier."; a bare ViTModel has no prefix, no head and
maybe a pooler.  With D the width, M the MLP width (intermediate_size), K the classes,
N the patches and i = 0 .. L-1 (every Linear weight is (out, in), transposed in minivit):

    transformers key (after "vit.")                     shape         minivit name
    embeddings.cls_token                                (1, 1, D)     cls_token
    embeddings.position_embeddings                      (1, N+1, D)   pos_embed
    embeddings.patch_embeddings.projection.weight       (D, C, P, P)  patch_embed.kernel
    embeddings.patch_embeddings.projection.bias         (D,)          patch_embed.bias
    encoder.layer.i.layernorm_before.{weight,bias}      (D,)          blocks.i.norm1.{scale,bias}
    encoder.layer.i.attention.attention.query.weight    (D, D)        blocks.i.attn.qkv.weight
      ... .key.weight, ... .value.weight                (D, D)          [:, 0:D], [D:2D], [2D:3D]
    encoder.layer.i.attention.attention.{query,key,value}.bias  (D,)  blocks.i.attn.qkv.bias
    encoder.layer.i.attention.output.dense.{weight,bias}        (D, D) blocks.i.attn.out.*
    encoder.layer.i.layernorm_after.{weight,bias}       (D,)          blocks.i.norm2.{scale,bias}
    encoder.layer.i.intermediate.dense.{weight,bias}    (M, D)        blocks.i.mlp.fc1.*
    encoder.layer.i.output.dense.{weight,bias}          (D, M)        blocks.i.mlp.fc2.*
    layernorm.{weight,bias}                             (D,)          norm.{scale,bias}
    classifier.{weight,bias} (no "vit." prefix)         (K, D)        head.{weight,bias}

What config.json decides:
  - query, key and value are three Linear layers; each output splits into heads as
    view(B, T, H, d), head after head, the column order of minivit's U_qkv blocks;
  - layer_norm_eps: every LayerNorm's eps, 1e-12 in the released configs (not 1e-6):
    minivit's layer_norm_eps;
  - hidden_act: "gelu" is the erf form; "gelu_new" and "gelu_pytorch_tanh" the tanh form;
    any other activation is refused by name;
  - qkv_bias=False: no query/key/value biases, minivit's qkv_bias=False;
  - image_size, patch_size, num_channels, hidden_size, num_hidden_layers,
    num_attention_heads, intermediate_size: the shapes; hidden_dropout_prob and
    attention_probs_dropout_prob: the dropout rates;
  - id2label: the class names.
The classifier reads the [CLS] output of the final LayerNorm (minivit's "token").
ViTModel's pooler (a Linear and tanh on [CLS]) is not used for classification --
ViTForImageClassification drops it too -- and is not loaded; nor is the mask token of
ViTForMaskedImageModeling.  DeiT's distillation token and other model types are refused.
"""
import json
import pathlib
import re

from minivit import backend
from minivit.checkpoint import atomic_write, check_finite
from minivit.nn.vit import ViTConfig
from minivit.pretrained import safetensors
from minivit.pretrained.common import (Loaded, adapt, build, conv_to_kernel, kernel_to_conv,
                                       linear_to_weight, needs_head)

ACTIVATIONS = {"gelu": "erf", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}
SAVED_ACTIVATION = {"erf": "gelu", "tanh": "gelu_pytorch_tanh"}
IGNORED = re.compile(r"^(vit\.)?(pooler\.dense\.|embeddings\.mask_token$)")
EMBED, LAYER = "embeddings.", "encoder.layer.{i}."


def _np():
    return backend.module_for("cpu")


# --- the layout ------------------------------------------------------------------------

def renames(config):
    """(minivit name, transformers key, how) of every tensor but q, k and v, keys without
    the "vit." prefix; how is "same", "linear" (transposed) or "conv"."""
    pairs = [("cls_token", EMBED + "cls_token", "same"),
             ("pos_embed", EMBED + "position_embeddings", "same"),
             ("patch_embed.kernel", EMBED + "patch_embeddings.projection.weight", "conv"),
             ("patch_embed.bias", EMBED + "patch_embeddings.projection.bias", "same")]
    for i in range(config.depth):
        m, t = f"blocks.{i}.", LAYER.format(i=i)
        pairs += [(m + "norm1.scale", t + "layernorm_before.weight", "same"),
                  (m + "norm1.bias", t + "layernorm_before.bias", "same"),
                  (m + "attn.out.weight", t + "attention.output.dense.weight", "linear"),
                  (m + "attn.out.bias", t + "attention.output.dense.bias", "same"),
                  (m + "norm2.scale", t + "layernorm_after.weight", "same"),
                  (m + "norm2.bias", t + "layernorm_after.bias", "same"),
                  (m + "mlp.fc1.weight", t + "intermediate.dense.weight", "linear"),
                  (m + "mlp.fc1.bias", t + "intermediate.dense.bias", "same"),
                  (m + "mlp.fc2.weight", t + "output.dense.weight", "linear"),
                  (m + "mlp.fc2.bias", t + "output.dense.bias", "same")]
    return pairs + [("norm.scale", "layernorm.weight", "same"),
                    ("norm.bias", "layernorm.bias", "same")]


def qkv_keys(i, part):
    """The query, key and value keys of layer i's "weight" or "bias"."""
    return [LAYER.format(i=i) + f"attention.attention.{n}.{part}" for n in ("query", "key", "value")]


def hf_shapes(config):
    """{key without "vit.": shape} of the encoder, and of the classifier (no prefix)."""
    c = config
    D, M, P, C = c.hidden_size, c.mlp_dim, c.patch_size, c.in_channels
    shapes = {key: (D,) for _, key, _ in renames(c)}         # most are (D,); the rest below
    shapes.update({EMBED + "cls_token": (1, 1, D),
                   EMBED + "position_embeddings": (1, c.num_patches + 1, D),
                   EMBED + "patch_embeddings.projection.weight": (D, C, P, P)})
    for i in range(c.depth):
        t = LAYER.format(i=i)
        shapes.update({t + "attention.output.dense.weight": (D, D),
                       t + "intermediate.dense.weight": (M, D), t + "intermediate.dense.bias": (M,),
                       t + "output.dense.weight": (D, M)})
        shapes.update({k: (D, D) for k in qkv_keys(i, "weight")})
        if c.qkv_bias:
            shapes.update({k: (D,) for k in qkv_keys(i, "bias")})
    return shapes


# --- reading ---------------------------------------------------------------------------

def _size(config, name, source):
    value = config.get(name)
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{source}: {name} {value}: minivit's ViT takes square images and "
                             f"patches")
        value = value[0]
    return value


def read_config(config, source="config.json"):
    """The ViTConfig of a transformers ViT config.json (a dict)."""
    model_type = config.get("model_type")
    if model_type != "vit":
        hint = (": DeiT's distillation token has no place in minivit's ViT" if model_type == "deit"
                else "")
        raise ValueError(f"{source}: model_type {model_type!r} is not a ViT (minivit reads "
                         f"transformers' model_type 'vit'){hint}")
    act = config.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise ValueError(f"{source}: hidden_act {act!r} is not GELU in a form minivit runs: "
                         f"expected one of {sorted(ACTIVATIONS)}")
    labels = config.get("id2label") or {}
    num_classes = len(labels) or config.get("num_labels") or 2
    fields = dict(image_size=_size(config, "image_size", source) or 224,
                  patch_size=_size(config, "patch_size", source) or 16,
                  in_channels=config.get("num_channels", 3),
                  hidden_size=config.get("hidden_size", 768),
                  depth=config.get("num_hidden_layers", 12),
                  num_heads=config.get("num_attention_heads", 12),
                  mlp_dim=config.get("intermediate_size", 3072), num_classes=num_classes,
                  dropout=config.get("hidden_dropout_prob", 0.0),
                  attention_dropout=config.get("attention_probs_dropout_prob", 0.0),
                  gelu=ACTIVATIONS[act], layer_norm_eps=config.get("layer_norm_eps", 1e-12),
                  qkv_bias=config.get("qkv_bias", True), classifier="token")
    try:
        return ViTConfig(**fields)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def _check(arrays, config, prefix, has_head, source):
    expected = {prefix + k: v for k, v in hf_shapes(config).items()}
    if has_head:
        expected.update({"classifier.weight": (config.num_classes, config.hidden_size),
                         "classifier.bias": (config.num_classes,)})
    keys = set(arrays)
    missing = sorted(set(expected) - keys)
    unexpected = sorted(keys - set(expected))
    wrong = sorted(f"{k}: {tuple(arrays[k].shape)}, expected {expected[k]}"
                   for k in set(expected) & keys if tuple(arrays[k].shape) != expected[k])
    problems = [f"{what}: {names}" for what, names in
                [("missing keys", missing), ("unexpected keys", unexpected),
                 ("wrong shapes", wrong)] if names]
    if any("distillation" in k for k in keys):
        problems.insert(0, "DeiT's distillation token: minivit's ViT has no place for it")
    if problems:
        c = config
        raise ValueError(f"{source}: the weights do not match config.json (D={c.hidden_size}, "
                         f"P={c.patch_size}, {c.image_size} px, {c.depth} layers, "
                         f"{c.num_classes} labels):\n  " + "\n  ".join(problems))


def minivit_state(arrays, config, prefix="vit."):
    """{minivit name: array} of checked transformers tensors."""
    np = _np()
    convert = {"same": lambda a: a, "linear": linear_to_weight, "conv": conv_to_kernel}
    state = {name: convert[how](arrays[prefix + key]) for name, key, how in renames(config)}
    for i in range(config.depth):
        state[f"blocks.{i}.attn.qkv.weight"] = np.concatenate(
            [arrays[prefix + k].T for k in qkv_keys(i, "weight")], axis=1)
        if config.qkv_bias:
            state[f"blocks.{i}.attn.qkv.bias"] = np.concatenate(
                [arrays[prefix + k] for k in qkv_keys(i, "bias")])
    if "classifier.weight" in arrays:
        state["head.weight"] = linear_to_weight(arrays["classifier.weight"])
        state["head.bias"] = arrays["classifier.bias"]
    return state


def _read_weights(folder):
    """{key: array} of model.safetensors, or of the shards its index lists."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return safetensors.load(single)[0]
    if index.is_file():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        arrays = {}
        for name in files:
            arrays.update(safetensors.load(folder / name)[0])
        return arrays
    pickles = [p.name for p in folder.iterdir() if p.suffix in safetensors.PICKLE_SUFFIXES]
    if pickles:
        raise ValueError(safetensors.pickle_refusal(folder / pickles[0]))
    raise FileNotFoundError(f"{folder}: no model.safetensors (nor model.safetensors.index.json)")


def _read_json(path):
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def load_hf(path, num_classes=None, image_size=None, dtype=None):
    """Loaded(model, "hf", class names, normalisation) of a transformers ViT folder, or of
    its model.safetensors with config.json beside it."""
    path = pathlib.Path(path)
    folder = path if path.is_dir() else path.parent
    config_json = _read_json(folder / "config.json")
    if config_json is None:
        raise ValueError(f"{path}: Hugging Face weights need their config.json beside them "
                         f"(the number of heads, LayerNorm eps and activation are only there)")
    arrays = (safetensors.load(path)[0] if path.is_file() else _read_weights(folder))
    arrays = {k: v for k, v in arrays.items() if not IGNORED.match(k)}
    check_finite(arrays, path)
    vit = read_config(config_json, source=str(folder / "config.json"))
    prefix = "vit." if any(k.startswith("vit.") for k in arrays) else ""
    has_head = "classifier.weight" in arrays or "classifier.bias" in arrays
    _check(arrays, vit, prefix, has_head, str(folder))
    if not has_head:
        needs_head(folder, num_classes)
    state = minivit_state(arrays, vit, prefix)
    vit, state = adapt(vit, state, num_classes, image_size)
    labels = config_json.get("id2label")
    names = [labels[k] for k in sorted(labels, key=int)] if labels else None
    if names is not None and len(names) != vit.num_classes:
        names = None
    normalization = None
    processor = _read_json(folder / "preprocessor_config.json") or {}
    if processor.get("do_normalize", True) and "image_mean" in processor:
        normalization = {"mean": list(processor["image_mean"]), "std": list(processor["image_std"])}
    return Loaded(build(vit, state, dtype), "hf", names, normalization)


# --- writing ---------------------------------------------------------------------------

def hf_arrays(model):
    """{transformers key: array} of a minivit VisionTransformer (ViTForImageClassification)."""
    c, s = model.config, model.state_dict()
    what = [(c.hybrid, "a ResNet stem (hybrid)"),
            (c.classifier != "token", "classifier 'gap': its classifier reads the [CLS] token"),
            (c.representation_size, "a pre-logits layer (representation_size) before the "
                                    "classifier")]
    found = [text for bad, text in what if bad]
    if found:
        raise ValueError("save_pretrained(format='hf'): transformers' ViTForImageClassification "
                         "cannot represent " + "; ".join(found))
    np, D = _np(), c.hidden_size
    if c.pos_embed == "sincos2d":           # the fixed table, written as the table it is
        s["pos_embed"] = backend.to_numpy(model.pos_embed).copy()
    elif c.pos_embed == "none":               # zeros, which add nothing
        s["pos_embed"] = np.zeros((1, c.num_tokens, D), dtype=s["cls_token"].dtype)
    out = {}
    for name, key, how in renames(c):
        value = s[name]
        if how == "linear":
            value = linear_to_weight(value)
        elif how == "conv":
            value = kernel_to_conv(value, c.patch_size, c.in_channels)
        out["vit." + key] = value
    for i in range(c.depth):
        weight = s[f"blocks.{i}.attn.qkv.weight"]
        for j, key in enumerate(qkv_keys(i, "weight")):
            out["vit." + key] = np.ascontiguousarray(weight[:, j * D:(j + 1) * D].T)
        if c.qkv_bias:
            bias = s[f"blocks.{i}.attn.qkv.bias"]
            for j, key in enumerate(qkv_keys(i, "bias")):
                out["vit." + key] = bias[j * D:(j + 1) * D].copy()
    out["classifier.weight"] = linear_to_weight(s["head.weight"])
    out["classifier.bias"] = s["head.bias"]
    return out


def hf_config(model, class_names=None):
    """transformers' config.json of a minivit VisionTransformer, as a dict."""
    c = model.config
    names = list(class_names) if class_names is not None else [f"LABEL_{k}" for k in
                                                                range(c.num_classes)]
    if len(names) != c.num_classes:
        raise ValueError(f"save_pretrained(format='hf'): {len(names)} class names for a model "
                         f"with {c.num_classes} classes")
    return {"architectures": ["ViTForImageClassification"], "model_type": "vit",
            "hidden_size": c.hidden_size, "num_hidden_layers": c.depth,
            "num_attention_heads": c.num_heads, "intermediate_size": c.mlp_dim,
            "hidden_act": SAVED_ACTIVATION[c.gelu], "layer_norm_eps": c.layer_norm_eps,
            "hidden_dropout_prob": c.dropout, "attention_probs_dropout_prob": c.attention_dropout,
            "initializer_range": 0.02, "image_size": c.image_size, "patch_size": c.patch_size,
            "num_channels": c.in_channels, "qkv_bias": c.qkv_bias,
            "encoder_stride": c.patch_size,
            "id2label": {str(k): name for k, name in enumerate(names)},
            "label2id": {name: k for k, name in enumerate(names)},
            "dtype": str(model.head.weight.dtype)}


def save_hf(model, path, class_names=None, normalization=None):
    """Write a minivit VisionTransformer as a transformers ViTForImageClassification folder:
    config.json, model.safetensors and, given the normalisation, preprocessor_config.json.
    transformers.ViTForImageClassification.from_pretrained(path) reads it."""
    arrays, config = hf_arrays(model), hf_config(model, class_names)
    path = pathlib.Path(path)
    if path.suffix == ".safetensors" or path.is_file():
        raise ValueError(f"save_pretrained(format='hf'): {path} must be a folder (it gets "
                         f"config.json and model.safetensors)")
    path.mkdir(parents=True, exist_ok=True)
    safetensors.save(path / "model.safetensors", arrays, {"format": "pt"})
    write_json(path / "config.json", config)
    if normalization is not None:
        c = model.config
        write_json(path / "preprocessor_config.json", {
            "image_processor_type": "ViTImageProcessor", "do_resize": True,
            "size": {"height": c.image_size, "width": c.image_size}, "resample": 2,
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(normalization["mean"]), "image_std": list(normalization["std"])})
    return path


def write_json(path, value):
    atomic_write(path, lambda f: f.write(json.dumps(value, indent=2).encode("utf-8")))
