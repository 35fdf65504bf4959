"""Scaled dot-product attention and multi-head self-attention (the paper's Appendix A).

Self-attention of a sequence z (N tokens of width D), for one head of width D_h:

    [q, k, v] = z U_qkv                          (Appendix A, Eq. 5)
    A = softmax(q k^T / sqrt(D_h))               (Eq. 6; A is N x N, softmax over each row)
    SA(z) = A v                                  (Eq. 7)

and k heads side by side, each with its own q, k, v of width D_h = D / k:

    MSA(z) = [SA_1(z); SA_2(z); ...; SA_k(z)] U_msa      (Eq. 8)

The heads are a batch axis: z U_qkv for all heads at once is one (D, 3D) matmul,
`split_heads` turns (B, T, D) into (B, heads, T, D_h), the fused `attention` runs
every head of every image in two batched matmuls, and `merge_heads` puts the heads
side by side again.  Only `attention` needs a hand-written backward; the rest is
matmul, add, reshape and transpose from minivit.ops.basic.
"""
import math

from minivit import backend
from minivit.autograd import Function, Tensor, as_tensor
from minivit.ops.basic import add, getitem, matmul, reshape, swapaxes


class ScaledDotProductAttention(Function):
    """out = A' v with A = softmax(q k^T / sqrt(D_h)) and A' = A * M (Appendix A, Eq. 6-7).

    q: (..., T_q, D_h), k: (..., T_k, D_h), v: (..., T_k, D_v), the leading axes (batch,
    heads) equal.  M is an optional fixed dropout mask of A's shape (..., T_q, T_k), already
    holding 0 or 1/(1-p): inverted dropout on the attention weights, as in the official
    code and timm.  Without a mask A' = A.  Forward, with c = 1/sqrt(D_h):

        S  = c q k^T                  scores, (..., T_q, T_k)
        A  = softmax(S) by rows       computed as exp(S - max S) / sum exp(S - max S)
        A' = A * M
        out = A' v

    Backward, from g = dL/d out (every product below is a batched matmul, ^T swaps the
    last two axes):

        out = A' v    =>  dv = A'^T g,   dA' = g v^T             (the matmul rule)
        A' = A * M    =>  dA = dA' * M
        A = softmax(S):   dA_ij/dS_il = A_ij (delta_jl - A_il), so
                          dS_il = sum_j dA_ij A_ij (delta_jl - A_il)
                                = A_il (dA_il - sum_j dA_ij A_ij)
                      =>  dS = A * (dA - sum(dA * A, axis=-1, keepdims=True))
        S = c q k^T   =>  dq = c dS k,   dk = c dS^T q

    Subtracting the row maximum shifts each row of S by a constant, which softmax ignores,
    so it adds no term to the gradient.  forward keeps q, k, v, A and M for backward; A
    (before dropout) stays on `self.weights` for inspection and visualisation.
    """

    def __init__(self, dropout_mask=None):
        mask = dropout_mask.data if isinstance(dropout_mask, Tensor) else dropout_mask
        if mask is not None and not backend.is_array(mask):
            raise TypeError(f"attention: dropout_mask must be None, an array or a Tensor, "
                            f"got {type(dropout_mask).__name__}")
        self.mask = mask

    def forward(self, q, k, v):
        _check_qkv(q, k, v)
        xp = backend.array_module(q)
        self.scale = 1.0 / math.sqrt(q.shape[-1])
        s = (q @ k.swapaxes(-1, -2)) * self.scale
        e = xp.exp(s - s.max(axis=-1, keepdims=True))
        a = e / e.sum(axis=-1, keepdims=True)
        mask = self.mask
        if mask is not None:
            backend.check_same_device("attention (q and dropout_mask)", [q, mask])
            if tuple(mask.shape) != a.shape:
                raise ValueError(f"attention: dropout_mask has shape {tuple(mask.shape)}, "
                                 f"expected the attention weights' shape {a.shape} "
                                 "(..., T_q, T_k)")
            mask = mask.astype(a.dtype, copy=False)   # a float64 or bool mask: keep float32
        self.q, self.k, self.v, self.weights, self.mask = q, k, v, a, mask
        return (a if mask is None else a * mask) @ v

    def backward(self, g):
        q, k, v, a, mask = self.q, self.k, self.v, self.weights, self.mask
        a_drop = a if mask is None else a * mask
        dv = a_drop.swapaxes(-1, -2) @ g
        da = g @ v.swapaxes(-1, -2)
        if mask is not None:
            da = da * mask
        ds = a * (da - (da * a).sum(axis=-1, keepdims=True))
        dq = (ds @ k) * self.scale
        dk = (ds.swapaxes(-1, -2) @ q) * self.scale
        return dq, dk, dv


