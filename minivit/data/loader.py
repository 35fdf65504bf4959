"""Mini-batches for training, reproducible from (seed, epoch), made on the device.

    train = Loader(train_images, train_labels, batch_size=128, augment="standard", seed=0)
    for epoch in range(start_epoch, epochs):
        for x, y in train.epoch(epoch):      # x float32 (B, 3, 32, 32), y int64 (B,)
            ...
    test = Loader(test_images, test_labels, batch_size=500, shuffle=False)

The training set lives on the device: the uint8 images and the labels are copied there
once, when the Loader is made (on NumPy, contiguous images and int64 labels are not
copied at all).  The random numbers
are drawn on the host, by NumPy generators, a whole epoch at a time: at the start of
epoch(e) the order and every batch's crop offsets, flips and Cutout centres are packed
into one int64 array, its columns the images of the epoch in visiting order,

    plan[0] = index    plan[1:4] = dy, dx, flip    plan[4:6] = cy, cx   ("strong" only)

and moved to the device in one copy.  Each batch is then a slice of the plan, and its
images are gathered, cropped, flipped, normalised and cut out by device arithmetic
(augment.crop_flip_at, augment.cutout_at): no copy to the device and no read back from
it inside an epoch.

Augmentation policies (augment=):
    "none" (or False)       normalisation only
    "flip"                  a random horizontal flip only
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
the same generator.  Batch b's generator draws what the host functions would, in their
order (augment.crop_flip_draws, then augment.cutout_draws), so a batch equals
cutout(normalize(random_crop_flip(images[index], rng), mean, std), rng).
"""
import math

from minivit import backend
from minivit.data.augment import (CIFAR10_MEAN, CIFAR10_STD, crop_flip_at, crop_flip_draws,
                                  cutout_at, cutout_draws, normalization)

np = backend.module_for("cpu")     # NumPy: the random draws, on the host

_ORDER, _AUGMENT = 0, 1            # the two random streams of an epoch
POLICIES = ("none", "flip", "standard", "strong")


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
        raise ValueError(f"Loader: augment must be 'none', 'flip', 'standard' (crop and "
                         f"flip) or 'strong' (also Cutout), or a bool; got {augment!r}")
    return augment


class Loader:
    """Batches (x, y) of `images` (uint8 (N, C, H, W), host) and `labels` (ints (N,)).

    batch_size   images per batch; the last batch is smaller unless drop_last=True.
    shuffle      a new order every epoch, drawn from (seed, epoch); False: 0..N-1.
    augment      "none", "flip", "standard" (crop and flip) or "strong" (also Cutout).
    mean, std    per-channel normalisation, x = (pixel / 255 - mean) / std.
    device       where the images live and batches are made ("cpu"/"cuda"; None: the
                 default backend's device).
    num_classes  if given, every label must be in [0, num_classes): checked here, once.
    """

    def __init__(self, images, labels, batch_size, shuffle=True, seed=0, augment="none",
                 drop_last=False, mean=CIFAR10_MEAN, std=CIFAR10_STD, device=None,
                 num_classes=None):
        if not isinstance(images, np.ndarray) or images.ndim != 4 or images.dtype != np.uint8:
            got = (f"{images.dtype} of shape {images.shape}" if isinstance(images, np.ndarray)
                   else type(images).__name__)
            raise ValueError(f"Loader: expected images as a host uint8 array (N, C, H, W), "
                             f"got {got}")
        labels = np.asarray(labels)
        if labels.shape != (len(images),) or labels.dtype.kind not in "iu":
            raise ValueError(f"Loader: expected {len(images)} integer labels, shape "
                             f"({len(images)},), got {labels.dtype} of shape {labels.shape}")
        if num_classes is not None:
            num_classes = _check_int("num_classes", num_classes, 1)
            bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
            if len(bad):
                raise ValueError(f"Loader: expected labels in [0, {num_classes}), got "
                                 f"{labels[bad[0]]} at index {bad[0]}")
        self.num_classes = num_classes
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.seed = _check_int("seed", seed, 0)
        self.augment = _policy(augment)
        self.padding = 0 if self.augment == "flip" else 4      # "flip": a crop of nothing
        self.shuffle, self.drop_last = bool(shuffle), bool(drop_last)
        self.mean, self.std = mean, std
        self.device = backend.device_name(device or backend.default_device())
        scale, shift = normalization(mean, std, images.shape[1])   # fails here on a bad mean/std
        # the training set, moved to the device once: three copies (none on NumPy)
        self.images = backend.asarray(np.ascontiguousarray(images), device=self.device)
        self.labels = backend.asarray(labels.astype(np.int64, copy=False), device=self.device)
        self.scale, self.shift = backend.asarray(np.stack([scale, shift]), device=self.device)

    def num_images(self):
        """Images per epoch (those in dropped last batches not counted)."""
        return self.num_batches() * self.batch_size if self.drop_last else len(self.images)

    def num_batches(self):
        """Batches per epoch."""
        n = len(self.images)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    __len__ = num_batches

    def order(self, epoch):
        """The indices of the images in the order epoch `epoch` visits them (host)."""
        if not self.shuffle:
            return np.arange(len(self.images))
        return np.random.default_rng([self.seed, epoch, _ORDER, 0]).permutation(len(self.images))

    def epoch(self, epoch, start=0):
        """The batches (x, y) of epoch `epoch`, from batch `start` on, on self.device."""
        epoch, start = _check_int("epoch", epoch, 0), _check_int("start", start, 0)
        index = self.order(epoch)[start * self.batch_size:self.num_images()]
        rngs = (np.random.default_rng([self.seed, epoch, _AUGMENT, b])
                for b in range(start, self.num_batches()))
        return self._batches(self.plan(index, rngs))

    def plan(self, index, rngs):
        """The images `index` (host, in visiting order) and their augmentation, drawn batch
        by batch from `rngs` (one generator per batch), as one int64 array (rows: index,
        dy, dx, flip, cy, cx as the policy needs; a column per image) on self.device."""
        rows = {"none": 1, "flip": 4, "standard": 4, "strong": 6}[self.augment]
        plan = np.zeros((rows, len(index)), np.int64)
        plan[0] = index
        _, _, h, w = self.images.shape
        starts = range(0, len(index), self.batch_size) if self.augment != "none" else ()
        for start, rng in zip(starts, rngs):               # a loop over batches, not images
            batch = slice(start, start + self.batch_size)
            n = len(plan[0, batch])
            plan[1:4, batch] = crop_flip_draws(rng, n, padding=self.padding)
            if self.augment == "strong":
                plan[4:6, batch] = cutout_draws(rng, n, h, w)
        return backend.asarray(plan, device=self.device)     # the epoch's one copy

    def _batches(self, plan):
        for start in range(0, plan.shape[1], self.batch_size):
            yield self._batch(plan[:, start:start + self.batch_size])

    def _batch(self, plan):
        """(x, y) for some columns of a plan, by arithmetic on self.device alone."""
        index = plan[0]
        if self.augment == "none":
            x = self.images[index]
        else:
            x = crop_flip_at(self.images, index, plan[1], plan[2], plan[3], self.padding)
        x = x.astype(self.scale.dtype) * self.scale - self.shift    # augment.normalize
        if self.augment == "strong":
            x = cutout_at(x, plan[4], plan[5])
        return x, self.labels[index]


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
    rngs = (rng for _ in range(loader.num_batches()))
    return loader._batches(loader.plan(order[:loader.num_images()], rngs))
