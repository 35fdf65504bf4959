"""Classify image files with a trained Vision Transformer.

    python examples/predict.py cat.jpg dog.png --checkpoint runs/cifar/checkpoint.npz
    python examples/predict.py photos/*.jpg --checkpoint ViT-B_16.npz --labels names.txt --top 3
    python examples/predict.py cat.jpg --checkpoint ckpt.npz --backend cupy

For each image it prints the K most probable classes (softmax of the logits):

    cat.jpg
       91.20%  cat
        4.01%  dog

The checkpoint is either minivit's own (written by examples/train_cifar.py: it holds
the class names and the normalisation the model was trained with) or an official
google-research/vision_transformer .npz (read by minivit.official; normalised as
pixel / 127.5 - 1, no class names inside: give them with --labels, one per line,
else classes print as "class 17"), or timm or Hugging Face weights: a .safetensors file
or a folder with config.json (read by minivit.pretrained; the class names and
normalisation are their config's).

Images may be of any mode Pillow reads (greyscale, palette, RGBA, CMYK, 16-bit, ...);
each is turned upright by its EXIF orientation, made RGB (transparent pixels are
composited onto white), resized with bicubic interpolation so its shorter side is the
model's resolution, and centre-cropped to a square (see minivit/images.py).  A file
that cannot be read is reported on stderr by name and the others are still
classified; the exit status is then 1.
"""
import argparse
import importlib
import pathlib
import sys
from collections import namedtuple

import numpy as np

import minivit as mv
from minivit import backend, checkpoint, cli, images
from minivit.data import CIFAR10_MEAN, CIFAR10_STD

Prediction = namedtuple("Prediction", "index name probability")



def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Print the top-K classes of images under a Vision Transformer checkpoint.",
        formatter_class=cli.HelpFormatter)
    p.add_argument("images", nargs="+", type=cli.path, metavar="IMAGE",
                   help="image files (any Pillow format)")
    p.add_argument("--checkpoint", type=cli.path, required=True,
                   help="minivit checkpoint (examples/train_cifar.py), official ViT .npz, "
                        "timm .safetensors or Hugging Face folder")
    p.add_argument("--labels", type=cli.path,
                   help="class names, one per line (as many lines as classes); "
                        "overrides the names in the checkpoint")
    p.add_argument("--top", type=cli.positive_int, default=5, help="classes to show per image")
    p.add_argument("--backend", choices=["numpy", "cupy"], default=backend.default_backend_name(),
                   help="numpy runs on the CPU, cupy on an NVIDIA GPU (default: "
                        "$MINIVIT_BACKEND, else numpy)")
    p.add_argument("--batch-size", type=cli.positive_int, default=32,
                   help="images per forward pass")
    p.add_argument("--max-pixels", type=cli.positive_int, default=images.MAX_PIXELS,
                   help="refuse images with more pixels than this (decoding a huge image can "
                        "exhaust the memory)")
    return p.parse_args(argv)


# --- the model, its normalisation and its class names ----------------------------------

def _official_module():
    """minivit.official, or None where it is not available."""
    try:
        return importlib.import_module("minivit.official")
    except ImportError:
        return None


def load_model(path):
    """(model, normalization {"mean", "std"}, class names or None, description) of a
    checkpoint file; exits with a clear message when it cannot be read."""
    path = pathlib.Path(path)
    if not path.exists():
        sys.exit(f"error: no checkpoint at {path}")
    weights_folder = path.is_dir() and any(
        (path / name).is_file() for name in ("config.json", "model.safetensors"))
    if weights_folder or path.suffix in (".safetensors", ".bin", ".pth", ".pt"):
        return load_pretrained_weights(path)          # timm or Hugging Face weights
    if not path.is_file():
        sys.exit(f"error: the checkpoint {path} is not a file (nor a folder with config.json)")
    official = _official_module()
    try:
        if official is not None and official.is_official(path):
            model = official.load_official(path)
            return model, images.OFFICIAL_NORMALIZATION, None, "official ViT checkpoint"
        state = checkpoint.load_checkpoint(path)
        model = checkpoint.model_from_checkpoint(state)
    except Exception as e:       # a corrupt zip, a wrong format, missing arrays: say so, stop
        hint = ("" if official is not None else
                "; official ViT checkpoints need minivit.official, which is not available")
        sys.exit(f"error: cannot load the checkpoint {path}: {e}{hint}")

    num_classes = model.config.num_classes
    normalization = state.get("normalization")
    if normalization is None:
        print(f"warning: {path} stores no normalisation; using CIFAR-10's channel statistics",
              file=sys.stderr)
        normalization = {"mean": CIFAR10_MEAN, "std": CIFAR10_STD}
    names = state.get("class_names")
    if names is not None and len(names) != num_classes:
        print(f"warning: {path} has {cli.plural(len(names), 'class name')} for "
              f"{cli.plural(num_classes, 'class')}; "
              f"ignoring them", file=sys.stderr)
        names = None
    return model, normalization, names, "minivit checkpoint"


