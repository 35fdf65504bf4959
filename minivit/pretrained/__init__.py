"""Pretrained weights in the four layouts minivit reads and writes, behind one entry point.

    model = VisionTransformer.from_pretrained("ViT-B_16.npz")                 # official
    model = VisionTransformer.from_pretrained("vit-base-patch16-224/")        # transformers
    model = VisionTransformer.from_pretrained("vit_small.safetensors", num_classes=10)  # timm
    model.save_pretrained("runs/exported", format="hf")

    format      what it is                                        module
    "minivit"   minivit's own .npz checkpoint (with its config)   minivit/checkpoint.py
    "official"  google-research/vision_transformer's .npz         minivit/official.py
    "timm"      timm's state dict in .safetensors (+ config.json) minivit/pretrained/timm.py
    "hf"        a transformers ViT folder (config.json and        minivit/pretrained/hf.py
                model.safetensors)

from_pretrained tells the format from the path: a folder by its config.json
("model_type": transformers; "architecture": timm), an .npz by its keys (official ones
have "embedding/kernel"), a .safetensors file by its tensor names (timm's
"patch_embed.proj.weight", transformers' "...embeddings.patch_embeddings...").  format=
forces one.  safetensors files are read with minivit's own reader (safetensors.py), never
with PyTorch; pickle files (.bin, .pth) are refused.
"""
import json
import pathlib
import zipfile

from minivit import checkpoint, images, official
from minivit.nn.vit import ViTConfig
from minivit.pretrained import common, hf, safetensors, timm
from minivit.pretrained.common import Loaded

FORMATS = ("minivit", "official", "timm", "hf")


def detect_format(path):
    """The format of `path`, one of FORMATS, told from its config or tensor names."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no pretrained weights at {path}")
    if path.is_dir():
        config_file = path / "config.json"
        if config_file.is_file():
            config = json.loads(config_file.read_text(encoding="utf-8"))
            if "model_type" in config:
                return "hf"
            if "architecture" in config:
                return "timm"
        weights = path / "model.safetensors"
        if weights.is_file():
            return detect_format(weights)
        pickles = [p for p in sorted(path.iterdir()) if p.suffix in safetensors.PICKLE_SUFFIXES]
        if pickles:
            raise ValueError(safetensors.pickle_refusal(pickles[0]))
        raise ValueError(f"{path}: a folder of pretrained weights needs config.json or "
                         f"model.safetensors; found {sorted(p.name for p in path.iterdir())[:8]}")
    if path.suffix in safetensors.PICKLE_SUFFIXES:
        raise ValueError(safetensors.pickle_refusal(path))
    if path.suffix == ".safetensors":
        names = safetensors.keys(path)
        if "patch_embed.proj.weight" in names:
            return "timm"
        if any("embeddings.patch_embeddings" in n for n in names):
            return "hf"
        raise ValueError(f"{path}: neither a timm ViT (patch_embed.proj.weight) nor a "
                         f"transformers ViT (embeddings.patch_embeddings...); tensors: "
                         f"{names[:6]}{' ...' if len(names) > 6 else ''}")
    with open(path, "rb") as f:
        head = f.read(4)
    if head in (b"PK\x03\x04", b"PK\x05\x06"):      # an .npz, or PyTorch's zipped pickle
        if official.is_official(path):
            return "official"
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if "meta.npy" in names or path.suffix == ".npz":
            return "minivit"
    if safetensors.looks_like_pickle(head):
        raise ValueError(safetensors.pickle_refusal(path))
    raise ValueError(f"{path}: cannot tell its format (expected a minivit or official .npz, "
                     f"a .safetensors file or a folder); pass format= one of {FORMATS}")


def load_pretrained(path, num_classes=None, image_size=None, dtype=None, format=None):
    """Loaded(model, format, class_names, normalization): the model of `path` and what the
    file says about its inputs and outputs (None where it says nothing).

    num_classes: a new head of zeros with this many outputs (and no pre-logits layer),
    when it differs from the file's.  image_size: the position embeddings resized to this
    size's patch grid (as the official fine-tuning does).  dtype: the parameters' dtype,
    float32 unless asked (bfloat16 and float16 files load as float32).  format: one of
    FORMATS, instead of telling it from the path.
    """
    if format is None:
        format = detect_format(path)
    if format not in FORMATS:
        raise ValueError(f"from_pretrained: format must be one of {FORMATS}, got {format!r}")
    if format == "timm":
        return timm.load_timm(path, num_classes, image_size, dtype)
    if format == "hf":
        return hf.load_hf(path, num_classes, image_size, dtype)
    if format == "official":
        model = official.load_official(path, num_classes=num_classes, image_size=image_size,
                                       dtype=dtype or "float32")
        return Loaded(model, "official", None, dict(images.OFFICIAL_NORMALIZATION))
    state = checkpoint.load_checkpoint(path)
    config = ViTConfig(**state["config"])
    config, weights = common.adapt(config, dict(state["model"]), num_classes, image_size)
    names = state.get("class_names")
    if names is not None and len(names) != config.num_classes:
        names = None
    return Loaded(common.build(config, weights, dtype), "minivit", names,
                  state.get("normalization"))


def from_pretrained(path, num_classes=None, image_size=None, dtype=None, format=None):
    """A VisionTransformer with the weights of `path` (see load_pretrained)."""
    return load_pretrained(path, num_classes, image_size, dtype, format).model


def save_pretrained(model, path, format="minivit", class_names=None, normalization=None):
    """Write `model` in one of FORMATS; class_names and normalization {"mean", "std"} go
    where the format keeps them (minivit: its metadata; timm: config.json's label_names and
    pretrained_cfg; hf: id2label and preprocessor_config.json; official: nowhere).

      "minivit"   an .npz at `path`
      "official"  an .npz at `path`
      "timm"      a .safetensors file at `path` if it ends so, else a folder
      "hf"        a folder: config.json, model.safetensors (preprocessor_config.json)
    """
    if format not in FORMATS:
        raise ValueError(f"save_pretrained: format must be one of {FORMATS}, got {format!r}")
    if format == "timm":
        return timm.save_timm(model, path, class_names, normalization)
    if format == "hf":
        return hf.save_hf(model, path, class_names, normalization)
    if format == "official":
        return official.save_official(model, path)
    meta = {}
    if class_names is not None:
        meta["class_names"] = list(class_names)
    if normalization is not None:
        meta["normalization"] = {"mean": list(normalization["mean"]),
                                 "std": list(normalization["std"])}
    return checkpoint.save_checkpoint(path, model, **meta)
