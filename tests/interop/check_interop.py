"""Check minivit against timm and transformers themselves, both ways, in float64.

Run from the repository root where torch, timm, transformers and safetensors are
installed (never in CI; the committed goldens are what CI checks):

    PYTHONPATH=$PWD python tests/interop/check_interop.py

1. Fresh random ViTs of configurations the goldens do not have, saved by timm and by
   transformers themselves, loaded by minivit: logits equal to the library's forward.
2. minivit models saved as "timm" and "hf", loaded by timm (create_model("local-dir:...")
   and a bare state dict) and by transformers (ViTForImageClassification.from_pretrained):
   logits equal to minivit's.
Each line prints the largest difference relative to the largest logit; the check fails
above 1e-10.
"""
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import safetensors.torch
import timm
import torch
import transformers

from make_goldens import float64_logits, perturb  # noqa: E402  (this folder)
from minivit.nn.vit import ViTConfig, VisionTransformer

TOLERANCE = 1e-10
results = []


def relative(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def report(what, got, expected):
    error = relative(got, expected)
    results.append(error <= TOLERANCE)
    print(f"{'ok ' if error <= TOLERANCE else 'BAD'} {error:.2e}  {what}")


def minivit_logits(model, x):
    import minivit as mv
    return model.astype("float64").eval()(mv.tensor(x)).numpy()


def minivit_model(seed, **fields):
    model = VisionTransformer(ViTConfig(**fields), seed=seed)
    rng = np.random.default_rng(seed)
    for p in model.parameters():
        p.data = p.data + (0.1 * rng.standard_normal(p.shape)).astype(np.float32)
    return model


def main():
    folder = Path(tempfile.mkdtemp())
    rng = np.random.default_rng(1)

    # 1. the libraries' models into minivit ----------------------------------------
    x48 = rng.standard_normal((3, 3, 48, 48))
    timm_cases = {
        "timm avg+fc_norm, D=64, 3 blocks, 48 px / 16, mlp_ratio 3": dict(
            img_size=48, patch_size=16, embed_dim=64, depth=3, num_heads=4, mlp_ratio=3.0,
            class_token=False, global_pool="avg", num_classes=7),
        "timm token, no_embed_class, no qkv bias, gelu_tanh, D=64": dict(
            img_size=48, patch_size=16, embed_dim=64, depth=3, num_heads=8, mlp_ratio=2.5,
            no_embed_class=True, qkv_bias=False, act_layer="gelu_tanh", num_classes=7),
    }
    from minivit.pretrained import from_pretrained
    for seed, (what, args) in enumerate(timm_cases.items()):
        torch.manual_seed(seed)
        model = perturb(timm.create_model("vit_base_patch16_224", pretrained=False, **args), seed)
        timm.models.save_for_hf(model, folder / f"timm{seed}", safe_serialization=True)
        ours = from_pretrained(folder / f"timm{seed}", dtype="float64")
        report(what + " (save_for_hf folder)", minivit_logits(ours, x48), float64_logits(model, x48))
    # a bare state dict of a standard width: the heads come from timm's widths
    torch.manual_seed(5)
    tiny = perturb(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=48,
                                     depth=2, num_classes=4), 5)
    safetensors.torch.save_file(tiny.state_dict(), folder / "tiny.safetensors")
    ours = from_pretrained(folder / "tiny.safetensors", dtype="float64")
    report("timm vit_tiny (D=192, 3 heads), bare state dict", minivit_logits(ours, x48),
           float64_logits(tiny, x48))

    hf_cases = {
        "transformers D=64, 8 heads, 3 layers, 48 px / 16, gelu_pytorch_tanh, eps 1e-12": dict(
            hidden_size=64, num_hidden_layers=3, num_attention_heads=8, intermediate_size=160,
            hidden_act="gelu_pytorch_tanh", image_size=48, patch_size=16, num_labels=7),
        "transformers D=48, 4 heads, 2 layers, 48 px / 12, gelu, eps 1e-6, no qkv bias": dict(
            hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
            hidden_act="gelu", image_size=48, patch_size=12, num_labels=3, layer_norm_eps=1e-6,
            qkv_bias=False),
    }
    for seed, (what, args) in enumerate(hf_cases.items(), start=10):
        torch.manual_seed(seed)
        model = perturb(transformers.ViTForImageClassification(transformers.ViTConfig(**args)),
                        seed)
        model.save_pretrained(folder / f"hf{seed}")
        ours = from_pretrained(folder / f"hf{seed}", dtype="float64")
        report(what, minivit_logits(ours, x48), float64_logits(model, x48))

    # 2. minivit's models into the libraries -----------------------------------------
    x40 = rng.standard_normal((3, 3, 40, 40))
    common = dict(image_size=40, patch_size=8, hidden_size=48, depth=2, num_heads=6,
                  mlp_dim=96, num_classes=6)
    to_timm = {"token, erf": dict(), "gap+fc_norm, tanh, no qkv bias":
               dict(classifier="gap", fc_norm=True, gelu="tanh", qkv_bias=False),
               "gap (norm first), erf": dict(classifier="gap")}
    for seed, (what, fields) in enumerate(to_timm.items(), start=20):
        model = minivit_model(seed, **common, **fields)
        path = model.save_pretrained(folder / f"to_timm{seed}", format="timm")
        theirs = timm.create_model(f"local-dir:{path}", pretrained=True)
        report(f"minivit {what} -> timm.create_model('local-dir:...')",
               float64_logits(theirs, x40), minivit_logits(model, x40))
        file = model.save_pretrained(folder / f"to_timm{seed}.safetensors", format="timm")
        with safetensors.safe_open(file, "pt") as f:
            args = json.loads(f.metadata()["model_args"])
        theirs = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=6, **args)
        theirs.load_state_dict(safetensors.torch.load_file(file))
        report(f"minivit {what} -> timm state dict (.safetensors, model_args from metadata)",
               float64_logits(theirs, x40), minivit_logits(model, x40))
    to_hf = {"erf, eps 1e-6": dict(), "tanh, eps 1e-12, no qkv bias":
             dict(gelu="tanh", layer_norm_eps=1e-12, qkv_bias=False)}
    for seed, (what, fields) in enumerate(to_hf.items(), start=30):
        model = minivit_model(seed, **common, **fields)
        path = model.save_pretrained(folder / f"to_hf{seed}", format="hf",
                                     class_names=[f"c{k}" for k in range(6)])
        theirs = transformers.ViTForImageClassification.from_pretrained(path)
        assert theirs.config.id2label[5] == "c5"
        report(f"minivit {what} -> ViTForImageClassification.from_pretrained",
               float64_logits(theirs, x40), minivit_logits(model, x40))

    print(f"torch {torch.__version__}, timm {timm.__version__}, "
          f"transformers {transformers.__version__}, safetensors {safetensors.__version__}")
    print(f"{sum(results)} of {len(results)} within {TOLERANCE:g}")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
