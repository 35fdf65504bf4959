"""minivit: the Vision Transformer built from arrays, on NumPy or CuPy.

    import minivit as mv
    x = mv.tensor(data, requires_grad=True)
    loss = (x * x).sum()
    loss.backward()            # x.grad holds d loss / d x
    mv.gradcheck(lambda x: (x * x).sum(), x)

Backend: new tensors go to the default device, NumPy unless MINIVIT_BACKEND=cupy
or minivit.backend.use("cupy"); tensor.to("cuda") / .to("cpu") moves one.
Reference paths only (no fast path, see minivit/fast.py): MINIVIT_REFERENCE=1 or
minivit.use_reference(True).
"""
from minivit import backend
from minivit.autograd import Function, Tensor, as_tensor, is_grad_enabled, no_grad, tensor
from minivit.gradcheck import GradcheckError, gradcheck
from minivit.ops.basic import (add, affine, broadcast_to, concatenate, div, exp, getitem, log,
                               matmul, max, maximum, mean, mul, neg, pow, relu, reshape, sqrt,
                               sub, sum, swapaxes, tanh, transpose)
from minivit.ops.activation import (dropout, gelu, keep_tokens, log_softmax, patch_dropout,
                                    softmax)
from minivit.ops.special import erf
from minivit.ops.attention import attention, multi_head_attention, self_attention
from minivit.ops.loss import accuracy, correct, cross_entropy
from minivit.ops.norm import group_norm, layer_norm
from minivit.ops.conv import max_pool2d, weight_standardize
from minivit.ops.patch import col2im, conv2d, im2col, patch_embed, patchify, unpatchify
from minivit import cli, fast, nn, optim
from minivit.fast import use_reference

__version__ = "0.1.0"
