// The row softmax of attention, A = softmax(c S), and its backward
// dS' = c A * (dA - rowsum(dA * A)), over rows of length t <= 1024 (float32,
// C-contiguous).  The reference and the derivation are in minivit/ops/attention.py
// (ScaledDotProductAttention); c = 1 / sqrt(D_h) is fused in both directions.
//
// One warp per row: lane l holds the row's entries l, l + 32, ... in registers (at most
// MAX_PER_LANE of them), so each row is read once and written once; the row's maximum
// and sums are warp reductions.

#define WARP 32
#define MAX_PER_LANE 32                     // rows up to 1024 long (T = 197, 577 fit)
#define NEG_INF __int_as_float(0xff800000)  // -infinity (no headers here)

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = WARP / 2; offset > 0; offset /= 2)
        v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int offset = WARP / 2; offset > 0; offset /= 2)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

// Each warp, for rows warp, warp + (all warps of the grid), ...:
//   a_j = exp(c s_j - m) / sum_i exp(c s_i - m),  m = max_i c s_i.
extern "C" __global__ void attention_softmax_forward(const float* s, float* a, float scale,
                                                     long long rows, int t) {
    int lane = threadIdx.x % WARP;
    long long warps = (long long)gridDim.x * (blockDim.x / WARP);
    for (long long r = blockIdx.x * (long long)(blockDim.x / WARP) + threadIdx.x / WARP;
         r < rows; r += warps) {             // r is the same for the whole warp
        const float* sr = s + r * t;
        float v[MAX_PER_LANE];
        float m = NEG_INF;
#pragma unroll
        for (int k = 0; k < MAX_PER_LANE; k++) {
            int j = lane + k * WARP;
            v[k] = j < t ? sr[j] * scale : NEG_INF;
            m = fmaxf(m, v[k]);
        }
        m = warp_max(m);
        float sum = 0.0f;
#pragma unroll
        for (int k = 0; k < MAX_PER_LANE; k++) {
            int j = lane + k * WARP;
            v[k] = j < t ? expf(v[k] - m) : 0.0f;
            sum += v[k];
        }
        float inv_sum = 1.0f / warp_sum(sum);
        float* ar = a + r * t;
#pragma unroll
        for (int k = 0; k < MAX_PER_LANE; k++) {
            int j = lane + k * WARP;
            if (j < t) ar[j] = v[k] * inv_sum;
        }
    }
}

// Each warp, for its rows: ds_j = c a_j (da_j - sum_i da_i a_i).
extern "C" __global__ void attention_softmax_backward(const float* da, const float* a,
                                                      float* ds, float scale,
                                                      long long rows, int t) {
    int lane = threadIdx.x % WARP;
    long long warps = (long long)gridDim.x * (blockDim.x / WARP);
    for (long long r = blockIdx.x * (long long)(blockDim.x / WARP) + threadIdx.x / WARP;
         r < rows; r += warps) {
        const float* dar = da + r * t;
        const float* ar = a + r * t;
        float g[MAX_PER_LANE], w[MAX_PER_LANE];
        float dot = 0.0f;
#pragma unroll
        for (int k = 0; k < MAX_PER_LANE; k++) {
            int j = lane + k * WARP;
            g[k] = j < t ? dar[j] : 0.0f;
            w[k] = j < t ? ar[j] : 0.0f;
            dot += g[k] * w[k];
        }
        dot = warp_sum(dot);
        float* dsr = ds + r * t;
#pragma unroll
        for (int k = 0; k < MAX_PER_LANE; k++) {
            int j = lane + k * WARP;
            if (j < t) dsr[j] = scale * w[k] * (g[k] - dot);
        }
    }
}
