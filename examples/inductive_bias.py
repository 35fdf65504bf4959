"""How much data does a Vision Transformer need?  The paper's Fig. 3-4 question in miniature.

    python examples/inductive_bias.py --data-dir ~/data             # CPU, NumPy (see below)
    python examples/inductive_bias.py --sizes 1000 5000 --steps 200 --test-subset 2000
    python examples/inductive_bias.py --backend cupy --steps 5000 --models vit cnn resnet

The paper pre-trains ViTs and ResNets on more and more data (ImageNet, ImageNet-21k,
JFT-300M in Fig. 3; random JFT subsets of 9M to 300M images in Fig. 4): with little data
the ResNets win -- their convolutions build in locality and translation equivariance
(Sec. 3.1) -- and with enough data ViT overtakes them.  Here the same question is asked
of CIFAR-10: each model is trained from scratch on nested random subsets of the training
set (the first n of one fixed shuffle) and tested on the test set (or a fixed random
part of it, --test-subset).

The budget is the same for every run: --steps optimiser steps of --batch-size images
(AdamW lr 2e-3, 5% warm-up then cosine decay, weight decay 0.05 on weight matrices,
label smoothing 0.1, gradient clipping at norm 1, random crop + flip), so every run sees
the same number of images: a small subset is passed over many times (the table gives
the epochs), a large one only a few.

The models (MODELS; add one with a function seed -> Module):
    vit     the pure ViT, preset cifar-tiny (4x4 patches, D=64, 4 blocks: 142K parameters)
    cnn     SmallCNN below, from minivit's conv2d (4 convolutions and a linear head: 131K)
    resnet  the hybrid's BiT ResNet stem (minivit.nn.resnet, root + 2 stages at width 32),
            global average pooling and a linear head
    hybrid  the cifar-hybrid preset: that stem's root, then a ViT on its 8x8 feature map

Writes OUT/results.json, OUT/results.md (a table) and OUT/accuracy_vs_data.png (test
accuracy against training-set size, one line per model) after every run, and prints a
line per run.  The defaults (4 sizes x 2 models x 500 steps, the full test set) took 24
minutes on a 2-core CPU with NumPy (OPENBLAS_NUM_THREADS=1: on a machine busy with other
work, OpenBLAS's own threads made the same runs 2-6 times slower).
"""
import argparse
import json
import math
import pathlib
import sys
import time

import matplotlib

matplotlib.use("Agg")                 # figures go to files

import matplotlib.pyplot as plt       # noqa: E402
import numpy as np                    # noqa: E402

import minivit as mv                  # noqa: E402
from minivit import backend, checkpoint, cli, data  # noqa: E402
from minivit.nn import Linear, Module, VisionTransformer  # noqa: E402
from minivit.nn.layers import host_generator, normal, param, zeros  # noqa: E402
from minivit.optim import AdamW, clip_grad_norm, warmup_cosine  # noqa: E402


# --- the models --------------------------------------------------------------------------

class Conv(Module):
    """ReLU(conv2d(x, W) + b) with a 3 x 3 kernel, padding 1; He-normal W, zero b."""

    def __init__(self, in_channels, out_channels, stride, rng):
        self.stride = stride
        self.weight = param(normal(rng, (3, 3, in_channels, out_channels),
                                   math.sqrt(2 / (9 * in_channels))))
        self.bias = param(zeros((out_channels,)))

    def forward(self, x):
        return mv.relu(mv.conv2d(x, self.weight, self.bias, self.stride, padding=1))


class SmallCNN(Module):
    """A small all-convolutional network for 32 x 32 images, from minivit's conv2d:

        conv 3x3, 32 channels            32 x 32
        conv 3x3 stride 2, 64            16 x 16
        conv 3x3, 64                     16 x 16
        conv 3x3 stride 2, 128            8 x 8
        mean over the 8 x 8 positions, Linear(128 -> classes), zero at first (as ViT's head)

    Every layer is local and translation-equivariant: the inductive bias ViT lacks."""

    def __init__(self, num_classes=10, seed=0, in_channels=3):
        rng = host_generator(seed)
        widths, strides = (32, 64, 64, 128), (1, 2, 1, 2)
        channels = (in_channels,) + widths
        self.convs = [Conv(channels[i], channels[i + 1], strides[i], rng) for i in range(4)]
        self.head = Linear(widths[-1], num_classes, rng, init="zeros")

    def forward(self, images):
        x = images
        for conv in self.convs:
            x = conv(x)
        return self.head(x.mean(axis=(2, 3)))


