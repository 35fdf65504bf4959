"""Train a Vision Transformer on CIFAR-10 with minivit's own engine.

    python examples/train_cifar.py --preset cpu                  # 7 minutes on a 2-core CPU
    python examples/train_cifar.py --preset gpu --backend cupy   # the real run, on a GPU
    python examples/train_cifar.py --preset finetune --pretrained ViT-B_16.npz --backend cupy
                                   # fine-tune an official checkpoint at 384x384 (paper, 3.2)

Every epoch prints training loss and accuracy, images per second and elapsed time
(and test loss and accuracy after every --eval-every-th epoch and the last); appends
a line to OUT/log.jsonl; redraws OUT/curves.png; and writes OUT/checkpoint.npz
(atomically: a killed run never leaves half a checkpoint).
`--resume` continues from that checkpoint and reaches exactly the state an
uninterrupted run would: the model, the optimiser, the schedule position (the step
count), and the randomness, which is drawn per epoch from (seed, epoch) for the data
order and augmentation, the dropout masks and the tokens patch dropout keeps.

One run at a time uses an OUT: a second one refuses, naming the process that holds it
(an OS lock, which ends with its process however it ends).  A run whose loss or weights
become NaN or infinite stops with one line that names the flags to change, keeping the
checkpoint of the last good epoch.  --processes N trains on N processes of this
machine, each on its share of every batch (--preset cpu: one per core; see
minivit.distributed); --threads N sets the threads of NumPy's BLAS in each.
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import pathlib
import sys
import time
import traceback
import warnings

import minivit as mv
from minivit import backend, checkpoint, cli, data, distributed
from minivit.nn import PRESETS as MODEL_PRESETS
from minivit.data.resize import resize_bilinear
from minivit.nn import VisionTransformer, ViTConfig, preset
from minivit.optim import SGD, AdamW, warmup_cosine

# Training recipes.  "cpu": a small ViT for 10 minutes on 2 cores (about 72% test
# accuracy), chosen on a validation split for that budget (docs/performance.md):
# cifar-tiny with one head of 64 dimensions (faster than 2 of 32 or 4 of 16, as
# accurate here), the mean of the patch tokens instead of [CLS], the tanh GELU of the
# official code; patch dropout 0.5 (each training image keeps a random half of its
# patches), which makes a step about twice as fast, buying 18 epochs instead of 10; no
# augmentation and a large learning rate, since so short a run underfits more than it
# overfits; the test set every second epoch; one process per core (CORE_PRESETS).
# "gpu": the small-data recipe of Lee et al. 2021 ("Vision Transformer for Small-Size
# Datasets") and omihub777/ViT-CIFAR -- patch 4 on 32x32 images (64 tokens), AdamW with
# weight decay 0.05, warm-up then cosine decay, label smoothing 0.1, crop + flip.
RECIPES = {
    "cpu": dict(model="cifar-tiny", num_heads=1, classifier="gap", gelu="tanh", epochs=18,
                batch_size=128, lr=6e-3, weight_decay=0.05, warmup_epochs=1,
                label_smoothing=0.1, optimizer="adamw", clip_norm=1.0, augment="none",
                dropout=0.0, patch_dropout=0.5, eval_every=2),
    # The hybrid of Sec. 3.1 at CIFAR size: a convolutional root block (7x7/2 StdConv,
    # GroupNorm, ReLU, 3x3/2 max pool; width 32) turns 32x32 images into an 8x8 map whose
    # 1x1 patches are the 64 tokens of cifar-tiny's encoder (4 heads, [CLS], erf GELU),
    # trained 6 epochs with crop + flip.
    "cpu-hybrid": dict(model="cifar-hybrid", epochs=6, batch_size=128, lr=2e-3,
                       weight_decay=0.05, warmup_epochs=1, label_smoothing=0.1,
                       optimizer="adamw", clip_norm=1.0, augment="standard", dropout=0.0),
    "gpu": dict(model="cifar-small", epochs=60, batch_size=256, lr=1e-3, weight_decay=0.05,
                warmup_epochs=5, label_smoothing=0.1, optimizer="adamw", clip_norm=1.0,
                augment="standard", dropout=0.0),
    # The paper's fine-tuning (Sec. 3.2, App. B.1.1) as the official code runs it for
    # CIFAR-10: SGD with momentum 0.9, batch 512, 10,000 steps (~102 epochs) of which 500
    # (~5 epochs) warm-up, then cosine decay, base lr 0.03, gradient clipping at global
    # norm 1, no weight decay, at 384x384 (images upsampled from 32x32).  Like the official
    # config (accum_steps=8), each batch of 512 runs as 8 passes of 64 images: ViT-B/16 at
    # 384 px holds about 0.93 GB of activations per image for backward in float32.
    "finetune": dict(steps=10_000, warmup_steps=500, batch_size=512, accumulate=8,
                     lr=0.03, optimizer="sgd",
                     momentum=0.9, weight_decay=0.0, label_smoothing=0.0, clip_norm=1.0,
                     augment="standard", dropout=0.0, image_size=384),
}


# Presets that train on one process per CPU core (at most MAX_PROCESSES): a NumPy step
# does its elementwise work on one core, so a second process on a second core nearly
# doubles the images per second (docs/performance.md).
CORE_PRESETS = ("cpu",)
MAX_PROCESSES = 8


@dataclasses.dataclass
class Settings:
    """Everything that decides a run (saved in every checkpoint)."""
    model: str = "cifar-tiny"
    hidden_size: int = None
    depth: int = None
    num_heads: int = None
    mlp_dim: int = None
    patch_size: int = None
    gelu: str = None
    classifier: str = None        # "token" ([CLS]) or "gap" (mean of the patch tokens)
    epochs: int = 6
    batch_size: int = 128
    lr: float = 2e-3
    optimizer: str = "adamw"
    momentum: float = 0.9
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    accumulate: int = 1           # split each batch into this many forward/backward passes
    steps: int = None             # total optimiser steps; overrides epochs when given
    warmup_steps: int = None      # overrides warmup_epochs when given
    label_smoothing: float = 0.1
    clip_norm: float = 1.0
    dropout: float = 0.0
    attention_dropout: float = 0.0
    patch_dropout: float = 0.0    # the share of patch tokens each training image drops
    augment: str = "standard"
    train_subset: int = None
    val_split: int = 0            # hold out the last N training images to validate on
    eval_every: int = 1           # evaluate after every N-th epoch (and after the last)
    seed: int = 0
    pretrained: str = None        # weights to start from (official, minivit, timm, hf)
    image_size: int = None        # the model's resolution; CIFAR images are upsampled to it

    def schedule(self, steps_per_epoch):
        """(total steps, warm-up steps, epochs) of the learning-rate schedule."""
        total = self.steps or self.epochs * steps_per_epoch
        warmup = (self.warmup_steps if self.warmup_steps is not None
                  else round(self.warmup_epochs * steps_per_epoch))
        return total, warmup, math.ceil(total / steps_per_epoch)

    def normalization(self):
        """Official checkpoints expect pixel / 127.5 - 1; our own models CIFAR's statistics."""
        if self.pretrained:
            return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
        return data.CIFAR10_MEAN, data.CIFAR10_STD

    def model_config(self):
        fields = {k: getattr(self, k) for k in ("hidden_size", "depth", "num_heads", "mlp_dim",
                                                "patch_size", "gelu", "classifier",
                                                "image_size")
                  if getattr(self, k)}
        return preset(self.model, num_classes=10, dropout=self.dropout,
                      attention_dropout=self.attention_dropout,
                      patch_dropout=self.patch_dropout, **fields)


