"""Independent definitions that the tests compare minivit with: the formulas written out
with explicit loops over images, output pixels, kernel offsets, heads and tokens, in
float64 NumPy.  Nothing here imports minivit, so a test that matches one of these has
checked the library against the equation, not against itself.

    loop_conv2d       y[b, d, r, s] = sum_{i,j,c} x_pad[b, c, S r + i, S s + j] w[i, j, c, d]
                      (+ bias[d]), symmetric or TensorFlow "SAME" padding
    loop_weight_standardize  per output channel: (w - mean(w)) / (std(w) + eps)
    loop_group_norm   each group of C/G channels normalised as one vector, then gamma, beta
    layer_norm        (x - mean) / sqrt(var + eps) * gamma + beta over the last axis
    gelu              x Phi(x) (erf), or the tanh approximation
    softmax           exp(s - max s) / sum exp(s - max s) over the last axis
    loop_attention    Eq. 6-7 one query row at a time: out and A
    loop_mha          Eq. 5-8 for every image and token, heads one by one
"""
import math

import numpy as np


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def same_pads(n, k, s):
    """TensorFlow's "SAME": ceil(n / s) outputs, p = max((ceil(n/s) - 1) s + k - n, 0)
    padding zeros, p // 2 before and the rest after."""
    p = max((-(-n // s) - 1) * s + k - n, 0)
    return p // 2, p - p // 2


def loop_conv2d(x, w, bias=None, stride=1, padding=0):
    """y[b, d, r, s] = sum_{i,j,c} x_pad[b, c, SH r + i, SW s + j] w[i, j, c, d] + bias[d]
    on NCHW x and a (KH, KW, C, D) kernel, one output pixel and one kernel offset at a
    time (the sum over c is x[:, :, h, v] @ w[i, j]); a pixel of the padding counts as 0.
    padding: an int or a pair (PH, PW) on both sides, or "SAME"."""
    x, w = np.asarray(x, dtype=np.float64), np.asarray(w, dtype=np.float64)
    kh, kw, _, D = w.shape
    B, _, H, W = x.shape
    (sh, sw) = _pair(stride)
    if padding == "SAME":
        (top, bottom), (left, right) = same_pads(H, kh, sh), same_pads(W, kw, sw)
    else:
        (top, left) = _pair(padding)
        bottom, right = top, left
    oh, ow = (H + top + bottom - kh) // sh + 1, (W + left + right - kw) // sw + 1
    y = np.zeros((B, D, oh, ow))
    for r in range(oh):
        for s in range(ow):
            for i in range(kh):
                for j in range(kw):
                    h, v = sh * r + i - top, sw * s + j - left
                    if 0 <= h < H and 0 <= v < W:
                        y[:, :, r, s] += x[:, :, h, v] @ w[i, j]
    if bias is not None:
        y += np.asarray(bias)[:, None, None]
    return y


def loop_weight_standardize(w, eps=1e-5):
    """Each output channel d of a (KH, KW, C_in, C_out) kernel: (w - mean) / (std + eps)."""
    out = np.empty_like(w, dtype=np.float64)
    for d in range(w.shape[3]):
        channel = w[:, :, :, d]
        out[:, :, :, d] = (channel - channel.mean()) / (channel.std() + eps)
    return out


def loop_group_norm(x, gamma, beta, G, eps=1e-6):
    """GroupNorm of NCHW x: per image, each of G groups of C/G consecutive channels (all
    their pixels) normalised as one vector, then y = gamma_c x_hat + beta_c."""
    B, C = x.shape[:2]
    y = np.empty_like(x, dtype=np.float64)
    per = C // G
    for b in range(B):
        for k in range(G):
            group = x[b, k * per:(k + 1) * per]                 # (C/G, H, W)
            x_hat = (group - group.mean()) / np.sqrt(group.var() + eps)
            for c in range(per):
                y[b, k * per + c] = gamma[k * per + c] * x_hat[c] + beta[k * per + c]
    return y


def layer_norm(x, gamma, beta, eps=1e-6):
    """(x - mu) / sqrt(mean((x - mu)^2) + eps) * gamma + beta over the last axis."""
    mu = x.mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(axis=-1, keepdims=True) + eps) * gamma + beta


def gelu(x, approximate="erf"):
    """x Phi(x) with Phi(x) = (1 + erf(x / sqrt 2)) / 2, or with approximate="tanh"
    x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    if approximate == "tanh":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    return x * 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def softmax(s):
    """exp(s - max s) / sum exp(s - max s) over the last axis."""
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def loop_attention(q, k, v, mask=None, scale=None):
    """out and A of Eq. 6-7, one query row at a time, in float64 NumPy:
    A_ij = exp(c q_i . k_j) / sum_l exp(c q_i . k_l), out_i = sum_j A_ij M_ij v_j."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    lead, (t_q, d_h), t_k = q.shape[:-2], q.shape[-2:], k.shape[-2]
    scale = 1 / math.sqrt(d_h) if scale is None else scale
    out = np.zeros(lead + (t_q, v.shape[-1]))
    weights = np.zeros(lead + (t_q, t_k))
    for idx in np.ndindex(*lead):                 # every (batch, head)
        for i in range(t_q):                      # every query token
            scores = [scale * sum(q[idx][i, d] * k[idx][j, d] for d in range(d_h))
                      for j in range(t_k)]
            top = max(scores)
            e = [math.exp(s - top) for s in scores]
            a = [x / sum(e) for x in e]
            weights[idx][i] = a
            for j in range(t_k):                  # every key token
                m = 1.0 if mask is None else mask[idx][i, j]
                out[idx][i] += a[j] * m * v[idx][j]
    return out, weights


def loop_mha(z, w_qkv, b_qkv, w_out, b_out, num_heads, mask=None):
    """MSA(z) of Eq. 5-8 for every image and token, heads one by one, in float64 NumPy:
    (out (B, T, D), A (B, heads, T, T))."""
    batch, tokens, d = z.shape
    d_h = d // num_heads
    b_qkv = np.zeros(3 * d) if b_qkv is None else b_qkv
    b_out = np.zeros(d) if b_out is None else b_out
    out = np.zeros((batch, tokens, d))
    weights = np.zeros((batch, num_heads, tokens, tokens))
    for b in range(batch):
        qkv = np.stack([z[b, i] @ w_qkv + b_qkv for i in range(tokens)])      # Eq. 5
        heads = []
        for h in range(num_heads):
            cols = slice(h * d_h, (h + 1) * d_h)
            q, k, v = (qkv[:, s * d:(s + 1) * d][:, cols] for s in range(3))
            m = None if mask is None else mask[b, h]
            sa, weights[b, h] = loop_attention(q, k, v, m)                     # Eq. 6-7
            heads.append(sa)
        for i in range(tokens):
            out[b, i] = np.concatenate([sa[i] for sa in heads]) @ w_out + b_out  # Eq. 8
    return out, weights
