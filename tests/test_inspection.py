"""minivit.inspection: what a trained ViT learned (Sec. 4.5, Fig. 6-7, App. D.7-D.8).

Each quantity is defined in the docstring of its function in minivit/inspection.py and
written out below with explicit loops.  These tests check, in order:

1. The attention maps are the weights the forward pass uses: block l normalises its
   tokens, y = LN(z), projects [q, k, v] = y U_qkv + b and, per head h,
   A_h = softmax(q_h k_h^T / sqrt(D_h)); finishing the block by hand from them,
   z' = z + [A_1 v_1; ...; A_k v_k] U_msa + b (Eq. 2), z'' = z' + MLP(LN(z')) (Eq. 3),
   gives the model's own block(z) (test_attention_maps_are_the_weights_the_forward_pass_uses).
   Reading them leaves the model's mode alone and accepts tensors
   (test_attention_maps_keep_evaluation_mode_and_accept_tensors).
2. Rollout (Abnar & Zuidema; App. D.8): M_l = (mean_h A_l + I) / 2 and R = M_L ... M_1,
   multiplied out with loops (test_rollout_multiplies_the_blocks_from_first_to_last); one
   block gives half attention, half identity
   (test_rollout_of_one_block_is_half_attention_half_identity).
3. Mean attention distance (App. D.7): over the N patch tokens of a g x g grid ([CLS]
   dropped, no renormalisation), d[l, h] = 1/(B N) sum_b sum_i sum_j A_l[b, h, i, j] P
   |(r_i, c_i) - (r_j, c_j)| (test_mean_attention_distance_against_loops); attention to
   oneself gives 0, to the right neighbour P times the fraction of patches that have one
   (test_mean_attention_distance_closed_forms).
4. Position-embedding similarity (Fig. 7 centre): S[r, c, r', c'] =
   cos(E_pos[1 + r g + c], E_pos[1 + r' g + c']) (test_position_embedding_similarity_against_loops),
   for fixed embeddings too and none without
   (test_position_embedding_similarity_of_fixed_and_missing_embeddings).
5. Embedding filters (Fig. 7 left): the principal components of the columns of E, the
   eigenvectors of F_c^T F_c by decreasing eigenvalue (eigh here, the SVD in the
   library), each reshaped to a (P, P, C) picture in the order patchify cuts
   (test_embedding_filters_are_the_principal_components).

Then the errors.
"""
import math
import types

import numpy as np
import pytest

import minivit as mv
from minivit import backend, inspection
from minivit.nn import VisionTransformer

from conftest import as_numpy
from reference import gelu, layer_norm, loop_attention


TINY = dict(image_size=8, patch_size=2, num_classes=3, hidden_size=8, depth=2, num_heads=2,
            mlp_dim=12)


def tiny_vit(device, **fields):
    return VisionTransformer(seed=1, **{**TINY, **fields}).to(device)