positive_int, count, non_negative, probability, positive = (
    cli.positive_int, cli.count, cli.non_negative, cli.probability, cli.positive)


def _recipes_text():
    lines = ["recipes (--preset); flags override their values:"]
    for name, recipe in RECIPES.items():
        lines.append(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in recipe.items()))
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Train a Vision Transformer on CIFAR-10 with minivit (NumPy or CuPy).",
        epilog=_recipes_text(), formatter_class=cli.HelpFormatter)
    p.add_argument("--preset", choices=sorted(RECIPES), default=None,
                   help="training recipe (default: cpu; listed below); the flags below "
                        "override its values")
    p.add_argument("--backend", choices=["numpy", "cupy"], default=backend.default_backend_name(),
                   help="numpy runs on the CPU, cupy on an NVIDIA GPU (default: "
                        "$MINIVIT_BACKEND, else numpy)")
    p.add_argument("--data-dir", type=cli.path, default=None,
                   help="folder holding cifar-10-batches-py/ (or that folder itself); "
                        "without it CIFAR-10 is found in, or downloaded to, the cache "
                        "folder ($MINIVIT_DATA, else ~/.cache/minivit/cifar10)")
    p.add_argument("--no-download", action="store_true",
                   help="fail instead of downloading CIFAR-10 when it is not found")
    p.add_argument("--out", type=cli.path, default="runs/cifar",
                   help="folder for the log, curves and checkpoint (default: runs/cifar); "
                        "one run at a time uses it")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.npz with the settings saved there "
                        "(--epochs or --steps may raise the total)")
    p.add_argument("--seed", type=cli.seed, help="seed for initial weights, data order, "
                                            "augmentation and dropout")
    p.add_argument("--epochs", type=positive_int, help="passes over the training set")
    p.add_argument("--batch-size", type=positive_int, help="images per training step")
    p.add_argument("--accumulate", type=positive_int,
                   help="run each batch as this many smaller forward/backward passes whose "
                        "gradients add up (same result, less memory)")
    p.add_argument("--lr", type=positive, help="peak learning rate (after warm-up)")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], help="AdamW, or SGD with momentum")
    p.add_argument("--momentum", type=probability, help="SGD momentum")
    p.add_argument("--weight-decay", type=non_negative,
                   help="decoupled weight decay (AdamW: weight matrices only; never the [CLS] "
                        "token or the position embeddings)")
    p.add_argument("--warmup-epochs", type=non_negative, help="epochs of linear learning-rate warm-up "
                                                       "before the cosine decay")
    p.add_argument("--steps", type=positive_int, help="train for this many optimiser steps instead of "
                                             "whole epochs (the last epoch may stop early)")
    p.add_argument("--warmup-steps", type=count, help="warm-up length in steps instead of epochs")
    p.add_argument("--label-smoothing", type=probability, help="label smoothing of the cross-entropy")
    p.add_argument("--clip-norm", type=non_negative, help="clip gradients to this global L2 norm "
                                                   "(0: no clipping)")
    p.add_argument("--dropout", type=probability, help="dropout after embeddings, attention and in "
                                                 "the MLP")
    p.add_argument("--attention-dropout", type=probability, help="dropout on the attention weights")
    p.add_argument("--patch-dropout", type=probability,
                   help="the share of its patch tokens each training image drops, a "
                        "different random set each time (PatchDropout); a step costs about "
                        "that much less; evaluation sees every token")
    p.add_argument("--augment", choices=["none", "flip", "standard", "strong"],
                   help="flip: a random horizontal flip; standard: random crop (4-pixel "
                        "padding) + horizontal flip; strong: also cutout")
    p.add_argument("--model", choices=sorted(n for n in MODEL_PRESETS if n.startswith("cifar")),
                   help="model size preset (see minivit.nn.PRESETS)")
    p.add_argument("--hidden-size", type=positive_int, help="override the model's width D")
    p.add_argument("--depth", type=positive_int, help="override the number of encoder blocks L")
    p.add_argument("--num-heads", type=positive_int, help="override the number of attention heads")
    p.add_argument("--mlp-dim", type=positive_int, help="override the MLP's hidden width")
    p.add_argument("--patch-size", type=positive_int, help="override the patch size P")
    p.add_argument("--gelu", choices=["erf", "tanh"], help="exact (erf) or tanh GELU")
    p.add_argument("--classifier", choices=["token", "gap"],
                   help="what the head reads: the [CLS] token (the paper's default) or the "
                        "mean of the patch tokens (global average pooling, App. D.3)")
    p.add_argument("--pretrained", type=cli.path,
                   help="fine-tune from these weights: an official ViT .npz "
                        "(google-research/vision_transformer), a minivit checkpoint, a timm "
                        ".safetensors or a Hugging Face folder; a head of another size is "
                        "replaced by a zero 10-class head")
    p.add_argument("--image-size", type=positive_int,
                   help="the model's resolution: CIFAR images are upsampled to it (with "
                        "--pretrained, position embeddings are resized; default: the "
                        "checkpoint's, or 32)")
    p.add_argument("--train-subset", type=positive_int,
                   help="train on the first N training images only (quick experiments)")
    p.add_argument("--val-split", type=count,
                   help="hold out the last N of the 50,000 training images and evaluate on "
                        "them instead of the test set (to choose a recipe without looking "
                        "at the test set; default 0: evaluate on the test set)")
    p.add_argument("--eval-every", type=positive_int,
                   help="evaluate after every N-th epoch and after the last (default: 1, "
                        "every epoch); the other epochs report their training loss only")
    p.add_argument("--eval-batch-size", type=positive_int,
                   help="images per test batch and process (default: 500 on a GPU; 128 on "
                        "the CPU, where a smaller batch stays in the caches)")
    p.add_argument("--processes", type=positive_int,
                   help="train on N processes of this machine, each on its share of every "
                        "batch, with the gradients summed before each step (NumPy only; "
                        f"default: one per CPU core, at most {MAX_PROCESSES}, for "
                        f"--preset {' or '.join(CORE_PRESETS)}; else 1)")
    p.add_argument("--threads", type=positive_int,
                   help="threads of the BLAS library under NumPy, per process (default: its "
                        "own choice, usually one per core; with --processes N, the cores "
                        "divided by N); on a machine whose cores are busy with other work, "
                        "--threads 1 can be several times faster")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (there is none when stderr is not a terminal)")
    return p.parse_args(argv)


