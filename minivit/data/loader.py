"""Mini-batches for training, reproducible from (seed, epoch).

    train = Loader(train_images, train_labels, batch_size=128, augment="standard", seed=0)
    for epoch in range(start_epoch, epochs):
        for x, y in train.epoch(epoch):      # x float32 (B, 3, 32, 32), y int64 (B,)
            ...
    test = Loader(test_images, test_labels, batch_size=500, shuffle=False)

Each batch is gathered, augmented and normalised on the host as float32 NCHW, then
moved to the device once (`backend.asarray(batch, device=...)`).

Augmentation policies (augment=):
    "none" (or False)       normalisation only
    "standard" (or True)    random crop after 4-pixel zero padding, horizontal flip
    "strong"                "standard" plus Cutout of a 16x16 square

Reproducibility, the contract a trainer can rely on: every random number of epoch e
comes from generators seeded by (seed, e) alone --

    the order of epoch e:              default_rng([seed, e, 0, 0]).permutation(N)
    the augmentation of batch b of e:  default_rng([seed, e, 1, b])

-- and nothing is carried from one epoch or batch to the next.  So `epoch(k)` yields the
same batches whether or not epochs 0..k-1 ran in this process, and `epoch(k, start=b)`
yields batches b, b+1, ... of that same epoch.  A checkpoint needs only the seed and
the epoch (and the batches done, to resume mid-epoch).  The keys all have four numbers
because NumPy's SeedSequence treats trailing zeros as absent: [s, e] and [s, e, 0] seed
the same generator.
"""
import math

from minivit import backend
from minivit.data.augment import CIFAR10_MEAN, CIFAR10_STD, cutout, normalize, random_crop_flip

np = backend.module_for("cpu")     # NumPy: everything in minivit.data runs on the host

_ORDER, _AUGMENT = 0, 1            # the two random streams of an epoch
POLICIES = ("none", "standard", "strong")


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"Loader: {name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _policy(augment):
    if augment is None or augment is False:
        return "none"
    if augment is True:
        return "standard"
    if augment not in POLICIES:
        raise ValueError(f"Loader: augment must be 'none', 'standard' (crop and flip) or "
                         f"'strong' (also Cutout), or a bool; got {augment!r}")
    return augment


class Loader:
    """Batches (x, y) of `images` (uint8 (N, C, H, W), host) and `labels` (ints (N,)).

    batch_size   images per batch; the last batch is smaller unless drop_last=True.
    shuffle      a new order every epoch, drawn from (seed, epoch); False: 0..N-1.
    augment      "none", "standard" (crop and flip) or "strong" (also Cutout).
    mean, std    per-channel normalisation, x = (pixel / 255 - mean) / std.
    device       where batches go ("cpu"/"cuda"; None: the default backend's device).
    """

    def __init__(self, images, labels, batch_size, shuffle=True, seed=0, augment="none",
                 drop_last=False, mean=CIFAR10_MEAN, std=CIFAR10_STD, device=None):
        if not isinstance(images, np.ndarray) or images.ndim != 4 or images.dtype != np.uint8:
            got = (f"{images.dtype} of shape {images.shape}" if isinstance(images, np.ndarray)
                   else type(images).__name__)
            raise ValueError(f"Loader: expected images as a host uint8 array (N, C, H, W), "
                             f"got {got}")
        labels = np.asarray(labels)
        if labels.shape != (len(images),) or labels.dtype.kind not in "iu":
            raise ValueError(f"Loader: expected {len(images)} integer labels, shape "
                             f"({len(images)},), got {labels.dtype} of shape {labels.shape}")
        self.images, self.labels = images, labels.astype(np.int64)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.seed = _check_int("seed", seed, 0)
        self.augment = _policy(augment)
        self.shuffle, self.drop_last = bool(shuffle), bool(drop_last)
        self.mean, self.std = mean, std
        self.device = backend.device_name(device or backend.default_device())
        normalize(images[:1], mean, std)       # fail here, not mid-epoch, on a bad mean/std

    def num_images(self):
        """Images per epoch (those in dropped last batches not counted)."""
        return self.num_batches() * self.batch_size if self.drop_last else len(self.images)

    def num_batches(self):
        """Batches per epoch."""
        n = len(self.images)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    __len__ = num_batches

    def order(self, epoch):
        """The indices of the images in the order epoch `epoch` visits them."""
        if not self.shuffle:
            return np.arange(len(self.images))
        return np.random.default_rng([self.seed, epoch, _ORDER, 0]).permutation(len(self.images))

    def epoch(self, epoch, start=0):
        """The batches (x, y) of epoch `epoch`, from batch `start` on, on self.device."""
        epoch, start = _check_int("epoch", epoch, 0), _check_int("start", start, 0)
        order = self.order(epoch)
        return (self.make_batch(order[b * self.batch_size:(b + 1) * self.batch_size],
                                np.random.default_rng([self.seed, epoch, _AUGMENT, b]))
                for b in range(start, self.num_batches()))

    def make_batch(self, indices, rng):
        """(x, y) on self.device for the images at `indices`, augmented with draws from rng."""
        images = self.images[indices]
        if self.augment != "none":
            images = random_crop_flip(images, rng)
        x = normalize(images, self.mean, self.std)
        if self.augment == "strong":
            x = cutout(x, rng)
        return (backend.asarray(x, device=self.device),
                backend.asarray(self.labels[indices], device=self.device))


def batches(images, labels, batch_size, shuffle=True, seed=0, epoch=0, augment="none",
            drop_last=False, device=None, rng=None):
    """One epoch of batches (x, y): `Loader(...).epoch(epoch)`, see Loader.

    With `rng` (a numpy Generator) the order and the augmentation are drawn from it
    instead, one after the other: handy for a quick loop, but then the batches depend
    on everything drawn from rng before, and (seed, epoch) no longer reproduce them.
    """
    loader = Loader(images, labels, batch_size, shuffle=shuffle, seed=seed, augment=augment,
                    drop_last=drop_last, device=device)
    if rng is None:
        return loader.epoch(epoch)
    order = rng.permutation(len(images)) if shuffle else np.arange(len(images))
    return (loader.make_batch(order[b * batch_size:(b + 1) * batch_size], rng)
            for b in range(loader.num_batches()))
