"""Training throughput of minivit against PyTorch (fp32) on the same ViT.

    python benchmarks/torch_throughput.py --device cuda --preset cifar-small --batch 256
    python benchmarks/torch_throughput.py --device cpu  --preset cifar-tiny  --batch 128
    python benchmarks/torch_throughput.py --device cuda --baselines eager,fast --json out.json

Builds the same architecture in PyTorch (pre-norm blocks, [CLS] token, learned
position embeddings, exact GELU, LayerNorm eps 1e-6), copies minivit's initial
weights into it, checks that it gives the same logits as minivit, then times full
training steps (forward, cross-entropy, backward, AdamW) on random images.  The
PyTorch baselines (--baselines, default all three):

  eager    the plain model: attention written out as softmax(q k^T / sqrt(D_h)) v,
           torch.optim.AdamW as it comes (foreach on CUDA, a for-loop on the CPU)
  fast     the fastest eager PyTorch a user would write: attention through
           F.scaled_dot_product_attention (fused kernels) and AdamW(fused=True)
           (foreach=True where this PyTorch refuses fused)
  compile  torch.compile of the fast model (--compile-backend, Inductor by default);
           where compiling fails it is reported as unavailable, with the reason

Everything runs in fp32, no autocast; matrix products in full fp32 too, unless --tf32
lets both sides use the GPU's TF32 tensor cores for them (CUPY_TF32=1 for CuPy,
allow_tf32 for PyTorch; logits then agree to about 1e-2, not 1e-3).  minivit
runs on CuPy for --device cuda and on NumPy for --device cpu.  --json PATH writes the
results for other scripts (benchmarks/gpu_report.py reads them): the settings, and per
row its name, images/s, minivit_over_this (minivit's images/s divided by this row's:
0.5 means minivit runs at half this row's speed), the largest logit difference from
minivit, the device name and the PyTorch version.  The exit status is 1 when a
baseline's logits do not match minivit's.  PyTorch is not a dependency of minivit:
install it to run this (the GPU machines have it).
"""
import argparse
import importlib
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

import minivit as mv
from minivit import backend, cli
from minivit.nn import VisionTransformer
from minivit.optim import AdamW

BASELINES = ("eager", "fast", "compile")
TOLERANCE = 1e-3                       # largest logit difference that counts as "the same"
TF32_TOLERANCE = 5e-2                  # the same, when matrix products round to TF32


class TorchBlock(torch.nn.Module):
    def __init__(self, d, heads, mlp, sdpa=False):
        super().__init__()
        self.heads, self.sdpa = heads, sdpa
        self.norm1 = torch.nn.LayerNorm(d, eps=1e-6)
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.out = torch.nn.Linear(d, d)
        self.norm2 = torch.nn.LayerNorm(d, eps=1e-6)
        self.fc1 = torch.nn.Linear(d, mlp)
        self.fc2 = torch.nn.Linear(mlp, d)

    def forward(self, z):
        b, t, d = z.shape
        q, k, v = self.qkv(self.norm1(z)).reshape(b, t, 3, self.heads, d // self.heads) \
                                         .permute(2, 0, 3, 1, 4)
        if self.sdpa:
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            o = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1) @ v
        z = z + self.out(o.transpose(1, 2).reshape(b, t, d))
        return z + self.fc2(F.gelu(self.fc1(self.norm2(z))))