SHAPE_FIELDS = ("model", "hidden_size", "depth", "num_heads", "mlp_dim", "patch_size",
                "classifier")


def settings_from(args):
    recipe = RECIPES[args.preset or "cpu"]
    values = dict(recipe)
    if args.pretrained or (args.model or recipe.get("model")) != recipe.get("model"):
        for name in SHAPE_FIELDS[1:] + ("gelu",):   # the recipe's changes to its own model
            values.pop(name, None)                  # are not for another one
    for field in dataclasses.fields(Settings):
        flag = getattr(args, field.name, None)
        if flag is not None:
            values[field.name] = flag
    if args.epochs is not None and args.steps is None:          # epochs given: counted in epochs
        values["steps"] = None
    if args.warmup_epochs is not None and args.warmup_steps is None:
        values["warmup_steps"] = None
    return Settings(**values)


def resume_conflicts(args, saved):
    """The flags that contradict the settings a run was saved with, each with its saved
    value: each flag given, and each value of a --preset given that no flag overrides
    (--epochs and --steps may change: they extend or shorten the run; so may --eval-every,
    which changes only what is reported)."""
    wanted = dataclasses.asdict(settings_from(args))
    given = {f.name for f in dataclasses.fields(Settings) if getattr(args, f.name, None) is not None}
    from_preset = set(RECIPES[args.preset]) - given if args.preset else set()
    from_preset = {name for name in from_preset if wanted[name] is not None}
    problems = []
    for name in sorted(given | from_preset, key=list(wanted).index):
        if name in ("epochs", "steps", "eval_every") or wanted[name] == saved.get(name):
            continue
        flag = f"--preset {args.preset} sets {name}={wanted[name]}" if name in from_preset \
            else f"--{name.replace('_', '-')} {wanted[name]}"
        problems.append(f"{flag} (saved: {saved.get(name)})")
    return problems


