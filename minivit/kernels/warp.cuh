// What the row kernels share: a warp's 32 lanes adding up (or taking the maximum of)
// one value each, by butterfly shuffles, so every lane ends with the result.  A .cu file
// includes it with `#include "warp.cuh"`, which minivit.kernels.source() replaces by
// this text before compiling.

#define WARP 32
#define NEG_INF __int_as_float(0xff800000)  // -infinity (no CUDA headers here)

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
