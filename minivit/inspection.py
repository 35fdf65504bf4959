"""What a trained Vision Transformer learned: the paper's Section 4.5 ("Inspecting Vision
Transformer"), Figures 6 and 7, Appendix D.7 and D.8.

    attention_maps(model, images)        each block's attention weights A, (B, heads, T, T)
    attention_rollout(maps)              how much each output token draws on each input
                                         token through all blocks (Fig. 6, App. D.8)
    mean_attention_distance(maps, P)     how far, in pixels, each head looks (Fig. 7 right,
                                         Fig. 11, App. D.7): the "receptive field" of a head
    position_embedding_similarity(model) cosine similarity of the learned E_pos rows
                                         (Fig. 7 centre)
    embedding_filters(model, k)          the top k principal components of the patch
                                         embedding E (Fig. 7 left)

Every function computes with the array module of the arrays it is given (NumPy or CuPy)
and returns NumPy arrays, ready to print or plot.  Tokens are numbered as in the model:
with a [CLS] token (classifier="token") it is token 0 and patch i is token i + 1; the N
patches run row by row over the g x g patch grid, so patch i sits at row i // g,
column i % g.
"""
import math

from minivit import backend
from minivit.autograd import Tensor, no_grad


def _host():
    return backend.module_for("cpu")


def _device(model):
    return model.parameters()[0].device


def _grid(num_patches, what):
    """The side g of a square patch grid of num_patches patches."""
    g = math.isqrt(num_patches)
    if g * g != num_patches:
        raise ValueError(f"{what}: {num_patches} patch tokens do not form a square grid")
    return g


# --- attention --------------------------------------------------------------------------

def attention_maps(model, images):
    """Each encoder block's attention weights for a batch of images: a list of `depth`
    NumPy arrays (B, heads, T, T), row q of head h holding A = softmax(q k^T / sqrt(D_h))
    of query token q over all key tokens (Appendix A, Eq. 6).  Rows sum to 1.

    These are the weights of the model's own forward pass (VisionTransformer.features
    with return_attention=True: each block hands back the A its attention used), in
    evaluation mode -- the softmax before attention dropout, none of which runs in
    evaluation -- without recording a graph.  The training mode of every module is
    restored afterwards.  images: (B, C, H, W), an array or Tensor, normalised as the
    model was trained; moved to the model's device.
    """
    modes = [(module, module.training) for _, module in model.named_modules()]
    x = images.data if isinstance(images, Tensor) else images
    x = Tensor(backend.to_device(x, _device(model)))
    model.eval()
    try:
        with no_grad():
            _, maps = model.features(x, return_attention=True)
    finally:
        for module, training in modes:
            module.training = training
    return [backend.to_numpy(a.data) for a in maps]


def attention_rollout(maps):
    """Attention rollout (Abnar & Zuidema 2020; the paper's Appendix D.8), (B, T, T).

    Block l mixes tokens by its attention A_l, averaged over the heads, and the residual
    connection of Eq. 2 carries every token on unchanged; so block l passes on
    A'_l = (mean_h A_l + I), each row renormalised to sum to 1.  Through the blocks
    one after the other,

        R = A'_L ... A'_2 A'_1,

    and R[b, i, j] is how much output token i draws on input token j.  Row 0 (the [CLS]
    token) over the patch tokens is Fig. 6's attention map.
    """
    if not maps:
        raise ValueError("attention_rollout: no attention maps (a model with no blocks?)")
    xp = backend.array_module(maps[0])
    rollout = None
    for a in maps:
        a = a.mean(axis=1)                                        # (B, T, T), heads averaged
        a = a + xp.eye(a.shape[-1], dtype=a.dtype)                # the residual path
        a = a / a.sum(axis=-1, keepdims=True)
        rollout = a if rollout is None else a @ rollout           # A'_l (A'_{l-1} ... A'_1)
    return backend.to_numpy(rollout)


def patch_distances(grid, patch_size):
    """(N, N) host array, N = grid^2: the Euclidean distance in pixels between the centres
    of patches i and j, patch_size * sqrt((r_i - r_j)^2 + (c_i - c_j)^2)."""
    np = _host()
    row, col = np.divmod(np.arange(grid * grid), grid)
    return patch_size * np.hypot(row[:, None] - row[None, :], col[:, None] - col[None, :])


