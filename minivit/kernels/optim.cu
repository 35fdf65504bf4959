// Optimiser updates on a whole flat parameter buffer, one thread per element (grid-stride
// loops), and the global gradient norm of gradient clipping.  The references and the
// update rules are in minivit/optim.py.  Every update kernel reads the clip factor from
// a one-element device array (1 when nothing is clipped), so clipping costs no host read
// and no pass of its own: the gradient is scaled as it is read.  Elements [0, decayed)
// of the buffer are the decayed parameters.

// AdamW, with the bias corrections folded into host scalars:
//   g' = scale g,  m <- b1 m + (1 - b1) g',  v <- b2 v + (1 - b2) g'^2,
//   w <- w - lr_wd w  (only i < decayed),    w <- w - step_size m / (sqrt(v) + eps_hat)
extern "C" __global__ void adamw_update(float* w, const float* g, float* m, float* v,
                                        const float* scale, float b1, float b2,
                                        float step_size, float eps_hat, float lr_wd,
                                        long long decayed, long long n) {
    float s = scale[0];
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float gi = g[i] * s;
        float mi = b1 * m[i] + (1.0f - b1) * gi;
        float vi = b2 * v[i] + (1.0f - b2) * (gi * gi);
        float wi = w[i];
        if (i < decayed) wi -= lr_wd * wi;
        m[i] = mi;
        v[i] = vi;
        w[i] = wi - step_size * mi / (sqrtf(vi) + eps_hat);
    }
}

// SGD with heavy-ball (or Nesterov) momentum and decoupled weight decay:
//   g' = scale g,  b <- momentum b + g'  (kept only when momentum > 0),
//   d = g' + momentum b (Nesterov) or b,   w <- w - lr (d + weight_decay w [i < decayed])
extern "C" __global__ void sgd_update(float* w, const float* g, float* b, const float* scale,
                                      float lr, float momentum, int nesterov,
                                      float weight_decay, long long decayed, long long n) {
    float s = scale[0];
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float gi = g[i] * s;
        float d = gi;
        if (momentum != 0.0f) {
            float bi = momentum * b[i] + gi;
            b[i] = bi;
            d = nesterov ? gi + momentum * bi : bi;
        }
        float wi = w[i];
        if (i < decayed) d += weight_decay * wi;
        w[i] = wi - lr * d;
    }
}

// The global norm sqrt(sum g^2) (summed in double) and the clip factor
// max_norm / (norm + 1e-6) where norm > max_norm and is finite, else 1.
// Each block sums its grid-stride share into partial[blockIdx.x]; the last block to
// finish (counted in blocks_done, which atomicInc sets back to 0 for the next launch)
// adds the partial sums up.  Launch with 256 threads a block and at most 1024 blocks.
// blocks_done is one counter per module: launches of this kernel must not overlap
// (they do not: minivit issues them on one stream).
__device__ unsigned int blocks_done = 0;

// The sum of v over the block's 256 threads (a tree in shared memory), in sums[0].
__device__ void block_sum(double v, double* sums) {
    sums[threadIdx.x] = v;
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) sums[threadIdx.x] += sums[threadIdx.x + half];
        __syncthreads();
    }
}

extern "C" __global__ void grad_norm(const float* g, double* partial, double* norm,
                                     float* scale, double max_norm, long long n) {
    __shared__ double sums[256];
    __shared__ bool last;
    double acc = 0.0;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        double x = g[i];
        acc += x * x;
    }
    block_sum(acc, sums);
    if (threadIdx.x == 0) {
        partial[blockIdx.x] = sums[0];
        __threadfence();                     // the partial sum is visible before the count
        last = atomicInc(&blocks_done, gridDim.x - 1) == gridDim.x - 1;
    }
    __syncthreads();
    if (!last) return;
    acc = 0.0;
    for (unsigned int b = threadIdx.x; b < gridDim.x; b += blockDim.x)
        acc += ((volatile double*)partial)[b];
    block_sum(acc, sums);
    if (threadIdx.x == 0) {
        double total = sqrt(sums[0]);
        norm[0] = total;
        bool clip = total > max_norm && isfinite(total);
        scale[0] = clip ? (float)(max_norm / (total + 1e-6)) : 1.0f;
    }
}
