"""Draw what a trained Vision Transformer learned: the paper's Figures 6 and 7 (Sec. 4.5).

    python examples/visualize.py --checkpoint runs/cifar/checkpoint.npz cat.png ship.jpg
    python examples/visualize.py --checkpoint ViT-B_16.npz photo.jpg --out figs --backend cupy

The checkpoint is minivit's own (examples/train_cifar.py) or an official
google-research/vision_transformer .npz.  Each image is prepared as examples/predict.py
prepares it (made RGB, resized, centre-cropped, normalised as the model was trained).
Into --out go:

    rollout_NN_<image>.png       Fig. 6: the image, its attention rollout (App. D.8) from the
                                 output token to the patches, and the image weighted by it
    embedding_filters.png        Fig. 7 left: principal components of the patch embedding E
    position_embeddings.png      Fig. 7 centre: cosine similarity of the position embeddings
    attention_distance.png       Fig. 7 right: mean attention distance of every head by block
                                 (App. D.7), averaged over the images given

Without images only the two figures of the weights are drawn.  A figure that does not
apply to the model (no position embeddings; the filters of a hybrid) is left out with a
note.  minivit.inspection computes every quantity; this program only draws.  A checkpoint
or an image that cannot be read stops it before anything is drawn: one line per problem
on stderr ("error: ..."), exit status 1.

From another program (examples/train_cifar.py at the end of a run):

    from visualize import write_model_figures
    write_model_figures(model, out / "figures", images=normalised_test_images[:256])
"""
import argparse
import math
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")                 # figures go to files

import matplotlib.pyplot as plt       # noqa: E402
import numpy as np                    # noqa: E402

from minivit import backend, checkpoint, cli, images as image_files, inspection  # noqa: E402
from minivit.data import CIFAR10_MEAN, CIFAR10_STD  # noqa: E402
from minivit.data.resize import resize_bilinear  # noqa: E402

FILTERS = 28                          # Fig. 7 shows the first 28 principal components



def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Draw the paper's Fig. 6 (attention rollout) and Fig. 7 (embedding "
                    "filters, position embeddings, attention distance) for a ViT checkpoint.",
        formatter_class=cli.HelpFormatter)
    p.add_argument("images", nargs="*", type=cli.path, metavar="IMAGE",
                   help="image files (any Pillow format)")
    p.add_argument("--checkpoint", type=cli.path, required=True,
                   help="minivit checkpoint (examples/train_cifar.py) or official ViT .npz")
    p.add_argument("--out", type=cli.path, default="runs/figures", help="folder for the PNG files")
    p.add_argument("--backend", choices=["numpy", "cupy"], default=backend.default_backend_name(),
                   help="numpy runs on the CPU, cupy on an NVIDIA GPU (default: "
                        "$MINIVIT_BACKEND, else numpy)")
    p.add_argument("--batch-size", type=cli.positive_int, default=16,
                   help="images per forward pass")
    return p.parse_args(argv)


# --- inputs ------------------------------------------------------------------------------

def load_model(path):
    """(model, normalisation {"mean", "std"}) of a checkpoint; exits with one line on error."""
    path = pathlib.Path(path)
    if not path.is_file():
        sys.exit(f"error: no checkpoint file at {path}")
    try:
        from minivit import official
        if official.is_official(path):
            return official.load_official(path), image_files.OFFICIAL_NORMALIZATION
        state = checkpoint.load_checkpoint(path)
        model = checkpoint.model_from_checkpoint(state)
    except Exception as e:       # a corrupt zip, a wrong format, missing arrays: say so, stop
        sys.exit(f"error: cannot load the checkpoint {path}: {e}")
    return model, state.get("normalization") or {"mean": CIFAR10_MEAN, "std": CIFAR10_STD}


def read_images(paths, size):
    """uint8 (N, 3, size, size) of the files; exits naming every file it cannot read."""
    arrays, bad = [], []
    for path in paths:
        notes = []
        try:
            arrays.append(image_files.prepare_image(path, size, notes=notes))
        except Exception as e:
            bad.append(f"error: cannot read image {path}: {type(e).__name__}: {e}")
        for note in notes:
            print(f"note: {path}: {note}", file=sys.stderr)
    if bad:
        sys.exit("\n".join(bad))
    return np.stack(arrays) if arrays else np.zeros((0, 3, size, size), np.uint8)