def mean_attention_distance(maps, patch_size, has_cls=True):
    """Mean attention distance in pixels, (blocks, heads) (Appendix D.7, Fig. 7 right and
    Fig. 11): how far across the image each head looks, the analogue of a convolution's
    receptive field.

    Over the patch tokens only (the [CLS] row and column are left out when has_cls, and
    the rest is not renormalised), for query patch i of head h:

        d_h(i) = sum_j A_h[i, j] * dist(i, j),     dist = the patch centres' distance

    then averaged over the query patches i and the images -- the computation the
    authors posted (google-research/vision_transformer issue #162).  patch_size: pixels
    per token side (for a hybrid model, the image size over the token grid's side).
    """
    if not maps:
        raise ValueError("mean_attention_distance: no attention maps (a model with no blocks?)")
    out = []
    for a in maps:
        if has_cls:
            a = a[..., 1:, 1:]
        xp = backend.array_module(a)
        grid = _grid(a.shape[-1], "mean_attention_distance")
        dist = backend.to_device(patch_distances(grid, patch_size), backend.device_of(a))
        per_query = (a * dist.astype(a.dtype)).sum(axis=-1)       # (B, heads, N): d_h(i)
        out.append(per_query.mean(axis=(0, 2)))                   # (heads,)
    return backend.to_numpy(xp.stack(out))


# --- embeddings ---------------------------------------------------------------------------

def position_embedding_similarity(model):
    """(g, g, g, g): S[r, c] is the g x g map of cosine similarities between the position
    embedding of the patch at row r, column c and those of every patch (Fig. 7 centre).

    The [CLS] row is left out.  Works for learned and fixed (sincos2d) embeddings; a
    model without position embeddings (pos_embed="none") has none to compare.
    """
    c = model.config
    if model.pos_embed is None:
        raise ValueError(f"position_embedding_similarity: this model has no position "
                         f"embeddings (pos_embed={c.pos_embed!r})")
    pos = model.pos_embed.data if isinstance(model.pos_embed, Tensor) else model.pos_embed
    pos = pos[0, 1:] if c.classifier == "token" else pos[0]          # (N, D)
    xp = backend.array_module(pos)
    g = _grid(pos.shape[0], "position_embedding_similarity")
    unit = pos / xp.maximum(xp.sqrt((pos * pos).sum(axis=-1, keepdims=True)), 1e-12)
    return backend.to_numpy((unit @ unit.T).reshape(g, g, g, g))


def _is_hybrid(model):
    """Whether the patch embedding reads a ResNet's features instead of pixels (Sec. 3.1)."""
    c = model.config
    if getattr(c, "hybrid", False) or getattr(c, "resnet_layers", None) is not None:
        return True
    kernel = model.patch_embed.kernel                 # (P*P*C, D) when it reads pixels
    return kernel.shape[0] != c.patch_size * c.patch_size * c.in_channels


def embedding_filters(model, k=28):
    """(k, P, P, C): the top k principal components of the patch embedding's D filters
    (Fig. 7 left shows the first 28 of ViT-L/32's).

    E is (P*P*C, D): column d is the filter that gives feature d of a patch, a P x P x C
    image (rows ordered row, column, channel, as patchify cuts a patch).  With the D
    filters as the rows of F = E^T, centred (the mean filter subtracted), the SVD
    F = U S V^T gives the principal components as the rows of V^T, the first of largest
    variance.  A component's sign is arbitrary; each is signed so that its entry of
    largest magnitude is positive.  Not meaningful for a hybrid model, whose "patches"
    are ResNet feature vectors rather than pixels.
    """
    c = model.config
    if _is_hybrid(model):
        raise ValueError("embedding_filters: not meaningful for a hybrid model (its patch "
                         "embedding reads ResNet features, not pixels)")
    P, C = c.patch_size, c.in_channels
    filters = model.patch_embed.kernel.data.T                       # (D, P*P*C)
    if not 1 <= k <= min(filters.shape):
        raise ValueError(f"embedding_filters: k must be between 1 and {min(filters.shape)} "
                         f"(D = {filters.shape[0]} filters of {filters.shape[1]} values), "
                         f"got {k}")
    # A small matrix (D x P*P*C), so the SVD runs on the host: on a GPU it would need
    # cuSOLVER, a CUDA library the rest of minivit never loads.
    filters = backend.to_numpy(filters)
    xp = backend.array_module(filters)
    centred = filters - filters.mean(axis=0, keepdims=True)
    _, _, vt = xp.linalg.svd(centred, full_matrices=False)
    components = vt[:k]                                             # (k, P*P*C)
    biggest = xp.abs(components).argmax(axis=1)
    sign = xp.sign(xp.take_along_axis(components, biggest[:, None], axis=1))
    return (components * sign).reshape(k, P, P, C)