def images(n=2, size=8, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype("float32")


def host(t):
    return as_numpy(t).astype(np.float64)


def block_by_hand(block, z):
    """(A (B, heads, T, T), the block's output z'') of one encoder block, with loops over
    images, heads and tokens."""
    p = {name: host(value) for name, value in block.named_parameters()}
    B, T, D = z.shape
    H = block.attn.num_heads
    d = D // H
    y = layer_norm(z, p["norm1.scale"], p["norm1.bias"])
    qkv = y @ p["attn.qkv.weight"] + p["attn.qkv.bias"]
    A = np.zeros((B, H, T, T))
    heads = np.zeros((B, T, D))
    for b in range(B):
        for h in range(H):
            q, k, v = (qkv[b, :, s * D + h * d: s * D + (h + 1) * d] for s in range(3))
            heads[b, :, h * d:(h + 1) * d], A[b, h] = loop_attention(q, k, v)   # token by token
    z = z + heads @ p["attn.out.weight"] + p["attn.out.bias"]                       # Eq. 2
    hidden = gelu(layer_norm(z, p["norm2.scale"], p["norm2.bias"]) @ p["mlp.fc1.weight"]
                  + p["mlp.fc1.bias"])
    return A, z + hidden @ p["mlp.fc2.weight"] + p["mlp.fc2.bias"]                  # Eq. 3


def rollout_by_hand(maps):
    B, T = maps[0].shape[0], maps[0].shape[-1]
    out = np.zeros((B, T, T))
    for b in range(B):
        R = np.eye(T)
        for a in maps:
            M = np.zeros((T, T))
            for i in range(T):
                for j in range(T):
                    M[i, j] = (a[b, :, i, j].mean() + (i == j)) / 2
            R = np.array([[sum(M[i, m] * R[m, j] for m in range(T)) for j in range(T)]
                          for i in range(T)])
        out[b] = R
    return out


def distance_by_hand(maps, P, has_cls):
    start = 1 if has_cls else 0
    out = np.zeros((len(maps), maps[0].shape[1]))
    for l, a in enumerate(maps):
        B, H, T, _ = a.shape
        N = T - start
        g = math.isqrt(N)
        for h in range(H):
            total = 0.0
            for b in range(B):
                for i in range(N):
                    for j in range(N):
                        dist = P * math.hypot(i // g - j // g, i % g - j % g)
                        total += a[b, h, start + i, start + j] * dist
            out[l, h] = total / (B * N)
    return out


def random_maps(shape, depth, seed):
    rng = np.random.default_rng(seed)
    maps = [rng.uniform(0.1, 1.0, shape) for _ in range(depth)]
    return [a / a.sum(axis=-1, keepdims=True) for a in maps]


# --- attention maps ---------------------------------------------------------------------

@pytest.mark.parametrize("classifier", ["token", "gap"])
def test_attention_maps_are_the_weights_the_forward_pass_uses(device, classifier):
    model = tiny_vit(device, classifier=classifier, dropout=0.3, attention_dropout=0.3)
    model.astype("float64")
    x = images().astype("float64")
    maps = inspection.attention_maps(model, x)              # a host array works as input
    assert model.training and all(m.training for _, m in model.named_modules())
    T = 16 + (classifier == "token")
    assert [a.shape for a in maps] == [(2, 2, T, T)] * 2
    assert all(isinstance(a, np.ndarray) for a in maps)

    model.eval()
    with mv.no_grad():
        z = model.embed(mv.tensor(x, device=device))
        for block, a in zip(model.blocks, maps):
            A, out = block_by_hand(block, host(z))
            z = block(z)
            np.testing.assert_allclose(a, A, rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(host(z), out, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(sum(a.sum(axis=-1) for a in maps) / len(maps), 1.0, rtol=1e-12)


def test_attention_maps_keep_evaluation_mode_and_accept_tensors(device):
    model = tiny_vit(device).eval()
    maps = inspection.attention_maps(model, mv.tensor(images(), device=device))
    assert not any(m.training for _, m in model.named_modules())
    assert maps[0].dtype == np.float32


# --- rollout ----------------------------------------------------------------------------

def test_rollout_multiplies_the_blocks_from_first_to_last(device):
    maps = random_maps((2, 3, 5, 5), depth=3, seed=0)
    expected = rollout_by_hand(maps)
    got = inspection.attention_rollout([backend.to_device(a, device) for a in maps])
    assert isinstance(got, np.ndarray) and got.shape == (2, 5, 5)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    np.testing.assert_allclose(got.sum(axis=-1), 1.0, rtol=1e-12)    # still rows of weights
    # the order matters: the blocks reversed give another answer
    assert not np.allclose(inspection.attention_rollout(maps[::-1]), expected)


def test_rollout_of_one_block_is_half_attention_half_identity():
    (a,) = random_maps((1, 2, 4, 4), depth=1, seed=1)
    np.testing.assert_allclose(inspection.attention_rollout([a])[0],
                               (a[0].mean(axis=0) + np.eye(4)) / 2, rtol=1e-12)


# --- mean attention distance ------------------------------------------------------------

@pytest.mark.parametrize("has_cls", [True, False])
def test_mean_attention_distance_against_loops(device, has_cls):
    T = 9 + has_cls                                          # a 3 x 3 grid of patches
    maps = random_maps((2, 3, T, T), depth=2, seed=2)
    got = inspection.mean_attention_distance([backend.to_device(a, device) for a in maps],
                                             patch_size=4, has_cls=has_cls)
    assert isinstance(got, np.ndarray) and got.shape == (2, 3)
    np.testing.assert_allclose(got, distance_by_hand(maps, 4, has_cls), rtol=1e-12)


def test_mean_attention_distance_closed_forms(device):
    g, P = 4, 16
    N = g * g
    self_attention = np.zeros((1, 1, N + 1, N + 1))
    self_attention[0, 0, np.arange(N + 1), np.arange(N + 1)] = 1.0
    right = np.zeros((1, 1, N + 1, N + 1))
    for i in range(N):                                       # each patch looks one to the right
        right[0, 0, 1 + i, 1 + i + 1 if i % g < g - 1 else 0] = 1.0   # ...or at [CLS]
    got = inspection.mean_attention_distance(
        [backend.to_device(a, device) for a in (self_attention, right)], P)
    np.testing.assert_allclose(got[:, 0], [0.0, P * (g - 1) / g])


# --- position embeddings ----------------------------------------------------------------

@pytest.mark.parametrize("classifier", ["token", "gap"])
def test_position_embedding_similarity_against_loops(device, classifier):
    model = tiny_vit(device, classifier=classifier)
    got = inspection.position_embedding_similarity(model)
    pos = host(model.pos_embed)[0, 1 if classifier == "token" else 0:]
    g = 4
    expected = np.zeros((g, g, g, g))
    for r in range(g):
        for c in range(g):
            for r2 in range(g):
                for c2 in range(g):
                    u, v = pos[r * g + c], pos[r2 * g + c2]
                    expected[r, c, r2, c2] = u @ v / (np.linalg.norm(u) * np.linalg.norm(v))
    assert isinstance(got, np.ndarray) and got.shape == (g, g, g, g)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_position_embedding_similarity_of_fixed_and_missing_embeddings(device):
    S = inspection.position_embedding_similarity(tiny_vit(device, pos_embed="sincos2d"))
    g = S.shape[0]
    for r in range(g):
        for c in range(g):
            assert S[r, c, r, c] == pytest.approx(1.0, abs=1e-6)
            assert S[r, c].argmax() == r * g + c          # each patch is most like itself
    with pytest.raises(ValueError, match="no position embeddings"):
        inspection.position_embedding_similarity(tiny_vit(device, pos_embed="none"))


# --- embedding filters ------------------------------------------------------------------

def test_embedding_filters_are_the_principal_components(device):
    model = tiny_vit(device, hidden_size=16, patch_size=2)
    k = 5
    got = inspection.embedding_filters(model, k)
    assert isinstance(got, np.ndarray) and got.shape == (k, 2, 2, 3)

    F = host(model.patch_embed.kernel).T                   # (D, P*P*C): one filter per row
    Fc = F - F.mean(axis=0)
    values, vectors = np.linalg.eigh(Fc.T @ Fc)            # ascending eigenvalues
    expected = vectors[:, ::-1][:, :k].T
    for e, component in zip(expected, got.reshape(k, -1)):
        e = e * np.sign(e[np.abs(e).argmax()])
        np.testing.assert_allclose(component, e, atol=1e-5)

    picture = mv.tensor(got[0].transpose(2, 0, 1)[None], device=device)   # (1, C, P, P)
    np.testing.assert_array_equal(host(mv.patchify(picture, 2))[0, 0], got[0].reshape(-1))


# --- errors, dtypes and devices ---------------------------------------------------------

def test_mean_attention_distance_of_a_non_square_grid_is_an_error():
    with pytest.raises(ValueError, match="square grid"):
        inspection.mean_attention_distance(random_maps((1, 1, 6, 6), 1, 0), 4, has_cls=True)


def test_embedding_filters_refuse_bad_k_and_hybrids(device):
    model = tiny_vit(device)
    with pytest.raises(ValueError, match="k must be between 1 and 8"):
        inspection.embedding_filters(model, 9)
    hybrid = types.SimpleNamespace(
        config=types.SimpleNamespace(resnet_layers=(3, 4, 9), patch_size=1, in_channels=3),
        patch_embed=types.SimpleNamespace(kernel=mv.tensor(np.zeros((1024, 8)))))
    with pytest.raises(ValueError, match="not meaningful for a hybrid"):
        inspection.embedding_filters(hybrid, 4)
