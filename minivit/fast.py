"""Reference paths and fast paths, and the one switch between them.

Every equation in minivit has a reference implementation, written the way the paper
and its derivation write it: that is the spec, and the first thing a reader meets.
Where a faster way to compute the same values exists, it sits beside the reference as
one visibly separate function, with a one-line reason and a test that it equals the
reference.  Each fast path has a name here; the library asks `enabled(name)` before
taking it.

    MINIVIT_REFERENCE=1 python examples/train_cifar.py ...     # references only
    minivit.use_reference(True)                                # the same, in code
    minivit.use_reference(True, paths=["blocks"])              # just these off

How much each one gains is measured in docs/performance.md (benchmarks/vit_step.py
--reference / --without NAME).
"""
import os

PATHS = {
    "affine": "a Linear layer as one node: one product over all tokens, db as column sums",
    "fused_attention": "all heads' attention as one node that reads q, k, v in place from "
                       "z U_qkv and writes their gradients into one array",
    "blocks": "CPU: row-wise chains (GELU, attention) a cache-sized block of rows at a time",
    "blas_sums": "CPU: sums over short rows and columns as BLAS products with a ones vector",
    "float32_erf": "float32 erf as one rational function instead of Cody's in float64",
    "flat_optimizer": "optimiser updates on whole flat buffers, not one parameter at a time",
    "kernels": "GPU: hand-written CUDA kernels, one launch each, for the passes that stream "
               "most (minivit/kernels; also off with MINIVIT_KERNELS=0)",
}

_off = set(PATHS) if os.environ.get("MINIVIT_REFERENCE") == "1" else set()


def _check(names):
    unknown = sorted(set(names) - set(PATHS))
    if unknown:
        raise ValueError(f"unknown fast path(s) {', '.join(unknown)}; the fast paths are "
                         f"{', '.join(PATHS)}")


def enabled(name):
    """Whether the fast path `name` is on (every one is, unless switched off)."""
    return name not in _off


def use_reference(on=True, paths=None):
    """Run on the reference paths only (on=True) or on the fast paths again (on=False);
    `paths`: just these fast paths, by name (see PATHS)."""
    names = list(PATHS) if paths is None else list(paths)
    _check(names)
    if on:
        _off.update(names)
    else:
        _off.difference_update(names)


def disabled():
    """The names of the fast paths that are off."""
    return sorted(_off)
