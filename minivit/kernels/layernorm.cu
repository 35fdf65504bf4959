// LayerNorm forward and backward over rows of width d <= 1024 (float32, C-contiguous).
// The reference and the derivation are in minivit/ops/norm.py.
//
// One warp per row: lane l holds the row's entries l, l + 32, l + 64, ... in registers
// (at most PER_LANE of them), so a row is read once; the means are warp sums.  Each
// kernel comes in two widths: *_256 (PER_LANE = 8, rows up to 256 wide, few registers,
// many warps per SM) and *_1024 (PER_LANE = 32).
// The forward writes y and, per row, mu and 1/sigma; the backward recomputes x_hat from
// x, mu and 1/sigma.  dgamma and dbeta, sums over all rows, are summed per block in a
// fixed order into a (blocks, 2, d) buffer that layernorm_column_sums adds up: no
// atomics, so the result is the same on every run.

#include "warp.cuh"                 // WARP, NEG_INF, warp_sum, warp_max
#define WARPS_PER_BLOCK 8                   // launched with 256 threads

// Each warp: rows warp, warp + (all warps of the grid), ...
//   mu = mean(x),  1/sigma = 1 / sqrt(mean((x - mu)^2) + eps),  y = gamma x_hat + beta.
template <int PER_LANE>
__device__ void forward_rows(const float* x, const float* gamma, const float* beta, float* y,
                             float* mean, float* rstd, long long rows, int d, float eps) {
    int lane = threadIdx.x % WARP;
    long long warps = (long long)gridDim.x * (blockDim.x / WARP);
    for (long long r = blockIdx.x * (long long)(blockDim.x / WARP) + threadIdx.x / WARP;
         r < rows; r += warps) {             // r is the same for the whole warp
        const float* xr = x + r * d;
        float v[PER_LANE];
        float sum = 0.0f;
#pragma unroll
        for (int k = 0; k < PER_LANE; k++) {
            int j = lane + k * WARP;
            v[k] = j < d ? xr[j] : 0.0f;
            sum += v[k];
        }
        float mu = warp_sum(sum) / d;
        float squares = 0.0f;
#pragma unroll
        for (int k = 0; k < PER_LANE; k++) {
            int j = lane + k * WARP;
            float c = j < d ? v[k] - mu : 0.0f;
            squares += c * c;
        }
        float inv_sigma = 1.0f / sqrtf(warp_sum(squares) / d + eps);
        float* yr = y + r * d;
#pragma unroll
        for (int k = 0; k < PER_LANE; k++) {
            int j = lane + k * WARP;
            if (j < d) yr[j] = (v[k] - mu) * inv_sigma * gamma[j] + beta[j];
        }
        if (lane == 0) {
            mean[r] = mu;
            rstd[r] = inv_sigma;
        }
    }
}

// Each warp, for its rows (as in the forward), with g = dy gamma:
//   dx = (g - mean(g) - x_hat mean(g x_hat)) / sigma,
// and it adds dy x_hat and dy into per-lane sums for its columns.  Then the block adds
// its 8 warps' sums (shared memory, fixed order) and writes them to
// partial[blockIdx.x][0][:] (dgamma) and partial[blockIdx.x][1][:] (dbeta).
template <int PER_LANE>
__device__ void backward_rows(const float* dy, const float* x, const float* gamma,
                              const float* mean, const float* rstd, float* dx, float* partial,
                              long long rows, int d) {
    __shared__ float block_sums[WARPS_PER_BLOCK][WARP * PER_LANE];
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    float dgamma[PER_LANE], dbeta[PER_LANE];
#pragma unroll
    for (int k = 0; k < PER_LANE; k++) dgamma[k] = dbeta[k] = 0.0f;
    long long warps = (long long)gridDim.x * WARPS_PER_BLOCK;
    for (long long r = blockIdx.x * (long long)WARPS_PER_BLOCK + warp; r < rows; r += warps) {
        const float* xr = x + r * d;
        const float* dyr = dy + r * d;
        float mu = mean[r], inv_sigma = rstd[r];
        float x_hat[PER_LANE], g[PER_LANE];
        float sum_g = 0.0f, sum_gx = 0.0f;
#pragma unroll
        for (int k = 0; k < PER_LANE; k++) {
            int j = lane + k * WARP;
            float dyj = j < d ? dyr[j] : 0.0f;
            x_hat[k] = j < d ? (xr[j] - mu) * inv_sigma : 0.0f;
            g[k] = j < d ? dyj * gamma[j] : 0.0f;
            dgamma[k] += dyj * x_hat[k];
            dbeta[k] += dyj;
            sum_g += g[k];
            sum_gx += g[k] * x_hat[k];
        }
        float mean_g = warp_sum(sum_g) / d, mean_gx = warp_sum(sum_gx) / d;
        float* dxr = dx + r * d;
#pragma unroll
        for (int k = 0; k < PER_LANE; k++) {
            int j = lane + k * WARP;
            if (j < d) dxr[j] = (g[k] - mean_g - x_hat[k] * mean_gx) * inv_sigma;
        }
    }
    for (int which = 0; which < 2; which++) {       // 0: dgamma, 1: dbeta
#pragma unroll
        for (int k = 0; k < PER_LANE; k++) {
            int j = lane + k * WARP;
            if (j < d) block_sums[warp][j] = which == 0 ? dgamma[k] : dbeta[k];
        }
        __syncthreads();
        for (int j = threadIdx.x; j < d; j += blockDim.x) {
            float s = 0.0f;
            for (int w = 0; w < WARPS_PER_BLOCK; w++) s += block_sums[w][j];
            partial[((long long)blockIdx.x * 2 + which) * d + j] = s;
        }
        __syncthreads();
    }
}

extern "C" __global__ void layernorm_forward_256(const float* x, const float* gamma,
                                                 const float* beta, float* y, float* mean,
                                                 float* rstd, long long rows, int d,
                                                 float eps) {
    forward_rows<8>(x, gamma, beta, y, mean, rstd, rows, d, eps);
}

extern "C" __global__ void layernorm_forward_1024(const float* x, const float* gamma,
                                                  const float* beta, float* y, float* mean,
                                                  float* rstd, long long rows, int d,
                                                  float eps) {
    forward_rows<32>(x, gamma, beta, y, mean, rstd, rows, d, eps);
}

extern "C" __global__ void layernorm_backward_256(const float* dy, const float* x,
                                                  const float* gamma, const float* mean,
                                                  const float* rstd, float* dx,
                                                  float* partial, long long rows, int d) {
    backward_rows<8>(dy, x, gamma, mean, rstd, dx, partial, rows, d);
}

extern "C" __global__ void layernorm_backward_1024(const float* dy, const float* x,
                                                   const float* gamma, const float* mean,
                                                   const float* rstd, float* dx,
                                                   float* partial, long long rows, int d) {
    backward_rows<32>(dy, x, gamma, mean, rstd, dx, partial, rows, d);
}

// One thread per column j of the (parts, 2 d) buffer, summed over parts in order:
// dgamma[j] for j < d, dbeta[j - d] for the rest (each may be a parameter's gradient slot).
extern "C" __global__ void layernorm_column_sums(const float* partial, float* dgamma,
                                                 float* dbeta, int parts, int d) {
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < 2 * d;
         j += gridDim.x * blockDim.x) {
        float s = 0.0f;
        for (int p = 0; p < parts; p++) s += partial[(long long)p * 2 * d + j];
        if (j < d) dgamma[j] = s;
        else dbeta[j - d] = s;
    }
}
