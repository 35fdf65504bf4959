// GELU forward and backward, both forms, one thread per element.  The reference and the
// derivation are in minivit/ops/activation.py; the forward keeps nothing but x, and the
// backward recomputes Phi(x) (or tanh) from x: one read of x instead of a saved array.

#define SQRT_HALF 0.7071067811865476f       // 1 / sqrt(2)
#define ONE_OVER_SQRT_2PI 0.3989422804014327f
#define TANH_SCALE 0.7978845608028654f      // c = sqrt(2 / pi)
#define TANH_CUBIC 0.044715f                // a

// y = x Phi(x),  Phi(x) = (1 + erf(x / sqrt 2)) / 2
extern "C" __global__ void gelu_erf_forward(const float* x, float* y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float v = x[i];
        y[i] = v * 0.5f * (1.0f + erff(v * SQRT_HALF));
    }
}

// dx = g (Phi(x) + x phi(x)),  phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
extern "C" __global__ void gelu_erf_backward(const float* g, const float* x, float* dx,
                                             long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float v = x[i];
        float cdf = 0.5f * (1.0f + erff(v * SQRT_HALF));
        float pdf = expf(-0.5f * v * v) * ONE_OVER_SQRT_2PI;
        dx[i] = g[i] * (cdf + v * pdf);
    }
}

// y = x/2 (1 + t),  t = tanh(c (x + a x^3))
extern "C" __global__ void gelu_tanh_forward(const float* x, float* y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float v = x[i];
        float t = tanhf(TANH_SCALE * (v + TANH_CUBIC * v * v * v));
        y[i] = 0.5f * v * (1.0f + t);
    }
}

// dx = g ((1 + t)/2 + x/2 (1 - t^2) c (1 + 3 a x^2))
extern "C" __global__ void gelu_tanh_backward(const float* g, const float* x, float* dx,
                                              long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float v = x[i];
        float t = tanhf(TANH_SCALE * (v + TANH_CUBIC * v * v * v));
        float du_dx = TANH_SCALE * (1.0f + 3.0f * TANH_CUBIC * v * v);
        dx[i] = g[i] * (0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * du_dx);
    }
}