# --- the quantities, over batches of images ----------------------------------------------

def inspect_images(model, x, batch_size=16):
    """(rollout to the patches (N, g, g), mean attention distance (blocks, heads), and that
    distance for attention spread evenly over all tokens) of normalised images x
    (N, C, H, W), a batch at a time.

    The rollout row is the output token's: [CLS] (token 0) for classifier="token"; with
    classifier="gap" the head reads the mean of the patch outputs, so its row is the mean
    of the patch rows.  Distances are in pixels: a token covers image_size / g pixels (the
    patch size, or a hybrid's effective one)."""
    has_cls = model.config.classifier == "token"
    rollouts, distance = [], 0.0
    for start in range(0, len(x), batch_size):
        maps = inspection.attention_maps(model, x[start:start + batch_size])
        tokens = maps[0].shape[-1]
        grid = math.isqrt(tokens - has_cls)
        pixels = model.config.image_size / grid
        rollout = inspection.attention_rollout(maps)
        row = rollout[:, 0, 1:] if has_cls else rollout.mean(axis=1)
        rollouts.append(row.reshape(-1, grid, grid))
        distance = distance + inspection.mean_attention_distance(maps, pixels, has_cls) * len(row)
    # A = 1/T everywhere: each query patch's weights on the N patches sum to N/T
    uniform = inspection.patch_distances(grid, pixels).mean() * grid * grid / tokens
    return np.concatenate(rollouts), distance / len(x), uniform


# --- the figures ---------------------------------------------------------------------------

def save(fig, path):
    path = pathlib.Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with cli.writing(path):
            fig.savefig(path, dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def draw(make, path, failed):
    """save(make(), path), or None: a figure that does not apply to the model (make raises
    ValueError) is left out with a note; one that cannot be drawn or written is left out
    with an error line naming it and why, and its name goes into `failed`."""
    try:
        return save(make(), path)
    except ValueError as e:
        print(f"note: no {path.name}: {e}")
    except Exception as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"
        print(f"error: could not draw {path}: {reason}", file=sys.stderr, flush=True)
        failed.append(path.name)
    return None


def rollout_figure(image, rollout, title):
    """Fig. 6: the image (uint8 (3, S, S)), the rollout over it, the image weighted by it."""
    S = image.shape[-1]
    mask = rollout / rollout.max()
    mask = resize_bilinear(mask[None, None].astype(np.float32), S)[0, 0]   # g x g -> S x S
    picture = image.transpose(1, 2, 0)
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.3))
    axes[0].imshow(picture)
    axes[0].set_title("input")
    axes[1].imshow(picture)
    axes[1].imshow(mask, cmap="inferno", alpha=0.6, vmin=0, vmax=1)
    axes[1].set_title("attention rollout")
    axes[2].imshow((picture * mask[:, :, None]).astype(np.uint8))
    axes[2].set_title("input x rollout (Fig. 6)")
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    return fig