def check_writable(out):
    """Fail now, not after an epoch of training, if OUT cannot hold the run's files."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        sys.exit(f"error: --out {out}: cannot write there ({e.strerror or e})")


# --- one epoch ------------------------------------------------------------------------

def train_epoch(model, optimizer, loader, epoch, s, show_progress, world=distributed.World()):
    """One epoch of training steps.  A step reads nothing back from the device: the loss
    and the correct answers are summed there, with the first step whose loss was not
    finite, and the three are read together (one read) at most 10 times a second and at
    the end of the epoch.  A NaN or infinite loss is reported with its step; the steps
    run after it before that read are at most those of 0.1 s (the epoch is not saved).

    Under MPI each rank trains on its shard of every batch and the gradients are summed
    across ranks before the step (minivit.distributed); the totals are then read every
    READ_EVERY steps instead, at the same steps on every rank."""
    model.train()
    model.random_source.reseed(s.seed * 1_000_003 + epoch)     # dropout masks of this epoch
    total_steps, warmup_steps, epochs = s.schedule(loader.num_batches())
    micro = -(-s.batch_size // s.accumulate)                   # images per forward pass
    xp = backend.array_module(optimizer.buffers[0].data)
    loss_sum, correct, bad_step = (xp.zeros((), dtype="float64") for _ in range(3))
    seen = 0
    bar = cli.Progress(loader.num_images(), f"epoch {epoch + 1}/{epochs}", show_progress)

    def read():
        totals = backend.to_numpy(xp.stack([loss_sum, correct, bad_step]))   # the one read
        totals = world.reduce_host(totals[:2]).tolist() + [world.reduce_host(totals[2:], "max")[0]]
        if totals[2]:
            return None, f"the training loss became {totals[0] / seen:g} at step {int(totals[2])}"
        return totals, None

    for images, labels in loader.epoch(epoch):
        if optimizer.steps >= total_steps:
            break
        optimizer.lr = warmup_cosine(optimizer.steps, total_steps, warmup_steps, s.lr)
        model.zero_grad()
        n = len(labels)
        first, last = world.shard(n)               # this rank's images of the batch
        for start in range(first, last, micro):    # micro-batches: gradients add up
            end = min(start + micro, last)
            x = resize_bilinear(images[start:end], model.config.image_size)
            y = labels[start:end]
            logits = model(mv.Tensor(x))
            loss = mv.cross_entropy(logits, y, label_smoothing=s.label_smoothing)
            # the batch's mean loss, in parts: seed backward with d(loss * w)/d(loss) = w,
            # made on the device (a Python number in the graph would be copied up)
            loss.backward(xp.full((), len(y) / n, dtype=loss.dtype))
            loss_sum += loss.data * len(y)
            correct += mv.correct(logits, y)
            bad_step = xp.where((bad_step == 0) & ~xp.isfinite(loss.data),
                                optimizer.steps + 1, bad_step)
        distributed.sum_gradients(world, optimizer)                # no-op for one process
        optimizer.clip_grad_norm(s.clip_norm or None)   # applied in step(); NaN: NaN next loss
        optimizer.step()
        seen += n
        if bar.due() if world.size == 1 else optimizer.steps % READ_EVERY == 0:
            totals, problem = read()
            if problem:
                bar.close()
                return None, problem
            bar.update(seen, f"loss {totals[0] / seen:.3f} acc {totals[1] / seen:.3f}")
    bar.close()
    totals, problem = read()
    if problem:
        return None, problem
    return {"train_loss": float(totals[0]) / seen, "train_acc": float(totals[1]) / seen,
            "train_images": seen}, None


READ_EVERY = 20          # under MPI: steps between reads of the running totals


def evaluate(model, images, labels, batch_size, mean, std, device, world=distributed.World(),
             show_progress=False, split="test", flip=False):
    """Loss and accuracy on held-out images (the test set, or split="val": the validation
    images), summed on the device and read once (under MPI each rank evaluates its shard
    and the sums are added across ranks); keys "<split>_loss" and "<split>_acc".
    flip=True: also "<split>_acc_flip", the accuracy of test-time flip averaging: each
    image and its mirror image (left-right) are classified by the mean of their logits."""
    model.eval()
    xp = backend.module_for(device)
    loss_sum, correct, correct_flip = (xp.zeros((), dtype="float64") for _ in range(3))
    first, last = world.shard(len(images))
    bar = cli.Progress(last - first, split, show_progress)
    with mv.no_grad():
        for start in range(first, last, batch_size):
            end = min(start + batch_size, last)
            x = backend.asarray(data.normalize(images[start:end], mean, std), device=device)
            x = resize_bilinear(x, model.config.image_size)
            y = backend.asarray(labels[start:end], device=device)
            logits = model(mv.Tensor(x))
            loss_sum += mv.cross_entropy(logits, y).data * len(y)
            correct += mv.correct(logits, y)
            if flip:
                mirrored = model(mv.Tensor(xp.ascontiguousarray(x[..., ::-1])))
                correct_flip += mv.correct((logits.data + mirrored.data) / 2, y)
            if bar.due():
                bar.update(end - first)
    bar.close()
    totals = world.reduce_host(backend.to_numpy(xp.stack([loss_sum, correct, correct_flip])))
    result = {f"{split}_loss": float(totals[0]) / len(images),
              f"{split}_acc": float(totals[1]) / len(images)}
    if flip:
        result[f"{split}_acc_flip"] = float(totals[2]) / len(images)
    return result


# --- logs and curves --------------------------------------------------------------------

def write_log(path, history):
    checkpoint.atomic_write(path, lambda f: f.write(
        "".join(json.dumps(row) + "\n" for row in history).encode()))


def plot_curves(path, history):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [row["epoch"] for row in history]
    split = "val" if any("val_acc" in row for row in history) else "test"
    name = {"val": "validation", "test": "test"}[split]
    evaluated = [row for row in history if split + "_acc" in row]    # see --eval-every
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], "o-",
                 label="train (with label smoothing, augmentation)")
    ax_loss.plot([r["epoch"] for r in evaluated], [r[split + "_loss"] for r in evaluated],
                 "o-", label=name)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    ax_acc.plot(epochs, [100 * r["train_acc"] for r in history], "o-", label="train")
    ax_acc.plot([r["epoch"] for r in evaluated], [100 * r[split + "_acc"] for r in evaluated],
                "o-", label=name)
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("minivit on CIFAR-10")
    fig.tight_layout()
    checkpoint.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


# --- the program ------------------------------------------------------------------------

OUTPUT_FILES = ("checkpoint.npz", "log.jsonl", "curves.png")     # what a run writes to OUT


def usable_cores():
    """The CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def local_processes(args, world):
    """How many processes of this machine to start (--processes; see CORE_PRESETS)."""
    if args.processes is None:
        cores = args.preset in CORE_PRESETS and args.backend == "numpy" and world.size == 1
        return min(usable_cores(), MAX_PROCESSES) if cores else 1
    if args.processes > 1 and args.backend != "numpy":
        sys.exit(f"error: --processes {args.processes} runs NumPy on the cores of this machine; "
                 "with --backend cupy start one process per GPU with mpiexec instead")
    if args.processes > 1 and world.size > 1:
        sys.exit(f"error: --processes {args.processes} under mpiexec: mpiexec has started "
                 f"{world.size} processes already; use one or the other")
    return args.processes