def load_pretrained_weights(path):
    """load_model's answer for timm and Hugging Face weights (minivit.pretrained)."""
    from minivit.pretrained import load_pretrained
    try:
        loaded = load_pretrained(path)
    except Exception as e:
        sys.exit(f"error: cannot load the checkpoint {path}: {e}")
    normalization = loaded.normalization
    if normalization is None:
        print(f"warning: {path} stores no normalisation; using mean 0.5 and std 0.5 (the "
              f"official ViT's)", file=sys.stderr)
        normalization = images.OFFICIAL_NORMALIZATION
    kind = {"timm": "timm weights", "hf": "Hugging Face weights"}.get(loaded.format,
                                                                      f"{loaded.format} weights")
    return loaded.model, normalization, loaded.class_names, kind


def read_labels(path, num_classes):
    """Class names from a text file, one per line; exactly num_classes of them."""
    try:
        lines = pathlib.Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        sys.exit(f"error: cannot read the labels file {path}: {e}")
    while lines and not lines[-1].strip():           # trailing blank lines do not count
        lines.pop()
    names = [line.strip() for line in lines]
    if "" in names:
        sys.exit(f"error: the labels file {path}: line {names.index('') + 1} is blank; it needs "
                 f"one class name per line, in class order")
    if len(names) != num_classes:
        sys.exit(f"error: the labels file {path} has {cli.plural(len(names), 'line')} but the "
                 f"model has {cli.plural(num_classes, 'class')}; it needs one class name per line, in class order")
    return names


# --- classifying ------------------------------------------------------------------------

def why_unreadable(error):
    if isinstance(error, FileNotFoundError):
        return "no such file"
    if isinstance(error, IsADirectoryError):
        return "it is a directory"
    if isinstance(error, images.ImageTooLargeError):
        return str(error)
    return f"{type(error).__name__}: {error}"


def top_k(probabilities, k, names):
    """The k most probable classes of one image, most probable first (ties: lower index)."""
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [Prediction(int(i), names[i], float(probabilities[i])) for i in order]


def classify(model, arrays, normalization, device):
    """Softmax probabilities (N, num_classes) of uint8 images (N, 3, S, S)."""
    x = images.normalize_batch(arrays, normalization["mean"], normalization["std"])
    logits = model(mv.tensor(x, device=device))
    return backend.to_numpy(mv.softmax(logits, axis=-1).data).astype(np.float64)


def show(path, predictions):
    print(path)
    for p in predictions:
        print(f"  {100 * p.probability:7.2f}%  {p.name}")


def main(argv=None):
    """Classify the images; returns one list of Predictions per image (None where the image
    could not be read), in the order given."""
    args = parse_args(argv)
    device = cli.use_backend(args.backend)

    model, normalization, names, kind = load_model(args.checkpoint)
    c = model.config
    if c.in_channels != 3:
        sys.exit(f"error: {args.checkpoint}: this program feeds RGB images (3 channels), the "
                 f"model expects {c.in_channels}")
    if args.labels:
        names = read_labels(args.labels, c.num_classes)
    names = names or [f"class {i}" for i in range(c.num_classes)]
    k = min(args.top, c.num_classes)
    model.to(device).eval()
    print(f"{args.checkpoint}: {kind}, {c.image_size}x{c.image_size} images, "
          f"{cli.plural(c.num_classes, 'class')}")

    results = [None] * len(args.images)
    with mv.no_grad():
        for start in range(0, len(args.images), args.batch_size):
            batch, where = [], []
            for i in range(start, min(start + args.batch_size, len(args.images))):
                path = args.images[i]
                notes = []
                try:
                    batch.append(images.prepare_image(path, c.image_size,
                                                      max_pixels=args.max_pixels, notes=notes))
                    where.append(i)
                except Exception as e:   # unreadable: report it, classify the rest
                    print(f"error: cannot read image {path}: {why_unreadable(e)}",
                          file=sys.stderr, flush=True)
                for note in notes:
                    print(f"note: {path}: {note}", file=sys.stderr, flush=True)
            if not batch:
                continue
            probabilities = classify(model, np.stack(batch), normalization, device)
            for i, p in zip(where, probabilities):
                results[i] = top_k(p, k, names)
                show(args.images[i], results[i])
    sys.stdout.flush()
    return results


def exit_status(results):
    """0 when every image was classified, 1 when any could not be read."""
    return 1 if any(r is None for r in results) else 0


if __name__ == "__main__":
    cli.install()
    sys.exit(exit_status(main()))
