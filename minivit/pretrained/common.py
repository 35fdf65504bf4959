"""What the timm and Hugging Face layouts share: PyTorch's conv and Linear layouts, and the
changes from_pretrained makes for another image size or number of classes."""
from collections import namedtuple

from minivit import backend
from minivit.nn.vit import VisionTransformer
from minivit.official import adapt  # noqa: F401  (the loaders import it from here)

# What from_pretrained read: the model, the format's name, the class names (a list, or None)
# and the input normalisation {"mean", "std"} of pixels in [0, 1] (or None when unknown).
Loaded = namedtuple("Loaded", "model format class_names normalization")


def _np():
    return backend.module_for("cpu")


def conv_to_kernel(weight):
    """A PyTorch Conv2d weight (D, C, P, P) -> minivit's patch kernel (P*P*C, D).

    torch.nn.Conv2d with kernel P and stride P computes e_d = sum_{c,u,v} W[d, c, u, v]
    x[c, iP+u, jP+v] + b_d: the patch embedding of Eq. 1.  minivit flattens a patch as
    (row u, column v, channel c), so its kernel row u*P*C + v*C + c holds W[:, c, u, v]."""
    D = weight.shape[0]
    return weight.transpose(2, 3, 1, 0).reshape(-1, D)


def kernel_to_conv(kernel, patch_size, channels):
    """The inverse of conv_to_kernel: (P*P*C, D) -> (D, C, P, P)."""
    P, D = patch_size, kernel.shape[1]
    return _np().ascontiguousarray(kernel.reshape(P, P, channels, D).transpose(3, 2, 0, 1))


def linear_to_weight(weight):
    """torch.nn.Linear computes y = x W^T + b with W (out, in); minivit's Linear x W + b
    with W (in, out): the same numbers, transposed."""
    return _np().ascontiguousarray(weight.T)


def build(config, state, dtype=None):
    """A VisionTransformer of `config` holding `state`, its parameters in `dtype`
    (default float32, whatever the file stored)."""
    model = VisionTransformer(config)
    if dtype not in (None, "float32"):
        model.astype(dtype)
    model.load_state_dict(state)
    return model


def needs_head(source, num_classes):
    """The error for weights without a classifier and no num_classes given."""
    if num_classes is None:
        raise ValueError(f"{source} has no classification head (only the encoder's weights): "
                         f"pass num_classes= for a new head of zeros")
