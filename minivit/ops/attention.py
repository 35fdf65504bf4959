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
side by side again.  Built that way only `attention` needs a hand-written backward;
the rest is matmul, add, reshape and transpose from minivit.ops.basic.  The model
calls `self_attention` instead, the same computation as one node that reads q, k, v
in place from z U_qkv and writes their gradients into one array (no copies of the
head splits).
"""
import math

from minivit import backend
from minivit.autograd import Function, Tensor, as_tensor
from minivit.blocks import map_rows
from minivit.ops.basic import affine, reshape, row_sum, swapaxes


class ScaledDotProductAttention(Function):
    """out = A' v with A = softmax(q k^T / sqrt(D_h)) and A' = A * M (Appendix A, Eq. 6-7).

    q: (..., T_q, D_h), k: (..., T_k, D_h), v: (..., T_k, D_v), the leading axes (batch,
    heads) equal.  M is an optional fixed dropout mask of A's shape (..., T_q, T_k), already
    holding 0 or 1/(1-p): inverted dropout on the attention weights, as in the official
    code and timm.  Without a mask A' = A.  Forward, with c = 1/sqrt(D_h):

        S  = c q k^T                  scores, (..., T_q, T_k)
        A  = softmax(S) by rows       computed as exp(S - m) / sum exp(S - m), m the
                                      rows' maxima (on the CPU the head's: _softmax)
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

    The row sum in dS need not touch a T_q x T_k array: since dA' = g v^T,
        sum_j dA_ij A_ij = sum_j (g_i . v_j) A'_ij = g_i . (sum_j A'_ij v_j) = g_i . out_i,
    a dot product of two D_v-vectors per row (the "D" term of FlashAttention's backward;
    it holds with the mask too).  Subtracting the row maximum shifts each row of S by a
    constant, which softmax ignores, so it adds no term to the gradient.  forward keeps
    q, k, v, A, M and out for backward; A (before dropout) stays on `self.weights` for
    inspection and visualisation.  Both passes run a block of images at a time on the
    CPU (minivit/blocks.py), so the T x T arrays of a block stay in the cache.
    """

    def __init__(self, dropout_mask=None):
        self.mask = _mask_array(dropout_mask)

    def forward(self, q, k, v):
        _check_qkv(q, k, v)
        self.mask = _check_mask(self.mask, q.shape[:-1] + k.shape[-2:-1], q)
        self.scale = 1.0 / math.sqrt(q.shape[-1])
        out, self.weights = _by_rows(_attention_forward, q, k, v, self.mask)
        self.q, self.k, self.v, self.out = q, k, v, out
        return out

    def backward(self, g):
        return _by_rows(_attention_backward, g, self.q, self.k, self.v, self.weights,
                        self.mask, self.out)


class SelfAttention(Function):
    """[SA_1(z); ...; SA_k(z)] of Eq. 8 from [q, k, v] = z U_qkv (B, T, 3D), one node.

    The same computation as split_heads on each third of qkv, `attention`, then
    merge_heads, but q, k and v are read in place as strided views of qkv and the
    backward writes dq, dk and dv straight into one (B, T, 3D) gradient, where the
    composition would copy each head split and add three zero-padded gradients of the
    whole of qkv.  The attention is ScaledDotProductAttention's (same derivation).
    """

    def __init__(self, num_heads, dropout_mask=None):
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"self_attention: num_heads must be a positive integer, got "
                             f"{num_heads!r}")
        self.num_heads, self.mask = num_heads, _mask_array(dropout_mask)

    def _heads(self, x, parts):
        """(..., T, parts * D) -> (parts, ..., heads, T, D_h), a view."""
        *lead, T, width = x.shape
        n = len(lead)
        x = x.reshape(*lead, T, parts, self.num_heads, width // parts // self.num_heads)
        return x.transpose((n + 1,) + tuple(range(n)) + (n + 2, n, n + 3))

    def forward(self, qkv):
        if qkv.ndim < 2 or qkv.shape[-1] % 3:
            raise ValueError(f"self_attention expects qkv of shape (..., T, 3D), got "
                             f"{tuple(qkv.shape)}")
        if qkv.shape[-1] // 3 % self.num_heads:
            raise ValueError(f"self_attention: the width D={qkv.shape[-1] // 3} is not "
                             f"divisible by num_heads={self.num_heads}")
        q, k, v = self._heads(qkv, 3)
        _check_qkv(q, k, v)
        self.mask = _check_mask(self.mask, q.shape[:-1] + k.shape[-2:-1], q)

        def block(q, k, v, mask):
            out, a = _attention_forward(q, k, v, mask)
            return out.swapaxes(-3, -2), a                         # (..., T, heads, D_h)
        out, self.weights = _by_rows(block, q, k, v, self.mask)
        self.qkv, self.y = qkv, out.reshape(qkv.shape[:-1] + (-1,))
        return self.y                                              # heads side by side

    def backward(self, g):
        q, k, v = self._heads(self.qkv, 3)
        (out,), (g,) = self._heads(self.y, 1), self._heads(g, 1)   # (..., heads, T, D_h)
        n = g.ndim - 3

        def block(g, q, k, v, a, mask, out):
            grads = backend.array_module(g).stack(_attention_backward(g, q, k, v, a, mask, out))
            return grads.transpose(tuple(range(1, n + 1)) + (n + 2, 0, n + 1, n + 3))
        dqkv = _by_rows(block, g, q, k, v, self.weights, self.mask, out)
        return dqkv.reshape(self.qkv.shape)        # from (..., T, 3, heads, D_h): [q | k | v]


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


def _attention_forward(q, k, v, mask):
    """(out, A) on raw arrays: the forward pass of ScaledDotProductAttention."""
    s = (q * (1.0 / math.sqrt(q.shape[-1]))) @ _transposed(k)       # S = c q k^T, c on q
    a = _softmax(s)
    return (a if mask is None else a * mask) @ v, a


def _softmax(s):
    """softmax over the last axis of scores s (..., T_q, T_k), overwriting s.

    exp(s - m) / sum exp(s - m) is the same for any shift m of a row; subtracting the
    row's maximum keeps every exp <= 1 (no overflow) with its largest term exactly 1.
    On the CPU one shift per head, the largest score of its whole T_q x T_k matrix, is
    5-10 times cheaper than the rows' maxima (NumPy reduces a short row at a time) and
    just as safe unless some row lies more than ~80 below it: then that row's exps
    would fall towards float32's underflow.  Its sum tells (sum >= the row's largest
    exp), so such a head's rows are shifted by their own maxima instead.  On the GPU
    the rows' maxima are one kernel, and the check would read the device.
    """
    xp = backend.array_module(s)
    if backend.device_of(s) == "cpu":
        e = xp.exp(s - s.max(axis=(-2, -1), keepdims=True))
        sums = row_sum(e)
        if sums.min() > s.shape[-1] * _SMALLEST_EXP:             # every row's largest exp
            e /= sums[..., None]                                 # is >= e^-80: normal
            return e
    s -= s.max(axis=-1, keepdims=True)
    e = xp.exp(s)
    e /= row_sum(e)[..., None]
    return e


_SMALLEST_EXP = math.exp(-80)     # well above float32's smallest normal number, 1.2e-38


def _attention_backward(g, q, k, v, a, mask, out):
    """(dq, dk, dv) on raw arrays: the backward pass of ScaledDotProductAttention."""
    c = 1.0 / math.sqrt(q.shape[-1])
    dv = (a if mask is None else a * mask).swapaxes(-1, -2) @ g
    da = g @ _transposed(v)
    if mask is not None:
        da *= mask
    da -= row_sum(g * out)[..., None]             # dA - sum_j dA_ij A_ij = dA - g_i . out_i
    da *= a                                       # dS
    return da @ (k * c), da.swapaxes(-1, -2) @ (q * c), dv


def _transposed(x):
    """x^T (the last two axes swapped) as a right-hand matmul operand.  On the CPU a
    contiguous copy: OpenBLAS multiplies by the transpose of a small matrix at about
    half the speed, more than the copy costs.  On the GPU the view (cuBLAS reads it as
    it is)."""
    xt = x.swapaxes(-1, -2)
    return backend.array_module(x).ascontiguousarray(xt) if backend.device_of(x) == "cpu" else xt


def _by_rows(body, *arrays):
    """body(*arrays) a block of the leading (batch) axis at a time (minivit/blocks.py);
    arrays that are None pass through to every block."""
    present = [i for i, a in enumerate(arrays) if a is not None]

    def on_block(*blocks):
        full = list(arrays)
        for i, block in zip(present, blocks):
            full[i] = block
        return body(*full)
    if arrays[0].ndim < 3:
        return body(*arrays)
    return map_rows(on_block, *(arrays[i] for i in present))


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
    columns are [q | k | v], each D wide and head after head (see multi_head_attention).
    The same values as merge_heads(attention(q, k, v)) with q, k, v = split_heads of each
    third, in one node that copies no head split (SelfAttention).  dropout_mask and
    return_weights as for `attention`.
    """
    fn = SelfAttention(num_heads, dropout_mask)
    out = fn(qkv)
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