class ResNet(Module):
    """The hybrid's BiT ResNet stem (minivit.nn.resnet) as a classifier: the stem, the mean
    over positions, a linear head (zero at first)."""

    def __init__(self, num_classes=10, seed=0, width=32, layers=(1, 1)):
        from minivit.nn.resnet import ResNetStem
        rng = host_generator(seed)
        self.stem = ResNetStem(3, width, layers, rng)
        self.head = Linear(self.stem.out_channels, num_classes, rng, init="zeros")

    def forward(self, images):
        return self.head(self.stem(images).mean(axis=(2, 3)))


MODELS = {
    "vit": lambda seed: VisionTransformer("cifar-tiny", seed=seed),
    "cnn": lambda seed: SmallCNN(seed=seed),
    "resnet": lambda seed: ResNet(seed=seed),
    "hybrid": lambda seed: VisionTransformer("cifar-hybrid", seed=seed),
}


# --- the command line ------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Train a ViT and a CNN on growing subsets of CIFAR-10 with the same "
                    "budget per run; plot test accuracy against training-set size.",
        formatter_class=cli.HelpFormatter)
    p.add_argument("--data-dir", type=cli.path, default=None,
                   help="folder holding cifar-10-batches-py/ (default: find or download it "
                        "in the cache folder, as train_cifar.py does)")
    p.add_argument("--no-download", action="store_true",
                   help="fail instead of downloading CIFAR-10 when it is not found")
    p.add_argument("--out", type=cli.path, default="runs/inductive_bias",
                   help="folder for the results")
    p.add_argument("--backend", choices=["numpy", "cupy"], default=backend.default_backend_name(),
                   help="numpy runs on the CPU, cupy on an NVIDIA GPU")
    p.add_argument("--models", nargs="+", default=["vit", "cnn"], choices=sorted(MODELS),
                   help="the models to compare")
    p.add_argument("--sizes", nargs="+", type=cli.positive_int, default=[1000, 5000, 10000, 50000],
                   help="training-set sizes (nested random subsets)")
    p.add_argument("--steps", type=cli.positive_int, default=500,
                   help="optimiser steps per run, the same for every size and model")
    p.add_argument("--batch-size", type=cli.positive_int, default=128, help="images per step")
    p.add_argument("--lr", type=cli.positive, default=2e-3, help="peak learning rate")
    p.add_argument("--test-subset", type=cli.positive_int,
                   help="test on this many test images (a fixed random part; default: all)")
    p.add_argument("--seed", type=cli.seed, default=0, help="subsets, initial weights, data order")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p.parse_args(argv)


# --- one run ---------------------------------------------------------------------------------