class TorchViT(torch.nn.Module):
    def __init__(self, c, sdpa=False):
        super().__init__()
        d, p = c.hidden_size, c.patch_size
        self.patch = p
        self.embed = torch.nn.Linear(p * p * c.in_channels, d)
        self.cls = torch.nn.Parameter(torch.zeros(1, 1, d))
        self.pos = torch.nn.Parameter(torch.zeros(1, c.num_tokens, d))
        self.blocks = torch.nn.ModuleList(TorchBlock(d, c.num_heads, c.mlp_dim, sdpa)
                                          for _ in range(c.depth))
        self.norm = torch.nn.LayerNorm(d, eps=1e-6)
        self.head = torch.nn.Linear(d, c.num_classes)

    def forward(self, x):
        b, ch, h, w = x.shape
        p = self.patch
        patches = x.reshape(b, ch, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1) \
                   .reshape(b, (h // p) * (w // p), p * p * ch)
        z = torch.cat([self.cls.expand(b, -1, -1), self.embed(patches)], dim=1) + self.pos
        for block in self.blocks:
            z = block(z)
        return self.head(self.norm(z)[:, 0])


def copy_weights(state, torch_model, device):
    """minivit's parameters (a state_dict) into the PyTorch model (Linear weights are
    stored transposed)."""
    s = state
    t = {"embed.weight": s["patch_embed.kernel"].T, "embed.bias": s["patch_embed.bias"],
         "cls": s["cls_token"], "pos": s["pos_embed"], "norm.weight": s["norm.scale"],
         "norm.bias": s["norm.bias"], "head.weight": s["head.weight"].T,
         "head.bias": s["head.bias"]}
    for i in range(len(torch_model.blocks)):
        m, o = f"blocks.{i}.", f"blocks.{i}."
        for a, b in (("norm1.scale", "norm1.weight"), ("norm1.bias", "norm1.bias"),
                     ("norm2.scale", "norm2.weight"), ("norm2.bias", "norm2.bias"),
                     ("attn.qkv.bias", "qkv.bias"), ("attn.out.bias", "out.bias"),
                     ("mlp.fc1.bias", "fc1.bias"), ("mlp.fc2.bias", "fc2.bias")):
            t[o + b] = s[m + a]
        for a, b in (("attn.qkv.weight", "qkv.weight"), ("attn.out.weight", "out.weight"),
                     ("mlp.fc1.weight", "fc1.weight"), ("mlp.fc2.weight", "fc2.weight")):
            t[o + b] = s[m + a].T
    torch_model.load_state_dict({k: torch.tensor(np.ascontiguousarray(v)) for k, v in t.items()})
    return torch_model.to(device)


def fast_adamw(params):
    """AdamW(fused=True) where this PyTorch allows it for these parameters, else foreach."""
    try:
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=True), "AdamW fused"
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, foreach=True), "AdamW foreach"


def build_baseline(name, config, state, device, compile_backend):
    """(module to call, optimiser, description) of one PyTorch baseline, minivit's weights in."""
    if name == "eager":
        net = copy_weights(state, TorchViT(config), device)
        how = "AdamW foreach" if device == "cuda" else "AdamW for-loop"   # its defaults
        return net, torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.0), how
    net = copy_weights(state, TorchViT(config, sdpa=True), device)
    opt, how = fast_adamw(net.parameters())
    if name == "fast":
        return net, opt, f"SDPA, {how}"
    if device == "cpu":              # no pool of compile workers still starting up while
        try:                         # the steps are timed on the same few cores
            importlib.import_module("torch._inductor.config").compile_threads = 1
        except ImportError:
            pass
    return torch.compile(net, backend=compile_backend), opt, f"{compile_backend}, SDPA, {how}"


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()
        backend.synchronize("cuda")


def images_per_second(step, batch, device, steps):
    step()                                                   # warm up (kernels, caches,
    step()                                                   # compilation)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return batch * steps / (time.perf_counter() - start)


