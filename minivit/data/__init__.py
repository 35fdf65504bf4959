"""CIFAR-10 for minivit: reading and downloading on the host; augmentation and batching on
the device, where the training set is kept.

    from minivit.data import Loader, find_or_download
    cifar = find_or_download(data_dir)       # found, or downloaded, then loaded
    train = Loader(cifar.train_images, cifar.train_labels, batch_size=128,
                   augment="standard", seed=0)
    for epoch in range(start_epoch, epochs):
        for x, y in train.epoch(epoch):      # float32 NCHW and int64, on the device
            ...

Problems with the data (missing, unsafe, damaged, not downloadable) raise a DataError;
wrong arguments raise ValueError.

cifar.py      the batch files, read with an unpickler that can only rebuild arrays
download.py   the cache folder, download with MD5 check, safe unpacking
augment.py    random crop and flip, Cutout, per-channel normalisation (batched; NumPy or
              CuPy arrays; the random draws always on the host)
loader.py     Loader: the set on the device, shuffled, augmented batches made there,
              reproducible from (seed, epoch)
"""
from minivit.data.augment import (CIFAR10_MEAN, CIFAR10_STD, channel_stats, crop_flip_at,
                                  crop_flip_draws, cutout, cutout_at, cutout_draws, normalization,
                                  normalize, random_crop_flip)
from minivit.data.cifar import (CLASSES, Cifar10, CifarFormatError, CifarNotFoundError,
                                DataError, RestrictedUnpickler, UnsafePickleError,
                                load_cifar10, locate_cifar10, read_batch)
from minivit.data.download import (CIFAR10_MD5, CIFAR10_URL, ChecksumError, DownloadError,
                                   UnsafeArchiveError, default_cache_dir, download_cifar10,
                                   find_or_download, safe_extract)
from minivit.data.loader import Loader, batches

__all__ = ["CIFAR10_MD5", "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR10_URL", "CLASSES", "ChecksumError",
           "Cifar10", "CifarFormatError", "CifarNotFoundError", "DataError", "DownloadError",
           "Loader",
           "RestrictedUnpickler", "UnsafeArchiveError", "UnsafePickleError", "batches",
           "channel_stats", "crop_flip_at", "crop_flip_draws", "cutout", "cutout_at",
           "cutout_draws", "default_cache_dir", "download_cifar10",
           "find_or_download", "load_cifar10", "locate_cifar10", "normalization", "normalize",
           "random_crop_flip", "read_batch", "safe_extract"]