def filters_figure(filters):
    """Fig. 7 left: principal components (k, P, P, C), each stretched to [0, 1]."""
    k = len(filters)
    cols = min(k, 7)
    rows = -(-k // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.3 * rows + 0.5), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < k:
            f = filters[i]
            f = (f - f.min()) / max(f.max() - f.min(), 1e-12)
            colour = f.shape[-1] == 3
            ax.imshow(f if colour else f[..., 0], cmap=None if colour else "gray")
    fig.suptitle(f"Patch embedding E: the first {k} principal components of its filters",
                 fontsize=10)
    return fig


def position_figure(similarity):
    """Fig. 7 centre: tile (g, g, g, g) as g x g small maps, one per patch, into one image
    (a NaN line between tiles)."""
    g = similarity.shape[0]
    tiles = np.full((g, g, g + 1, g + 1), np.nan)
    tiles[:, :, :g, :g] = similarity
    mosaic = tiles.transpose(0, 2, 1, 3).reshape(g * (g + 1), g * (g + 1))[:-1, :-1]
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    shown = ax.imshow(mosaic, cmap="viridis", vmin=-1, vmax=1)
    centres = np.arange(g) * (g + 1) + (g - 1) / 2
    step = max(1, g // 8)
    ax.set_xticks(centres[::step], [str(i + 1) for i in range(0, g, step)])
    ax.set_yticks(centres[::step], [str(i + 1) for i in range(0, g, step)])
    ax.set(xlabel="input patch column", ylabel="input patch row",
           title="Position embedding similarity (Fig. 7 centre)")
    fig.colorbar(shown, ax=ax, label="cosine similarity")
    return fig


def distance_figure(distance, uniform, image_size):
    """Fig. 7 right: one dot per head, by block; the dashed line is attention spread evenly
    over all patches."""
    blocks, heads = distance.shape
    fig, ax = plt.subplots(figsize=(6, 4))
    for h in range(heads):
        ax.plot(np.arange(1, blocks + 1), distance[:, h], "o", alpha=0.8, label=f"head {h + 1}")
    ax.axhline(uniform, color="k", ls="--", lw=1, label="uniform attention")
    ax.set(xlabel="network depth (encoder block)", ylabel="mean attention distance (pixels)",
           title=f"Mean attention distance, {image_size}x{image_size} images (Fig. 7 right)",
           ylim=(0, max(uniform, distance.max()) * 1.15))
    ax.set_xticks(np.arange(1, blocks + 1))
    ax.grid(alpha=0.3)
    if heads <= 16:
        ax.legend(fontsize=7, ncol=2, loc="lower right")
    return fig


# --- the programs' entry points ------------------------------------------------------------

def write_weight_figures(model, out, failed):
    """embedding_filters.png and position_embeddings.png (see draw)."""
    def filters():
        k = min(FILTERS, *model.patch_embed.kernel.shape)
        return filters_figure(inspection.embedding_filters(model, k))
    return [draw(filters, out / "embedding_filters.png", failed),
            draw(lambda: position_figure(inspection.position_embedding_similarity(model)),
                 out / "position_embeddings.png", failed)]


def write_distance_figure(model, out, distance, uniform, failed):
    """attention_distance.png, and the distances by block on stdout."""
    print("mean attention distance (pixels) by block, averaged over the heads: "
          + ", ".join(f"{d:.1f}" for d in distance.mean(axis=1))
          + f" (uniform attention: {uniform:.1f})")
    return draw(lambda: distance_figure(distance, uniform, model.config.image_size),
                out / "attention_distance.png", failed)


def write_model_figures(model, out_dir, images=None, batch_size=16, failed=None):
    """Write embedding_filters.png, position_embeddings.png and -- given images, normalised
    model inputs (N, C, H, W) on the host or the device -- attention_distance.png into
    out_dir.  A figure that does not apply, or cannot be drawn, is left out with a line
    that says why (see draw).  Returns the paths written."""
    out, failed = pathlib.Path(out_dir), [] if failed is None else failed
    written = write_weight_figures(model, out, failed)
    if images is not None and len(images):
        _, distance, uniform = inspect_images(model, images, batch_size)
        written.append(write_distance_figure(model, out, distance, uniform, failed))
    return [path for path in written if path is not None]


def main(argv=None):
    """Write the figures; returns the paths written."""
    args = parse_args(argv)
    cli.use_backend(args.backend)
    model, normalization = load_model(args.checkpoint)
    c = model.config
    if c.in_channels != 3:
        sys.exit(f"error: {args.checkpoint}: this program feeds RGB images (3 channels), the "
                 f"model expects {c.in_channels}")
    pictures = read_images(args.images, c.image_size)
    model.to(backend.default_device())
    x = image_files.normalize_batch(pictures, normalization["mean"], normalization["std"])
    print(f"{args.checkpoint}: {c.image_size}x{c.image_size} images, "
          f"{cli.plural(len(pictures), 'image')} given")

    out, failed = pathlib.Path(args.out), []
    written = write_weight_figures(model, out, failed)
    if len(pictures):
        rollouts, distance, uniform = inspect_images(model, x, args.batch_size)
        written.append(write_distance_figure(model, out, distance, uniform, failed))
        for i, (path, picture, rollout) in enumerate(zip(args.images, pictures, rollouts)):
            name = pathlib.Path(path).stem
            written.append(draw(lambda: rollout_figure(picture, rollout,
                                                       f"{name}: attention rollout"),
                                out / f"rollout_{i:02d}_{name}.png", failed))
    written = [path for path in written if path is not None]
    for path in written:
        print(f"wrote {path}")
    if failed:
        sys.exit(f"error: {cli.plural(len(failed), 'figure')} could not be drawn: "
                 f"{', '.join(failed)}")
    return written


if __name__ == "__main__":
    cli.install()
    main()
