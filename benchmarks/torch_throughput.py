"""Training throughput of minivit against PyTorch eager (fp32) on the same ViT.

    python benchmarks/torch_throughput.py --device cuda --preset cifar-small --batch 256
    python benchmarks/torch_throughput.py --device cpu  --preset cifar-tiny  --batch 128

Builds the same architecture in PyTorch (pre-norm blocks, [CLS] token, learned
position embeddings, exact GELU, LayerNorm eps 1e-6), copies minivit's initial
weights into it and checks that both give the same logits, then times full training
steps (forward, cross-entropy, backward, AdamW) of each on random images.  PyTorch is
not a dependency of minivit: install it to run this (the GPU machines have it).
minivit runs on CuPy for --device cuda and on NumPy for --device cpu.
"""
import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

import minivit as mv
from minivit import backend
from minivit.nn import VisionTransformer
from minivit.optim import AdamW


class TorchBlock(torch.nn.Module):
    def __init__(self, d, heads, mlp):
        super().__init__()
        self.heads = heads
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
        a = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
        z = z + self.out((a @ v).transpose(1, 2).reshape(b, t, d))
        return z + self.fc2(F.gelu(self.fc1(self.norm2(z))))


class TorchViT(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        d, p = c.hidden_size, c.patch_size
        self.patch = p
        self.embed = torch.nn.Linear(p * p * c.in_channels, d)
        self.cls = torch.nn.Parameter(torch.zeros(1, 1, d))
        self.pos = torch.nn.Parameter(torch.zeros(1, c.num_tokens, d))
        self.blocks = torch.nn.ModuleList(TorchBlock(d, c.num_heads, c.mlp_dim)
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


def copy_weights(model, torch_model, device):
    """minivit's parameters into the PyTorch model (Linear weights are stored transposed)."""
    s = model.state_dict()
    t = {"embed.weight": s["patch_embed.kernel"].T, "embed.bias": s["patch_embed.bias"],
         "cls": s["cls_token"], "pos": s["pos_embed"], "norm.weight": s["norm.scale"],
         "norm.bias": s["norm.bias"], "head.weight": s["head.weight"].T,
         "head.bias": s["head.bias"]}
    for i in range(len(model.blocks)):
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


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()
        backend.module_for("cuda").cuda.Stream.null.synchronize()


def images_per_second(step, batch, device, steps):
    step()                                                   # warm up (kernels, caches)
    step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return batch * steps / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--preset", default="cifar-small", help="a minivit.nn preset")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20, help="timed training steps")
    args = parser.parse_args()

    backend.use(args.device)
    if args.device == "cpu":
        backend.keep_host_memory()
    model = VisionTransformer(args.preset)
    rng = np.random.default_rng(0)
    for p in model.parameters():                            # the head starts at zero: nudge
        p.data = p.data + backend.asarray(0.02 * rng.standard_normal(p.shape), dtype="float32")
    torch_model = copy_weights(model, TorchViT(model.config), args.device)

    c = model.config
    x_np = rng.standard_normal((args.batch, 3, c.image_size, c.image_size)).astype(np.float32)
    y_np = rng.integers(0, c.num_classes, args.batch)
    x, y = mv.tensor(x_np), backend.asarray(y_np)
    xt = torch.tensor(x_np, device=args.device)
    yt = torch.tensor(y_np, device=args.device)

    with mv.no_grad(), torch.no_grad():
        ours, theirs = model(x).numpy(), torch_model(xt).cpu().numpy()
    difference = np.abs(ours - theirs).max()
    print(f"same weights, same logits: max difference {difference:.2e} "
          f"({'OK' if difference < 1e-3 else 'MISMATCH'})")

    opt = AdamW(model.parameters(), lr=1e-4)
    topt = torch.optim.AdamW(torch_model.parameters(), lr=1e-4, weight_decay=0.0)

    def minivit_step():
        model.zero_grad()
        mv.cross_entropy(model(x), y).backward()
        opt.step()

    def torch_step():
        topt.zero_grad(set_to_none=True)
        F.cross_entropy(torch_model(xt), yt).backward()
        topt.step()

    ours = images_per_second(minivit_step, args.batch, args.device, args.steps)
    theirs = images_per_second(torch_step, args.batch, args.device, args.steps)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"{args.preset}, {model.num_parameters():,} parameters, batch {args.batch}, "
          f"fp32 training steps on {name}")
    print(f"  minivit ({'CuPy' if args.device == 'cuda' else 'NumPy'})  {ours:10,.0f} images/s")
    print(f"  PyTorch {torch.__version__} eager  {theirs:10,.0f} images/s")
    print(f"  minivit / PyTorch             {ours / theirs:10.2f}x")


if __name__ == "__main__":
    main()