def _check_qkv(q, k, v):
    """Raise a clear error unless q, k, v are (..., T_q, D_h), (..., T_k, D_h), (..., T_k, D_v)."""
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if min(q.ndim, k.ndim, v.ndim) < 2:
        raise ValueError(f"attention expects q, k, v of shape (..., T, D_h), got {shapes}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention: q and k must have the same last axis D_h (q k^T sums "
                         f"over it), got {shapes}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"attention: k and v must have the same number of tokens "
                         f"(axis -2), got {shapes}")
    if not q.shape[:-2] == k.shape[:-2] == v.shape[:-2]:
        raise ValueError(f"attention: q, k, v must have the same leading (batch, head) axes, "
                         f"got {shapes}")
    if not (backend.is_floating(q) and q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention expects q, k, v of one floating dtype, got "
                        f"{q.dtype}, {k.dtype}, {v.dtype}")


def attention(q, k, v, dropout_mask=None, return_weights=False):
    """A' v with A = softmax(q k^T / sqrt(D_h)) (Eq. 6-7), one fused, differentiable node.

    q, k, v: tensors (..., T, D_h), typically (B, heads, T, D_h).  dropout_mask: None, or a
    fixed array/tensor of shape (..., T_q, T_k) with entries 0 or 1/(1-p) that multiplies
    A (no gradient flows into it).  With return_weights=True returns (out, A), where A is
    the softmax *before* dropout (rows sum to 1) as a Tensor cut from the graph
    (requires_grad=False), ready for `.numpy()` and attention maps.
    """
    fn = ScaledDotProductAttention(dropout_mask)
    out = fn(q, k, v)
    return (out, Tensor(fn.weights)) if return_weights else out


# --- heads ------------------------------------------------------------------------------

def split_heads(x, num_heads):
    """(B, T, D) -> (B, heads, T, D/heads): head h holds features h*D_h ... (h+1)*D_h - 1.

    A reshape to (B, T, heads, D_h) and a swap of the token and head axes, so the
    gradient is the inverse swap and reshape (done by autograd).
    """
    x = as_tensor(x)
    if x.ndim < 2:
        raise ValueError(f"split_heads expects x of shape (B, T, D), got {x.shape}")
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"split_heads: num_heads must be a positive integer, got {num_heads!r}")
    d = x.shape[-1]
    if d % num_heads:
        raise ValueError(f"split_heads: the width D={d} is not divisible by "
                         f"num_heads={num_heads}")
    x = reshape(x, x.shape[:-1] + (num_heads, d // num_heads))   # (B, T, heads, D_h)
    return swapaxes(x, -3, -2)                                   # (B, heads, T, D_h)


def merge_heads(x):
    """(B, heads, T, D_h) -> (B, T, heads * D_h): the heads side by side, [SA_1; ...; SA_k]
    of Eq. 8.  The inverse of split_heads."""
    x = as_tensor(x)
    if x.ndim < 3:
        raise ValueError(f"merge_heads expects x of shape (B, heads, T, D_h), got {x.shape}")
    x = swapaxes(x, -3, -2)                                      # (B, T, heads, D_h)
    return reshape(x, x.shape[:-2] + (x.shape[-2] * x.shape[-1],))


# --- multi-head self-attention ----------------------------------------------------------

def multi_head_attention(z, w_qkv, b_qkv, w_out, b_out, num_heads,
                         dropout_mask=None, return_weights=False):
    """MSA(z) = [SA_1(z); ...; SA_k(z)] U_msa + b_out (Appendix A, Eq. 5-8), all heads at once.

    z: (B, T, D).  w_qkv = U_qkv: (D, 3D) and b_qkv: (3D,) give [q, k, v] = z U_qkv + b_qkv
    (Eq. 5) for every head; its columns are laid out [q | k | v], each block of D columns
    head after head (column s*D + h*D_h + j is feature j of head h of q, k or v for
    s = 0, 1, 2; the layout of timm's qkv Linear).  w_out = U_msa: (D, D), b_out: (D,).
    The biases may be None.  dropout_mask: None or (B, heads, T, T), see `attention`.
    Returns (B, T, D), or (out, A) with A (B, heads, T, T) when return_weights=True.
    """
    z = as_tensor(z)
    if z.ndim < 2:
        raise ValueError(f"multi_head_attention expects z of shape (B, T, D), got {z.shape}")
    d = z.shape[-1]
    for name, w, shape in (("w_qkv", w_qkv, (d, 3 * d)), ("b_qkv", b_qkv, (3 * d,)),
                           ("w_out", w_out, (d, d)), ("b_out", b_out, (d,))):
        if w is not None and tuple(w.shape) != shape:
            raise ValueError(f"multi_head_attention: {name} has shape {tuple(w.shape)}, "
                             f"expected {shape} for tokens of width D={d}")
    qkv = matmul(z, w_qkv)                                       # (B, T, 3D)   Eq. 5
    if b_qkv is not None:
        qkv = add(qkv, b_qkv)
    q, k, v = [split_heads(getitem(qkv, (Ellipsis, slice(s * d, (s + 1) * d))), num_heads)
               for s in range(3)]                                # each (B, heads, T, D_h)
    heads = attention(q, k, v, dropout_mask, return_weights)     # Eq. 6-7
    if return_weights:
        heads, weights = heads
    out = matmul(merge_heads(heads), w_out)                      # (B, T, D)    Eq. 8
    if b_out is not None:
        out = add(out, b_out)
    return (out, weights) if return_weights else out
