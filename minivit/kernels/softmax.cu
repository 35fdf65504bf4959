// The row softmax of attention, A = softmax(c S), and its backward
// dS' = c A * (dA - rowsum(dA * A)), over rows of length t <= 1024 (float32,
// C-contiguous).  The reference and the derivation are in minivit/ops/attention.py
// (ScaledDotProductAttention); c = 1 / sqrt(D_h) is fused in both directions.
//
// One warp per row: lane l holds the row's entries l, l + 32, ... in registers (at most
// PER_LANE of them), so each row is read once and written once; the row's maximum and
// sums are warp reductions.  Each kernel comes in two lengths: *_256 (PER_LANE = 8: rows
// up to 256 long, e.g. T = 65 or 197) and *_1024 (PER_LANE = 32: up to 1024, e.g. 577).

#include "warp.cuh"                 // WARP, NEG_INF, warp_sum, warp_max

// Each warp, for rows warp, warp + (all warps of the grid), ...:
//   a_j = exp(c s_j - m) / sum_i exp(c s_i - m),  m = max_i c s_i.
template <int PER_LANE>
__device__ void softmax_rows(const float* s, float* a, float scale, long long rows, int t) {
    int lane = threadIdx.x % WARP;
    long long warps = (long long)gridDim.x * (blockDim.x / WARP);
    for (long long r = blockIdx.x * (long long)(blockDim.x / WARP) + threadIdx.x / WARP;
         r < rows; r += warps) {             // r is the same for the whole warp
        const float* sr = s + r * t;
        float v[PER_LANE];
        float m = NEG_INF;
#pragma unroll
        for (int k = 0; k < PER_LANE; k++) {
            int j = lane + k * WARP;
            v[k] = j < t ? sr[j] * scale : NEG_INF;
            m = fmaxf(m, v[k]);
        }
        m = warp_max(m);
        float sum = 0.0f;
#pragma unroll
        for (int k = 0; k < PER_LANE; k++) {
            int j = lane + k * WARP;
            v[k] = j < t ? expf(v[k] - m) : 0.0f;
            sum += v[k];
        }
        float inv_sum = 1.0f / warp_sum(sum);
        float* ar = a + r * t;
#pragma unroll
        for (int k = 0; k < PER_LANE; k++) {
            int j = lane + k * WARP;
            if (j < t) ar[j] = v[k] * inv_sum;
        }
    }
}

// Each warp, for its rows: ds_j = c a_j (da_j - sum_i da_i a_i).
template <int PER_LANE>
__device__ void softmax_backward_rows(const float* da, const float* a, float* ds, float scale,
                                      long long rows, int t) {
    int lane = threadIdx.x % WARP;
    long long warps = (long long)gridDim.x * (blockDim.x / WARP);
    for (long long r = blockIdx.x * (long long)(blockDim.x / WARP) + threadIdx.x / WARP;
         r < rows; r += warps) {
        const float* dar = da + r * t;
        const float* ar = a + r * t;
        float g[PER_LANE], w[PER_LANE];
        float dot = 0.0f;
#pragma unroll
        for (int k = 0; k < PER_LANE; k++) {
            int j = lane + k * WARP;
            g[k] = j < t ? dar[j] : 0.0f;
            w[k] = j < t ? ar[j] : 0.0f;
            dot += g[k] * w[k];
        }
        dot = warp_sum(dot);
        float* dsr = ds + r * t;
#pragma unroll
        for (int k = 0; k < PER_LANE; k++) {
            int j = lane + k * WARP;
            if (j < t) dsr[j] = scale * w[k] * (g[k] - dot);
        }
    }
}

extern "C" __global__ void attention_softmax_forward_256(const float* s, float* a,
                                                         float scale, long long rows, int t) {
    softmax_rows<8>(s, a, scale, rows, t);
}

extern "C" __global__ void attention_softmax_forward_1024(const float* s, float* a,
                                                          float scale, long long rows, int t) {
    softmax_rows<32>(s, a, scale, rows, t);
}

extern "C" __global__ void attention_softmax_backward_256(const float* da, const float* a,
                                                          float* ds, float scale,
                                                          long long rows, int t) {
    softmax_backward_rows<8>(da, a, ds, scale, rows, t);
}

extern "C" __global__ void attention_softmax_backward_1024(const float* da, const float* a,
                                                           float* ds, float scale,
                                                           long long rows, int t) {
    softmax_backward_rows<32>(da, a, ds, scale, rows, t);
}