def device_description(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return f"CPU ({names[0]}, {os.cpu_count()} cores)"
    except (OSError, IndexError):
        return f"CPU ({os.cpu_count()} cores)"


def reason_of(error):
    """One line saying what went wrong (compiler errors run to pages)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def unavailable_line(name, reason):
    return f"{'torch.compile' if name == 'compile' else 'PyTorch ' + name}: unavailable ({reason})"


def parse_baselines(text):
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown baseline(s) {', '.join(unknown)}; "
                                         f"choose from {', '.join(BASELINES)}")
    return names


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--preset", default="cifar-small", help="a minivit.nn preset")
    parser.add_argument("--batch", type=cli.positive_int, default=256)
    parser.add_argument("--steps", type=cli.positive_int, default=20,
                        help="timed training steps (after 2 warm-up steps)")
    parser.add_argument("--baselines", type=parse_baselines, default=list(BASELINES),
                        help="comma-separated PyTorch baselines to time: eager, fast, compile "
                             "(default: all)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of the compile baseline (default: inductor)")
    parser.add_argument("--json", type=cli.path, metavar="PATH",
                        help="also write the results to this JSON file")
    parser.add_argument("--tf32", action="store_true",
                        help="matrix products on TF32 tensor cores, on both sides (GPU only)")
    args = parser.parse_args()
    if args.tf32:
        if args.device != "cuda":
            parser.error("--tf32 is a GPU setting: use it with --device cuda")
        os.environ["CUPY_TF32"] = "1"                        # read when CuPy is imported
    tolerance = TF32_TOLERANCE if args.tf32 else TOLERANCE

    backend.use(args.device)
    if args.device == "cpu":
        backend.keep_host_memory()
    torch.backends.cuda.matmul.allow_tf32 = args.tf32        # as CuPy, by CUPY_TF32
    torch.backends.cudnn.allow_tf32 = args.tf32
    model = VisionTransformer(args.preset)
    rng = np.random.default_rng(0)
    for p in model.parameters():                            # the head starts at zero: nudge
        p.data = p.data + backend.asarray(0.02 * rng.standard_normal(p.shape), dtype="float32")

    c = model.config
    x_np = rng.standard_normal((args.batch, 3, c.image_size, c.image_size)).astype(np.float32)
    y_np = rng.integers(0, c.num_classes, args.batch)
    x, y = mv.tensor(x_np), backend.asarray(y_np)
    xt = torch.tensor(x_np, device=args.device)
    yt = torch.tensor(y_np, device=args.device)
    with mv.no_grad():
        ours = model(x).numpy()
    initial = model.state_dict()                            # before any training step
    opt = AdamW(model.parameters(), lr=1e-4)

    def minivit_step():
        model.zero_grad()
        mv.cross_entropy(model(x), y).backward()
        opt.step()

    def torch_step(net, topt):
        def step():
            topt.zero_grad(set_to_none=True)
            F.cross_entropy(net(xt), yt).backward()
            topt.step()
        return step

    label = f"minivit ({'CuPy' if args.device == 'cuda' else 'NumPy'})"
    results = [("minivit", label, images_per_second(minivit_step, args.batch, args.device,
                                                    args.steps), 0.0)]
    # Each baseline in turn: built from minivit's untrained weights, its logits checked,
    # then timed (so torch.compile's worker processes start only after the others ran).
    # The check runs with gradients on, so a compiled model compiles its training graph
    # there, once.  Compilation can fail at either point (e.g. no C++ compiler).
    unavailable, mismatch = [], False
    for name in args.baselines:
        try:
            net, topt, how = build_baseline(name, c, initial, args.device, args.compile_backend)
            difference = float(np.abs(ours - net(xt).detach().cpu().numpy()).max())
            ok = difference < tolerance
            mismatch |= not ok
            print(f"same weights, same logits ({name}): max difference {difference:.2e} "
                  f"({'OK' if ok else 'MISMATCH'})")
            speed = images_per_second(torch_step(net, topt), args.batch, args.device, args.steps)
        except Exception as e:
            print(unavailable_line(name, reason_of(e)))
            unavailable.append({"name": name, "reason": reason_of(e)})
            continue
        label = f"torch.compile ({how})" if name == "compile" else f"PyTorch {name} ({how})"
        results.append((name, label, speed, difference))
        del net, topt

    device = device_description(args.device)
    precision = "fp32 with TF32 matrix products" if args.tf32 else "fp32"
    print(f"{args.preset}, {model.num_parameters():,} parameters, batch {args.batch}, "
          f"{precision} training steps on {device}, PyTorch {torch.__version__}")
    print(f"  {'':46s} {'images/s':>10s}  {'minivit / this':>14s}")
    minivit_speed = results[0][2]
    for name, label, speed, difference in results:
        print(f"  {label:46s} {speed:10,.0f}  {minivit_speed / speed:13.2f}x")

    if args.json:
        rows = [{"name": name, "label": label, "images_per_s": speed,
                 "minivit_over_this": minivit_speed / speed,
                 "logits_max_difference": difference, "device": device,
                 "torch_version": torch.__version__}
                for name, label, speed, difference in results]
        report = {"preset": args.preset, "batch": args.batch, "steps": args.steps,
                  "tf32": args.tf32,
                  "parameters": model.num_parameters(), "device": device,
                  "torch_version": torch.__version__, "logits_match": not mismatch,
                  "rows": rows, "unavailable": unavailable}
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 1 if mismatch else 0


if __name__ == "__main__":
    cli.install()
    raise SystemExit(main())