def train(model, images, labels, args, device, label):
    """args.steps AdamW steps on (images, labels) (host uint8 / ints), batches made on the
    device by data.Loader with crop + flip.  Nothing is read back from the device."""
    loader = data.Loader(images, labels, args.batch_size, seed=args.seed, augment="standard",
                         device=device)
    no_decay = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    optimizer = AdamW(model.parameters(), lr=args.lr, weight_decay=0.05, no_decay=no_decay)
    warmup = max(1, args.steps // 20)
    model.train()
    bar = cli.Progress(args.steps, f"  {label}", not args.no_progress, unit="step")
    epoch = 0
    while optimizer.steps < args.steps:
        for x, y in loader.epoch(epoch):
            if optimizer.steps >= args.steps:
                break
            optimizer.lr = warmup_cosine(optimizer.steps, args.steps, warmup, args.lr)
            optimizer.zero_grad()
            loss = mv.cross_entropy(model(mv.Tensor(x)), y, label_smoothing=0.1)
            loss.backward()
            clip_grad_norm(model.parameters(), 1.0)
            optimizer.step()
            if bar.due():
                bar.update(optimizer.steps)
        epoch += 1
    bar.close()
    return args.steps / loader.num_batches()                      # passes over the images


def evaluate(model, images, labels, device, batch_size=500):
    """Test accuracy, counted on the device and read once."""
    model.eval()
    xp = backend.module_for(device)
    correct = xp.zeros((), dtype="float64")
    with mv.no_grad():
        for start in range(0, len(images), batch_size):
            x = backend.asarray(data.normalize(images[start:start + batch_size]), device=device)
            y = backend.asarray(labels[start:start + batch_size], device=device)
            correct += mv.correct(model(mv.Tensor(x)), y)
    return float(backend.to_numpy(correct)) / len(images)


# --- the results -------------------------------------------------------------------------------

def write_results(out, runs, args):
    """results.json, results.md and accuracy_vs_data.png from the runs so far."""
    settings = {k: v for k, v in vars(args).items() if k not in ("no_progress",)}
    text = json.dumps({"settings": settings, "runs": runs}, indent=2)
    checkpoint.atomic_write(out / "results.json", lambda f: f.write(text.encode()))

    models = list(dict.fromkeys(r["model"] for r in runs))
    sizes = sorted({r["train_images"] for r in runs})
    accuracy = {(r["model"], r["train_images"]): r["test_accuracy"] for r in runs}
    epochs = {r["train_images"]: r["epochs"] for r in runs}
    lines = [f"Test accuracy (%) after {cli.plural(args.steps, 'step')} of "
             f"{cli.plural(args.batch_size, 'image')} "
             f"(the same budget for every run), by training-set size.", "",
             "| training images | epochs | " + " | ".join(models) + " |",
             "| ---: | ---: |" + " ---: |" * len(models)]
    for n in sizes:
        cells = [f"{100 * accuracy[m, n]:.1f}" if (m, n) in accuracy else "" for m in models]
        lines.append(f"| {n:,} | {epochs[n]:.1f} | " + " | ".join(cells) + " |")
    lines += ["", "| model | parameters |", "| --- | ---: |"]
    lines += [f"| {m} | {next(r['parameters'] for r in runs if r['model'] == m):,} |"
              for m in models]
    checkpoint.atomic_write(out / "results.md", lambda f: f.write("\n".join(lines + [""]).encode()))

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for m in models:
        points = sorted((r["train_images"], 100 * r["test_accuracy"]) for r in runs
                        if r["model"] == m)
        ax.plot(*zip(*points), "o-", label=m)
    ax.set_xscale("log")
    ax.set_xticks(sizes, [f"{n:,}" for n in sizes])
    ax.minorticks_off()
    ax.set(xlabel="training images (CIFAR-10 subset)", ylabel="test accuracy (%)",
           title=f"Same budget per run: {cli.plural(args.steps, 'step')} of "
                 f"{cli.plural(args.batch_size, 'image')}")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    checkpoint.atomic_write(out / "accuracy_vs_data.png",
                            lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def main(argv=None):
    """Run every model on every size; returns the list of runs (dicts)."""
    args = parse_args(argv)
    device = cli.use_backend(args.backend)
    if device == "cpu":
        backend.keep_host_memory()
    cifar = cli.find_cifar10(args.data_dir, args.no_download)
    n_train, n_test = len(cifar.train_images), len(cifar.test_images)
    if max(args.sizes) > n_train:
        sys.exit(f"error: --sizes asks for {max(args.sizes):,} training images; there are "
                 f"{n_train:,}")
    shuffle = np.random.default_rng(args.seed)
    train_order = shuffle.permutation(n_train)                  # subsets: its first n
    test_order = np.sort(shuffle.permutation(n_test)[:args.test_subset or n_test])
    test_x, test_y = cifar.test_images[test_order], cifar.test_labels[test_order]
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    sizes = sorted(set(args.sizes))
    print(f"{cli.plural(len(args.models), 'model')} x {cli.plural(len(sizes), 'size')}, "
          f"{cli.plural(args.steps, 'step')} of {cli.plural(args.batch_size, 'image')} each, "
          f"tested on {cli.plural(len(test_x), 'image')}, backend "
          f"{cli.backend_text(args.backend)}", flush=True)
    runs, total = [], len(args.models) * len(sizes)
    try:
        for n in sizes:
            train_x = cifar.train_images[train_order[:n]]
            train_y = cifar.train_labels[train_order[:n]]
            for name in args.models:
                t0 = time.perf_counter()
                try:
                    model = MODELS[name](args.seed)
                except (ImportError, ValueError) as e:
                    sys.exit(f"error: cannot build the model {name!r}: {e}")
                model.to(device)
                label = f"run {len(runs) + 1}/{total}: {name} on {cli.plural(n, 'image')}"
                epochs = train(model, train_x, train_y, args, device, label)
                accuracy = evaluate(model, test_x, test_y, device)
                seconds = time.perf_counter() - t0
                runs.append({"model": name, "train_images": n, "steps": args.steps,
                             "epochs": epochs, "test_accuracy": accuracy, "seconds": seconds,
                             "parameters": model.num_parameters()})
                write_results(out, runs, args)
                print(f"{label}: {epochs:.1f} epochs, test accuracy {100 * accuracy:.1f}%, "
                      f"{seconds:.0f} s", flush=True)
    except KeyboardInterrupt:                 # say what Ctrl-C leaves behind
        kept = (f"the results of {cli.plural(len(runs), 'finished run')} are in "
                f"{out / 'results.md'}" if runs else "no run had finished; nothing was written")
        raise KeyboardInterrupt(kept) from None
    print(f"results: {out / 'results.md'}, {out / 'results.json'}, "
          f"{out / 'accuracy_vs_data.png'}")
    return runs


if __name__ == "__main__":
    cli.install()
    main()
