"""Write the timm and transformers goldens that tests/test_pretrained.py checks minivit against.

Run it where torch, timm, transformers and safetensors are installed (never in CI: the
tests read only what it writes, which is committed):

    python tests/interop/make_goldens.py

It builds small random ViTs with each library (every parameter perturbed by noise, so no
bias or LayerNorm is trivially 0 or 1), saves each as its library saves it
(timm.models.save_for_hf: config.json and model.safetensors; transformers'
save_pretrained), and records the libraries' own float64 logits on fixed inputs, with
the versions used, in tests/interop/goldens/ (about 0.6 MB).
"""
import json
import pathlib
import shutil

import numpy as np
import safetensors
import timm
import torch
import transformers

OUT = pathlib.Path(__file__).parent / "goldens"
IMAGE, PATCH, CLASSES = 32, 8, 5

# name -> the library's own arguments
TIMM_MODELS = {
    "timm_token": dict(embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0),
    "timm_avg_fc_norm_no_qkv_bias": dict(embed_dim=40, depth=2, num_heads=5, mlp_ratio=2.0,
                                         class_token=False, global_pool="avg",
                                         qkv_bias=False),
    "timm_avg_norm_first": dict(embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0,
                                class_token=False, global_pool="avg", fc_norm=False),
    "timm_no_embed_class_gelu_tanh": dict(embed_dim=32, depth=1, num_heads=4, mlp_ratio=2.0,
                                          no_embed_class=True, act_layer="gelu_tanh"),
}
HF_MODELS = {
    "hf_gelu": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64, hidden_act="gelu"),
    "hf_gelu_new_no_qkv_bias": dict(hidden_size=40, num_hidden_layers=2, num_attention_heads=5,
                                    intermediate_size=80, hidden_act="gelu_new", qkv_bias=False),
}
LABELS = ["apple", "bicycle", "cloud", "dune", "ember"]


def perturb(model, seed):
    """Add N(0, 0.05^2) noise to every parameter (after the library's own init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model.eval()


def float64_logits(model, inputs):
    with torch.no_grad():
        out = model.double()(torch.from_numpy(inputs))
    return getattr(out, "logits", out).numpy()


def main():
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    # float32 values (half the bytes), computed with in float64
    inputs = np.random.default_rng(0).standard_normal((2, 3, IMAGE, IMAGE)).astype(np.float32)
    arrays = {"inputs": inputs}
    inputs = inputs.astype(np.float64)
    models = {}
    for seed, (name, args) in enumerate(TIMM_MODELS.items()):
        torch.manual_seed(seed)
        model = perturb(timm.create_model("vit_base_patch16_224", pretrained=False,
                                          img_size=IMAGE, patch_size=PATCH,
                                          num_classes=CLASSES, **args), seed)
        timm.models.save_for_hf(model, OUT / name, safe_serialization=True,
                                model_config={"label_names": LABELS})
        arrays[f"{name}/logits"] = float64_logits(model, inputs)
        models[name] = {"library": "timm", "args": args}
    for seed, (name, args) in enumerate(HF_MODELS.items(), start=len(TIMM_MODELS)):
        torch.manual_seed(seed)
        config = transformers.ViTConfig(
            image_size=IMAGE, patch_size=PATCH, id2label=dict(enumerate(LABELS)),
            label2id={n: k for k, n in enumerate(LABELS)}, **args)
        model = perturb(transformers.ViTForImageClassification(config), seed)
        model.save_pretrained(OUT / name)
        arrays[f"{name}/logits"] = float64_logits(model, inputs)
        models[name] = {"library": "transformers", "args": args}
    np.savez(OUT / "logits.npz", **arrays)
    versions = {"torch": torch.__version__, "timm": timm.__version__,
                "transformers": transformers.__version__, "safetensors": safetensors.__version__,
                "numpy": np.__version__}
    (OUT / "goldens.json").write_text(json.dumps({"versions": versions, "models": models},
                                                 indent=2) + "\n")
    size = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {len(models)} models to {OUT} ({size / 1024:.0f} KiB) with {versions}")


if __name__ == "__main__":
    main()
