// Device helpers shared by the kernel files: dtype conversion, 16-byte vector access,
// warp reductions and dtype dispatch. No torch headers here.
#pragma once

#include <cstdint>
#include <cstring>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "fastlm_kernels.h"

namespace fastlm {

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Elements of T in one 16-byte access.
template <typename T>
constexpr int kVec16 = 16 / static_cast<int>(sizeof(T));

// 16 bytes <-> fp32 registers, word by word (no local-memory round trip).
template <typename T>
__device__ __forceinline__ void unpack16(const uint4& raw, float* out) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
  if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int i = 0; i < 4; ++i) out[i] = __uint_as_float(w[i]);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      T lo, hi;
      const uint16_t l16 = static_cast<uint16_t>(w[i] & 0xffffu);
      const uint16_t h16 = static_cast<uint16_t>(w[i] >> 16);
      memcpy(&lo, &l16, 2);
      memcpy(&hi, &h16, 2);
      out[2 * i] = to_float(lo);
      out[2 * i + 1] = to_float(hi);
    }
  }
}

template <typename T>
__device__ __forceinline__ uint4 pack16(const float* in) {
  uint32_t w[4];
  if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = __float_as_uint(in[i]);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const T lo = from_float<T>(in[2 * i]), hi = from_float<T>(in[2 * i + 1]);
      uint16_t l16, h16;
      memcpy(&l16, &lo, 2);
      memcpy(&h16, &hi, 2);
      w[i] = static_cast<uint32_t>(l16) | (static_cast<uint32_t>(h16) << 16);
    }
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// Load VEC consecutive elements starting at column `col` of a row into fp32 registers.
// ALIGNED: p + col is 16-byte aligned and the whole vector lies inside the row, so it is
// read with 128-bit loads. Otherwise each element is read on its own, guarded by `n`,
// and columns past the end read as 0.
template <typename T, int VEC>
__device__ __forceinline__ void load_row_vec(const T* __restrict__ p, int64_t col, int64_t n,
                                             bool aligned, float (&out)[VEC]) {
  if (aligned && col + VEC <= n) {
    constexpr int PER = kVec16<T>;
    static_assert(VEC % PER == 0, "vector width must be a multiple of 16 bytes");
#pragma unroll
    for (int c = 0; c < VEC / PER; ++c) {
      const uint4 raw = *reinterpret_cast<const uint4*>(p + col + c * PER);
      unpack16<T>(raw, out + c * PER);
    }
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = col + i < n ? to_float(p[col + i]) : 0.f;
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_row_vec(T* __restrict__ p, int64_t col, int64_t n,
                                              bool aligned, const float (&in)[VEC]) {
  if (aligned && col + VEC <= n) {
    constexpr int PER = kVec16<T>;
#pragma unroll
    for (int c = 0; c < VEC / PER; ++c) {
      *reinterpret_cast<uint4*>(p + col + c * PER) = pack16<T>(in + c * PER);
    }
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      if (col + i < n) p[col + i] = from_float<T>(in[i]);
    }
  }
}

// Round an fp32 value through T (what storing and reloading it would give).
template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return to_float(from_float<T>(v));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

inline bool is_aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Call f(T{}) with the C++ element type of `d` (a value of that type, used for its type).
template <typename F>
cudaError_t dispatch_dtype(DType d, F&& f) {
  switch (d) {
    case DType::kFloat32:
      return f(float{});
    case DType::kFloat16:
      return f(__half{});
    case DType::kBFloat16:
      return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastlm
