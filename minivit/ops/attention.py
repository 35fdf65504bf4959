"""Scaled dot-product attention and multi-head self-attention (the paper's Appendix A).

Self-attention of a sequence z (N tokens of width D), for one head of width D_h:

    [q, k, v] = z U_qkv                          (Appendix A, Eq. 5)
    A = softmax(q k^T / sqrt(D_h))               (Eq. 6; A is N x N, softmax over each row)
    SA(z) = A v                                  (Eq. 7)

and k heads side by side, each with its own q, k, v of width D_h = D / k:

    MSA(z) = [SA_1(z); SA_2(z); ...; SA_k(z)] U_msa      (Eq. 8)

The heads are a batch axis: z U_qkv for all heads at once is one (D, 3D) product,
`split_heads` turns (B, T, D) into (B, heads, T, D_h), `attention` runs every head of
every image in two batched products, and `merge_heads` puts the heads side by side
again.  That is the reference: only `attention` needs a hand-written backward, the rest
is affine, reshape and transpose.  The fast path, FusedSelfAttention, is the same
computation as one node that reads q, k, v in place from z U_qkv.
"""
import math

from minivit import backend, fast, kernels
from minivit.autograd import Function, Tensor, as_tensor
from minivit.blocks import map_rows
from minivit.kernels import softmax as _softmax_cuda
from minivit.ops.activation import softmax_array
from minivit.ops.basic import affine, reshape, row_sum, swapaxes


class ScaledDotProductAttention(Function):
    """out = A' v with A = softmax(q k^T / sqrt(D_h)) and A' = A * M (Appendix A, Eq. 6-7).

    q: (..., T_q, D_h), k: (..., T_k, D_h), v: (..., T_k, D_v), the leading axes (batch,
    heads) equal.  M is an optional fixed dropout mask of A's shape (..., T_q, T_k), already
    holding 0 or 1/(1-p): inverted dropout on the attention weights, as in the official
    code and timm.  Without a mask A' = A.  Forward, with c = 1/sqrt(D_h):

        S  = c q k^T                  scores, (..., T_q, T_k)
        A  = softmax(S) by rows
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

    forward keeps q, k, v, A and M for backward; A (before dropout) stays on
    `self.weights` for inspection and visualisation.
    """

    def __init__(self, dropout_mask=None):
        self.mask = _mask_array(dropout_mask)

    def forward(self, q, k, v):
        _check_qkv(q, k, v)
        self.mask = _check_mask(self.mask, q.shape[:-1] + k.shape[-2:-1], q)
        c = 1 / math.sqrt(q.shape[-1])
        s = c * (q @ k.swapaxes(-1, -2))                      # S = c q k^T
        self.weights = softmax_array(s)                       # A
        self.q, self.k, self.v = q, k, v
        return self._dropped(self.weights) @ v                # A' v

    def _dropped(self, a):
        return a if self.mask is None else a * self.mask      # A' = A * M

    def backward(self, g):
        q, k, v, a = self.q, self.k, self.v, self.weights
        c = 1 / math.sqrt(q.shape[-1])
        dv = self._dropped(a).swapaxes(-1, -2) @ g            # dv = A'^T g
        da = self._dropped(g @ v.swapaxes(-1, -2))            # dA = (g v^T) * M
        ds = a * (da - row_sum(da * a, keepdims=True))        # dS
        dq = c * (ds @ k)
        dk = c * (ds.swapaxes(-1, -2) @ q)
        return dq, dk, dv


class FusedSelfAttention(Function):
    """Fast path: split_heads -> attention -> merge_heads of Eq. 5-8 as one node, from
    qkv = z U_qkv (B, T, 3D); the composition copies each head split and adds three
    zero-padded gradients of the whole of qkv.

    q, k and v are strided views of qkv, laid out (3, B, heads, T, D_h) by one reshape
    and transpose, and the backward writes dq, dk and dv straight into one (B, T, 3D)
    gradient.  The attention is ScaledDotProductAttention's, with three changes that
    give the same values:
      - the row sum of the backward, sum_j dA_ij A_ij, is taken as g_i . out_i: since
        dA' = g v^T, sum_j dA_ij A_ij = sum_j (g_i . v_j) A'_ij = g_i . (sum_j A'_ij v_j),
        a dot product of two D_h-vectors per row instead of a sum over T_k (the "D" term
        of FlashAttention's backward; it holds with the mask too);
      - on the CPU, a block of images at a time (minivit/blocks.py);
      - the softmax and dS are computed in place where the reference makes new arrays.

    On CuPy (forward_gpu, backward_gpu) q, k, v are laid out C-contiguous instead, since
    CuPy's batched matmul copies every operand that is not: one copy of qkv as
    (3, B, heads, T, D_h) holds q, k, v, one as (3, B, heads, D_h, T) holds q^T, k^T, v^T,
    and the backward takes transposed products, dv^T = g^T A' and dk^T = c q^T dS, so no
    product needs a transpose of a T x T array.  The scaled softmax and its backward are
    CUDA kernels there (softmax.cu) for float32.
    """

    def __init__(self, num_heads, dropout_mask=None):
        self.num_heads, self.mask = num_heads, _mask_array(dropout_mask)

    def _heads(self, x, parts):
        """(B, T, parts * D) -> (parts, B, heads, T, D_h), a view."""
        B, T, width = x.shape
        return x.reshape(B, T, parts, self.num_heads, width // parts // self.num_heads) \
                .transpose(2, 0, 3, 1, 4)

    def forward(self, qkv):
        q, k, v = self._heads(qkv, 3)
        _check_qkv(q, k, v)
        self.mask = _check_mask(self.mask, q.shape[:-1] + k.shape[-2:-1], q)
        self.on_gpu = backend.device_of(qkv) == "cuda"
        if self.on_gpu:
            return self.forward_gpu(qkv)

        def block(q, k, v, mask):
            out, a = _fused_forward(q, k, v, mask)
            return out.swapaxes(1, 2), a                           # (b, T, heads, D_h)
        out, self.weights = _by_rows(block, q, k, v, self.mask)
        self.qkv, self.y = qkv, out.reshape(qkv.shape[:-1] + (-1,))
        return self.y                                              # heads side by side

    def backward(self, g):
        if self.on_gpu:
            return self.backward_gpu(g)
        q, k, v = self._heads(self.qkv, 3)
        (out,), (g,) = self._heads(self.y, 1), self._heads(g, 1)   # (B, heads, T, D_h)

        def block(g, q, k, v, a, mask, out):
            grads = backend.array_module(g).stack(_fused_backward(g, q, k, v, a, mask, out))
            return grads.transpose(1, 3, 0, 2, 4)                  # (b, T, 3, heads, D_h)
        dqkv = _by_rows(block, g, q, k, v, self.weights, self.mask, out)
        return dqkv.reshape(self.qkv.shape)                        # [dq | dk | dv]

    def forward_gpu(self, qkv):
        xp = backend.array_module(qkv)
        B, T, width = qkv.shape
        D_h = width // 3 // self.num_heads
        split = qkv.reshape(B, T, 3, self.num_heads, D_h)
        self.heads = xp.ascontiguousarray(split.transpose(2, 0, 3, 1, 4))    # q, k, v
        self.heads_t = xp.ascontiguousarray(split.transpose(2, 0, 3, 4, 1))  # q^T, k^T, v^T
        (q, _, v), k_t = self.heads, self.heads_t[1]
        self.scale = 1 / math.sqrt(D_h)
        self.weights = a = _scaled_softmax(q @ k_t, self.scale)              # A
        out = (a if self.mask is None else a * self.mask) @ v                 # A' v
        return xp.ascontiguousarray(out.transpose(0, 2, 1, 3)).reshape(B, T, width // 3)

    def backward_gpu(self, g):
        xp = backend.array_module(g)
        (_, k, _), (q_t, _, v_t) = self.heads, self.heads_t
        B, heads, T, D_h = k.shape
        a = self.weights
        g = g.reshape(B, T, heads, D_h)
        g_heads = xp.ascontiguousarray(g.transpose(0, 2, 1, 3))              # (B, heads, T, D_h)
        g_heads_t = xp.ascontiguousarray(g.transpose(0, 2, 3, 1))            # (B, heads, D_h, T)
        dkv_t = xp.empty((2, B, heads, D_h, T), dtype=g.dtype)               # dk^T, dv^T
        xp.matmul(g_heads_t, a if self.mask is None else a * self.mask,
                  out=dkv_t[1])                                              # dv^T = g^T A'
        da = g_heads @ v_t                                                   # dA' = g v^T
        if self.mask is not None:
            da *= self.mask
        ds = _scaled_softmax_backward(da, a, self.scale)                     # c dS
        dq = ds @ k                                                          # c dS k
        xp.matmul(q_t, ds, out=dkv_t[0])                                     # c q^T dS
        dqkv = xp.empty((B, T, 3, heads, D_h), dtype=g.dtype)
        dqkv[:, :, 0] = dq.transpose(0, 2, 1, 3)
        dqkv[:, :, 1:] = dkv_t.transpose(1, 4, 0, 2, 3)
        return dqkv.reshape(B, T, 3 * heads * D_h)                           # [dq | dk | dv]


def _softmax_reference(s, scale):
    """A = softmax(scale S) by rows, as ScaledDotProductAttention computes it."""
    return softmax_array(scale * s)


def _softmax_backward_reference(da, a, scale):
    """scale dS, dS = A * (dA - sum(dA * A, axis=-1)), as ScaledDotProductAttention.backward."""
    return scale * (a * (da - row_sum(da * a, keepdims=True)))


# Fast path (GPU): the scaled softmax and its backward as one kernel each, a warp per row.
SOFTMAX_FORWARD = kernels.Kernel("attention_softmax_forward", "softmax.cu",
                                 _softmax_cuda.forward, _softmax_reference,
                                 example=_softmax_cuda.example_forward)
SOFTMAX_BACKWARD = kernels.Kernel("attention_softmax_backward", "softmax.cu",
                                  _softmax_cuda.backward, _softmax_backward_reference,
                                  sample=kernels.leading(0, 1),
                                  example=_softmax_cuda.example_backward)


def _scaled_softmax(s, scale):
    if kernels.usable(s) and s.shape[-1] <= _softmax_cuda.MAX_LENGTH:
        return SOFTMAX_FORWARD(s, scale)
    return _softmax_reference(s, scale)


def _scaled_softmax_backward(da, a, scale):
    if kernels.usable(da, a) and da.shape[-1] <= _softmax_cuda.MAX_LENGTH:
        return SOFTMAX_BACKWARD(da, a, scale)
    return _softmax_backward_reference(da, a, scale)


def _fused_forward(q, k, v, mask):
    """(out, A): ScaledDotProductAttention's forward on raw arrays, for the fused node."""
    s = (q * (1 / math.sqrt(q.shape[-1]))) @ k.swapaxes(-1, -2)      # S = c q k^T
    s -= s.max(axis=-1, keepdims=True)            # softmax, in place: shift by the rows' maxima,
    a = backend.array_module(s).exp(s, out=s)
    a /= row_sum(a, keepdims=True)                # exp, normalise
    return (a if mask is None else a * mask) @ v, a


def _fused_backward(g, q, k, v, a, mask, out):
    """(dq, dk, dv) on raw arrays, for the fused node (row sum as g . out)."""
    c = 1 / math.sqrt(q.shape[-1])
    dv = (a if mask is None else a * mask).swapaxes(-1, -2) @ g
    da = g @ v.swapaxes(-1, -2)
    if mask is not None:
        da *= mask
    ds = da                                       # dS = A * (dA - g_i . out_i), in place
    ds -= row_sum(g * out, keepdims=True)
    ds *= a
    return ds @ (k * c), ds.swapaxes(-1, -2) @ (q * c), dv


def _by_rows(body, *arrays):
    """body(*arrays) a block of the leading (batch) axis at a time (minivit/blocks.py);
    arrays that are None pass through to every block."""
    present = [i for i, a in enumerate(arrays) if a is not None]

    def on_block(*blocks):
        full = list(arrays)
        for i, block in zip(present, blocks):
            full[i] = block
        return body(*full)
    return map_rows(on_block, *(arrays[i] for i in present))


def _mask_array(dropout_mask):
    mask = dropout_mask.data if isinstance(dropout_mask, Tensor) else dropout_mask
    if mask is not None and not backend.is_array(mask):
        raise TypeError(f"attention: dropout_mask must be None, an array or a Tensor, "
                        f"got {type(dropout_mask).__name__}")
    return mask


def _check_mask(mask, expected, q):
    """The dropout mask in q's dtype, after checking its device and shape."""
    if mask is None:
        return None
    backend.check_same_device("attention (q and dropout_mask)", [q, mask])
    if tuple(mask.shape) != expected:
        raise ValueError(f"attention: dropout_mask has shape {tuple(mask.shape)}, expected "
                         f"the attention weights' shape {expected} (..., T_q, T_k)")
    return mask.astype(q.dtype, copy=False)       # a float64 or bool mask: keep float32


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


def self_attention(qkv, num_heads, dropout_mask=None, return_weights=False):
    """[SA_1(z); ...; SA_k(z)] (B, T, D) from qkv = z U_qkv + b_qkv (B, T, 3D), whose
    columns are [q | k | v], each D wide and head after head (see multi_head_attention):
    split_heads of each third, attention, merge_heads (Eq. 5-7).  dropout_mask and
    return_weights as for `attention`.
    """
    qkv = as_tensor(qkv)
    if qkv.ndim < 2 or qkv.shape[-1] % 3:
        raise ValueError(f"self_attention expects qkv of shape (..., T, 3D), got "
                         f"{tuple(qkv.shape)}")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"self_attention: num_heads must be a positive integer, got "
                         f"{num_heads!r}")
    d = qkv.shape[-1] // 3
    if d % num_heads:
        raise ValueError(f"self_attention: the width D={d} is not divisible by "
                         f"num_heads={num_heads}")
    if fast.enabled("fused_attention") and qkv.ndim == 3:
        fn = FusedSelfAttention(num_heads, dropout_mask)
        out = fn(qkv)
    else:
        q, k, v = (split_heads(qkv[..., i * d:(i + 1) * d], num_heads) for i in range(3))
        fn = ScaledDotProductAttention(dropout_mask)
        out = merge_heads(fn(q, k, v))
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
    qkv = affine(z, w_qkv, b_qkv)                                # (B, T, 3D)   Eq. 5
    heads = self_attention(qkv, num_heads, dropout_mask, return_weights)   # Eq. 6-7
    if return_weights:
        heads, weights = heads
    out = affine(heads, w_out, b_out)                            # (B, T, D)    Eq. 8
    return (out, weights) if return_weights else out
