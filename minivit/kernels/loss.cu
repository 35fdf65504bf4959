// Cross-entropy with label smoothing, from logits z (rows x k, float32, C-contiguous) and
// integer labels y (long long), forward and backward.  The reference and the derivation
// are in minivit/ops/loss.py (CrossEntropy).  The smoothed target of a row is
//     t_j = (1 - s) [j == y] + s / k,
// so its loss -sum_j t_j log p_j, with log p_j = z_j - lse and lse = log sum_j exp z_j, is
//     (1 - s) (lse - z_y) + s (lse - mean_j z_j).
// A label outside [0, k) makes the forward's loss NaN (as the reference's check does).

#include "warp.cuh"                 // WARP, NEG_INF, warp_sum, warp_max
#define WARPS_PER_BLOCK 8                   // launched with 256 threads
#define NAN_F __int_as_float(0x7fffffff)

// The row's log sum exp, m + log sum_j exp(z_j - m) with m = max_j z_j (a warp's work).
__device__ float row_lse(const float* zr, int k, int lane) {
    float m = NEG_INF;
    for (int j = lane; j < k; j += WARP) m = fmaxf(m, zr[j]);
    m = warp_max(m);
    float sum = 0.0f;
    for (int j = lane; j < k; j += WARP) sum += expf(zr[j] - m);
    return m + logf(warp_sum(sum));
}

// One block of 8 warps for the whole batch: warp w takes rows w, w + 8, ..., adds their
// losses in order; the block adds its 8 warps' totals in order and writes
// loss[0] = total / rows, or NaN if any label is out of range.  (The loss is B x k values,
// a tiny part of a step: one block is enough, and the sum is the same on every run.)
extern "C" __global__ void cross_entropy_forward(const float* z, const long long* labels,
                                                 float* loss, float smoothing,
                                                 long long rows, int k) {
    __shared__ float totals[WARPS_PER_BLOCK];
    __shared__ int bad[WARPS_PER_BLOCK];
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    float total = 0.0f;
    int any_bad = 0;
    for (long long r = warp; r < rows; r += WARPS_PER_BLOCK) {
        const float* zr = z + r * k;
        float lse = row_lse(zr, k, lane);
        float sum_z = 0.0f;
        for (int j = lane; j < k; j += WARP) sum_z += zr[j];
        sum_z = warp_sum(sum_z);
        long long y = labels[r];
        int valid = y >= 0 && y < k;
        float z_y = valid ? zr[y] : 0.0f;
        float row = smoothing * (lse - sum_z / k);
        if (valid) row += (1.0f - smoothing) * (lse - z_y);
        total += row;                         // every lane holds the same value
        any_bad |= !valid;
    }
    if (lane == 0) {
        totals[warp] = total;
        bad[warp] = any_bad;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        float sum = 0.0f;
        int invalid = 0;
        for (int w = 0; w < WARPS_PER_BLOCK; w++) {
            sum += totals[w];
            invalid |= bad[w];
        }
        loss[0] = invalid ? NAN_F : sum / rows;
    }
}

// One warp per row (rows warp, warp + all warps of the grid, ...):
//   dz_j = g (p_j - t_j) / rows,  p_j = exp(z_j - lse),  g = *grad (dL/dloss).
extern "C" __global__ void cross_entropy_backward(const float* z, const long long* labels,
                                                  const float* grad, float* dz,
                                                  float smoothing, long long rows, int k) {
    int lane = threadIdx.x % WARP;
    long long warps = (long long)gridDim.x * (blockDim.x / WARP);
    float g = grad[0] / rows;
    for (long long r = blockIdx.x * (long long)(blockDim.x / WARP) + threadIdx.x / WARP;
         r < rows; r += warps) {
        const float* zr = z + r * k;
        float lse = row_lse(zr, k, lane);
        long long y = labels[r];
        for (int j = lane; j < k; j += WARP) {
            float t = (j == y ? 1.0f - smoothing : 0.0f) + smoothing / k;
            dz[r * k + j] = g * (expf(zr[j] - lse) - t);
        }
    }
}