def main(argv=None, world=None):
    """The program; `world`: given to ranks 1.. that --processes started (other_rank)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    out = pathlib.Path(args.out)
    processes = 1
    if world is None:
        world = distributed.world()        # several processes under mpiexec, else one
        processes = local_processes(args, world)
    device = cli.use_backend(args.backend, world.local_rank)    # one GPU per rank
    if device == "cpu":
        backend.keep_host_memory()
    if not world.is_main:                  # only rank 0 prints and writes files
        sys.stdout = open(os.devnull, "w")
    if args.resume and not (out / "checkpoint.npz").is_file():
        sys.exit(f"error: --resume: no checkpoint at {out / 'checkpoint.npz'}")
    saved = {"epoch": None}                # the epoch of the checkpoint on disk
    with contextlib.ExitStack() as held:
        if world.is_main:                  # one run at a time in OUT
            check_writable(out)
            held.enter_context(cli.lock_folder(out))
        cifar = None
        if processes > 1:                  # found (or downloaded) once, then the other ranks
            cifar = cli.find_cifar10(args.data_dir, args.no_download)
            world = distributed.start(processes, other_rank, argv)
            held.push(lambda error, *_: world.close(wait=error is None))
        threads = args.threads
        if threads is None and isinstance(world, distributed.Local):
            threads = max(1, usable_cores() // world.size)
        if threads:
            held.enter_context(cli.limit_threads(threads))
        try:
            return train(args, out, device, world, saved, cifar)
        except KeyboardInterrupt:
            raise KeyboardInterrupt(what_is_kept(out / "checkpoint.npz", saved["epoch"])) from None


def other_rank(world, argv):
    """Ranks 1.. of --processes N: the same program on their shares of every batch."""
    quiet_numpy_warnings()
    main(argv, world)


def quiet_numpy_warnings():
    """NumPy's overflow and invalid-value warnings of a diverging run: the run checks for
    NaN and infinity itself and stops with one line that says what to change."""
    warnings.filterwarnings("ignore", r"(overflow|invalid value|divide by zero) encountered",
                            RuntimeWarning)


def what_is_kept(ckpt_path, epoch):
    """What a run interrupted now leaves behind, for the Ctrl-C line."""
    if epoch is not None:
        return f"the checkpoint after epoch {epoch} is kept at {ckpt_path}; continue with --resume"
    if ckpt_path.is_file():                # resuming, interrupted before it was read
        return f"the checkpoint {ckpt_path} is kept; continue with --resume"
    return ("no checkpoint was written yet (the first epoch had not finished): there is "
            "nothing to resume; start the run again")


def divergence_advice(s):
    """The flags that set the size of each step: the ones to lower when a run diverges."""
    flags = [f"--lr (now {s.lr:g})", f"--weight-decay (now {s.weight_decay:g})"]
    if s.optimizer == "sgd":
        flags.append(f"--momentum (now {s.momentum:g})")
    flags.append(f"--clip-norm (now {s.clip_norm:g}" + (": off" if not s.clip_norm else "") + ")")
    return ("The size of each step comes from " + ", ".join(flags) + " and the warm-up "
            "(--warmup-epochs or --warmup-steps): try a lower --lr or --weight-decay, a "
            "smaller non-zero --clip-norm or a longer warm-up.")


def weights_finite(optimizer):
    """Whether every parameter is finite (no NaN, no infinity): one read from the device."""
    xp = backend.array_module(optimizer.buffers[0].data)
    flags = xp.stack([xp.isfinite(buffer.data).all() for buffer in optimizer.buffers])
    return bool(backend.to_numpy(flags).all())


def train(args, out, device, world, saved, cifar=None):
    """The run, in OUT, which main holds; saved["epoch"] follows the checkpoint on disk;
    `cifar`: the data, when main has loaded it already."""
    ckpt_path = out / "checkpoint.npz"
    state = None
    if args.resume:
        try:
            state = checkpoint.load_checkpoint(ckpt_path)
            s = Settings(**state["settings"])
            ViTConfig(**state["config"])
        except (checkpoint.CheckpointError, KeyError, TypeError, ValueError) as e:
            sys.exit(f"error: --resume: cannot continue from {ckpt_path}: {e}")
        saved["epoch"] = state["epoch"]
        conflicts = resume_conflicts(args, state["settings"])
        if conflicts:
            sys.exit(f"error: --resume continues {ckpt_path} with the settings saved there; "
                     f"these flags contradict them: {'; '.join(conflicts)}. Leave them out, "
                     f"or start a new run with another --out")
        if args.epochs is not None:
            s.epochs, s.steps = args.epochs, None
        if args.steps is not None:
            s.steps = args.steps
        if args.eval_every is not None:
            s.eval_every = args.eval_every
        print(f"resuming from {ckpt_path} after epoch {state['epoch']} (settings saved there)")
    else:
        s = settings_from(args)
        if args.preset == "finetune" and not s.pretrained:
            sys.exit("error: --preset finetune fine-tunes a pre-trained model: give the official "
                     "checkpoint with --pretrained PATH (e.g. ViT-B_16.npz from "
                     "google-research/vision_transformer)")
        shape_flags = [f"--{name.replace('_', '-')}" for name in SHAPE_FIELDS
                       if getattr(args, name) is not None]
        if s.pretrained and shape_flags:
            sys.exit(f"error: {', '.join(shape_flags)} cannot change the shape of a pre-trained "
                     f"model (--pretrained decides it); leave them out")
        if ckpt_path.exists():
            sys.exit(f"error: {ckpt_path} already exists; pass --resume to continue that run, "
                     f"or choose another --out")
        if (out / "log.jsonl").exists():
            sys.exit(f"error: {out / 'log.jsonl'} exists without a checkpoint beside it (an "
                     f"earlier run's log?); choose another --out, or move the log away")
    if not s.pretrained:
        try:
            s.model_config()                       # a shape that cannot work fails now
        except ValueError as e:
            sys.exit(f"error: {e}: choose other --model/--hidden-size/--num-heads/--patch-size")
    if world.is_main:                              # left by a run killed mid-write
        checkpoint.remove_stale_temporaries(out, OUTPUT_FILES)

    if cifar is None:
        cifar = cli.find_cifar10(args.data_dir, args.no_download)
    train_x, train_y = cifar.train_images, cifar.train_labels
    split = "val" if s.val_split else "test"       # what the run evaluates on
    if s.val_split:
        if s.val_split >= len(train_x):
            sys.exit(f"error: --val-split {s.val_split} leaves no training image: there "
                     f"are {len(train_x):,}; hold out fewer")
        eval_x, eval_y = train_x[-s.val_split:], train_y[-s.val_split:]
        train_x, train_y = train_x[:-s.val_split], train_y[:-s.val_split]
    else:
        eval_x, eval_y = cifar.test_images, cifar.test_labels
    if s.train_subset:
        train_x, train_y = train_x[:s.train_subset], train_y[:s.train_subset]

    if state is not None:
        model = VisionTransformer(ViTConfig(**state["config"]), seed=s.seed)
    elif s.pretrained:
        from minivit.official import load_official
        from minivit.pretrained import detect_format, from_pretrained
        try:
            if detect_format(s.pretrained) == "official":
                model = load_official(s.pretrained, num_classes=10, image_size=s.image_size,
                                      seed=s.seed, dropout=s.dropout,
                                      attention_dropout=s.attention_dropout,
                                      patch_dropout=s.patch_dropout,
                                      **({"gelu": s.gelu} if s.gelu else {}))
            else:                     # minivit, timm or Hugging Face weights: their config
                loaded = from_pretrained(s.pretrained, num_classes=10, image_size=s.image_size)
                config = dataclasses.replace(loaded.config, dropout=s.dropout,
                                             attention_dropout=s.attention_dropout,
                                             patch_dropout=s.patch_dropout,
                                             **({"gelu": s.gelu} if s.gelu else {}))
                model = VisionTransformer(config, seed=s.seed)
                model.load_state_dict(loaded.state_dict())
        except (ValueError, KeyError, OSError) as e:
            sys.exit(f"error: --pretrained {s.pretrained}: {e}")
    else:
        model = VisionTransformer(s.model_config(), seed=s.seed)
    model.to(device)
    mean, std = s.normalization()
    Optimizer = {"adamw": AdamW, "sgd": SGD}[s.optimizer]
    options = {"momentum": s.momentum} if s.optimizer == "sgd" else {}
    optimizer = Optimizer(model.parameters(), lr=s.lr, weight_decay=s.weight_decay,
                          no_decay=model.no_weight_decay(), **options)
    history, start_epoch = [], 0
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (KeyError, ValueError, TypeError) as e:
            sys.exit(f"error: --resume: {ckpt_path} does not match the model it describes: {e}")
        history, start_epoch = state["history"], state["epoch"]
    world.check_agree("the settings and the data", [dataclasses.asdict(s), len(train_x),
                                                     int(train_y.sum()), state is not None])
    distributed.broadcast_parameters(world, optimizer)        # every rank starts from rank 0's

    loader = data.Loader(train_x, train_y, s.batch_size, seed=s.seed, augment=s.augment,
                         mean=mean, std=std, device=device, num_classes=10)   # labels checked once
    steps_per_epoch = loader.num_batches()
    total_steps, _, epochs = s.schedule(steps_per_epoch)
    print(f"{model.describe()}")
    evaluated_on = (f"validating on the last {len(eval_x):,} training images"
                    if s.val_split else f"testing on {len(eval_x):,}")
    print(f"training on {cli.plural(len(train_x), 'image')}, {evaluated_on}; "
          f"{cli.plural(total_steps, 'step')} "
          f"({cli.plural(epochs, 'epoch')} of {steps_per_epoch}), batch {s.batch_size}, "
          f"{s.optimizer} lr {s.lr:g}, backend {cli.backend_text(args.backend)}"
          + (f", {world.size} processes" if world.size > 1 else "")
          + (" (MPI)" if world.comm is not None else ""), flush=True)
    elapsed = history[-1]["elapsed_s"] if history else 0.0
    eval_batch = args.eval_batch_size or (128 if device == "cpu" else 500)
    show_progress = world.is_main and not args.no_progress

    def stop(problem):
        kept = (f"the last good checkpoint (after epoch {saved['epoch']}) is kept at {ckpt_path}"
                if saved["epoch"] is not None else "no checkpoint was written yet")
        sys.exit(f"error: {problem}; stopping. {kept}. {divergence_advice(s)}")

    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        train, problem = train_epoch(model, optimizer, loader, epoch, s, show_progress, world)
        if problem:
            stop(problem)
        train_time = time.perf_counter() - t0
        last = epoch == epochs - 1
        test = {}
        if last or (epoch + 1) % s.eval_every == 0:
            test = evaluate(model, eval_x, eval_y, eval_batch, mean, std, device, world,
                            show_progress, split, flip=last)
        if not weights_finite(optimizer):
            stop(f"the weights became NaN or infinite in epoch {epoch + 1}"
                 + (f" ({split} loss {test[split + '_loss']:g})" if test else ""))
        if test and not math.isfinite(test[split + "_loss"]):
            stop(f"the {split} loss became {test[split + '_loss']:g} after epoch {epoch + 1}")
        elapsed += time.perf_counter() - t0
        row = {"epoch": epoch + 1, **train, **test, "lr": optimizer.lr,
               "images_per_s": train["train_images"] / train_time, "elapsed_s": elapsed}
        history.append(row)
        if world.is_main:
            checkpoint.save_checkpoint(ckpt_path, model, optimizer, epoch=epoch + 1,
                                       settings=dataclasses.asdict(s), history=history,
                                       normalization={"mean": list(mean), "std": list(std)},
                                       class_names=list(cifar.class_names))
        saved["epoch"] = epoch + 1
        if world.is_main:
            write_log(out / "log.jsonl", history)
            plot_curves(out / "curves.png", history)
        evaluated = (f"{split} loss {row[split + '_loss']:.4f} acc "
                     f"{100 * row[split + '_acc']:5.2f}%" if test else
                     " " * len(f"{split} loss 0.0000 acc 00.00%"))
        print(f"epoch {epoch + 1:3d}/{epochs}  train loss {row['train_loss']:.4f} "
              f"acc {100 * row['train_acc']:5.2f}%  {evaluated}  "
              f"{row['images_per_s']:,.0f} img/s  {elapsed / 60:.1f} min", flush=True)

    if world.is_main:                      # what the trained model learned (paper Fig. 7)
        sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
        from visualize import write_model_figures
        sample = data.normalize(eval_x[::max(1, len(eval_x) // 256)],
                                mean, std)
        sample = resize_bilinear(backend.asarray(sample, device=device), model.config.image_size)
        for path in write_model_figures(model, out / "figures", sample):
            print(f"figure: {path}")

    final = history[-1] if history else None
    if final:
        name = "validation" if s.val_split else "test"
        flipped = final.get(split + "_acc_flip")
        print(f"final {name} accuracy: {100 * final[split + '_acc']:.2f}%"
              + (f" ({100 * flipped:.2f}% with test-time flip averaging)"
                 if flipped is not None else "")
              + " after "
              f"{cli.plural(final['epoch'], 'epoch')} ({final['elapsed_s'] / 60:.1f} min)")
    print(f"log: {out / 'log.jsonl'}\ncurves: {out / 'curves.png'}\ncheckpoint: {ckpt_path}")
    return final


if __name__ == "__main__":
    cli.install()
    quiet_numpy_warnings()
    world = distributed.world()
    try:
        main()
    except KeyboardInterrupt as e:
        cli.say_interrupted(str(e) or None)
        sys.exit(cli.INTERRUPTED)
    except BaseException as e:
        # Under MPI a rank that stops alone would leave the others waiting in a collective
        # for ever: say why on this rank, then end every rank.  An error that every rank
        # raised at once (disagreeing settings) leaves none waiting: each just stops.
        if world.size > 1 and not (isinstance(e, SystemExit) and not e.code):
            if isinstance(e, SystemExit):
                print(f"rank {world.rank}: {e.code}", file=sys.stderr, flush=True)
            elif isinstance(e, cli.USER_ERRORS + (distributed.DistributedError,)):
                print(f"rank {world.rank}: {cli.message(e)}", file=sys.stderr, flush=True)
            else:
                traceback.print_exc()
            if getattr(e, "everywhere", False):
                sys.exit(1)
            world.abort(1)
        raise
