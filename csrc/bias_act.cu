// Bias + activation epilogues around a cuBLAS GEMM (math in fastlm_kernels.h):
//
//   bias_gelu_fwd:     h = x + bias,  y = gelu(h)        (optionally stores h, rounded)
//   gelu_bwd:          dh = dy * gelu'(h)
//   bias_residual_add: y = x + bias + residual
//
// GELU, exact:  gelu(h)  = h * Phi(h) = 0.5 h (1 + erf(h / sqrt 2))
//               gelu'(h) = Phi(h) + h * phi(h),  phi(h) = exp(-h^2/2) / sqrt(2 pi)
// GELU, tanh:   u = k0 (h + k1 h^3), k0 = sqrt(2/pi), k1 = 0.044715, t = tanh(u)
//               gelu(h)  = 0.5 h (1 + t)
//               gelu'(h) = 0.5 (1 + t) + 0.5 h (1 - t^2) k0 (1 + 3 k1 h^2)
//
// Each thread handles one 16-byte vector of a row per step of a grid-stride loop over
// (row, vector) pairs, so rows of any length and stride share one kernel; arithmetic is
// fp32 with one rounding at the store.
#include <algorithm>

#include "common.cuh"
#include "fastlm_kernels.h"

namespace fastlm {
namespace {

constexpr float kSqrt1_2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kK0 = 0.79788456080286536f;  // sqrt(2 / pi)
constexpr float kK1 = 0.044715f;

template <Gelu MODE>
__device__ __forceinline__ float gelu(float h) {
  if constexpr (MODE == Gelu::kErf) {
    return 0.5f * h * (1.f + erff(h * kSqrt1_2));
  } else {
    const float t = tanhf(kK0 * (h + kK1 * h * h * h));
    return 0.5f * h * (1.f + t);
  }
}

template <Gelu MODE>
__device__ __forceinline__ float gelu_grad(float h) {
  if constexpr (MODE == Gelu::kErf) {
    return 0.5f * (1.f + erff(h * kSqrt1_2)) + h * kInvSqrt2Pi * expf(-0.5f * h * h);
  } else {
    const float t = tanhf(kK0 * (h + kK1 * h * h * h));
    return 0.5f * (1.f + t) + 0.5f * h * (1.f - t * t) * kK0 * (1.f + 3.f * kK1 * h * h);
  }
}

// Grid-stride iteration over (row, column-of-vector) pairs of an (rows, n) matrix.
template <int VEC, typename F>
__device__ __forceinline__ void for_each_vec(int64_t rows, int64_t n, F&& f) {
  const int64_t nvec = ceil_div(n, VEC);
  const int64_t total = rows * nvec;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / nvec;
    f(row, (i - row * nvec) * VEC);
  }
}

template <typename T, typename WT, Gelu MODE>
__global__ void __launch_bounds__(256) bias_gelu_fwd_kernel(BiasGeluFwdArgs a, bool aligned) {
  constexpr int VEC = kVec16<T>;
  const WT* bias = static_cast<const WT*>(a.bias);
  for_each_vec<VEC>(a.rows, a.n, [&](int64_t row, int64_t col) {
    float h[VEC], y[VEC];
    load_row_vec<T, VEC>(static_cast<const T*>(a.x) + row * a.stride_x, col, a.n, aligned, h);
    if (bias) {
      float b[VEC];
      load_row_vec<WT, VEC>(bias, col, a.n, aligned, b);
#pragma unroll
      for (int e = 0; e < VEC; ++e) h[e] += b[e];
    }
#pragma unroll
    for (int e = 0; e < VEC; ++e) y[e] = gelu<MODE>(h[e]);
    store_row_vec<T, VEC>(static_cast<T*>(a.y) + row * a.stride_y, col, a.n, aligned, y);
    if (a.preact)
      store_row_vec<T, VEC>(static_cast<T*>(a.preact) + row * a.stride_p, col, a.n, aligned, h);
  });
}

template <typename T, Gelu MODE>
__global__ void __launch_bounds__(256) gelu_bwd_kernel(GeluBwdArgs a, bool aligned) {
  constexpr int VEC = kVec16<T>;
  for_each_vec<VEC>(a.rows, a.n, [&](int64_t row, int64_t col) {
    float dy[VEC], h[VEC];
    load_row_vec<T, VEC>(static_cast<const T*>(a.dy) + row * a.stride_dy, col, a.n, aligned, dy);
    load_row_vec<T, VEC>(static_cast<const T*>(a.h) + row * a.stride_h, col, a.n, aligned, h);
#pragma unroll
    for (int e = 0; e < VEC; ++e) dy[e] *= gelu_grad<MODE>(h[e]);
    store_row_vec<T, VEC>(static_cast<T*>(a.dh) + row * a.stride_dh, col, a.n, aligned, dy);
  });
}

template <typename T, typename WT>
__global__ void __launch_bounds__(256) bias_residual_kernel(BiasResidualArgs a, bool aligned) {
  constexpr int VEC = kVec16<T>;
  const WT* bias = static_cast<const WT*>(a.bias);
  for_each_vec<VEC>(a.rows, a.n, [&](int64_t row, int64_t col) {
    float x[VEC], r[VEC];
    load_row_vec<T, VEC>(static_cast<const T*>(a.x) + row * a.stride_x, col, a.n, aligned, x);
    load_row_vec<T, VEC>(static_cast<const T*>(a.residual) + row * a.stride_r, col, a.n,
                         aligned, r);
    if (bias) {
      float b[VEC];
      load_row_vec<WT, VEC>(bias, col, a.n, aligned, b);
#pragma unroll
      for (int e = 0; e < VEC; ++e) x[e] += b[e];
    }
#pragma unroll
    for (int e = 0; e < VEC; ++e) x[e] += r[e];
    store_row_vec<T, VEC>(static_cast<T*>(a.y) + row * a.stride_y, col, a.n, aligned, x);
  });
}

// ~8 resident blocks of 256 threads per SM on a big part; the grid-stride loop covers the
// rest. The device query is a host-side attribute read (no synchronisation).
unsigned grid_for(int64_t rows, int64_t n, int vec) {
  int dev = 0, sms = 132;
  if (cudaGetDevice(&dev) == cudaSuccess) {
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  }
  const int64_t work = ceil_div(rows * ceil_div(n, vec), 256);
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(work, 8LL * sms)));
}

template <typename F>
cudaError_t with_wt(DType dtype, DType wdtype, F&& f) {
  return dispatch_dtype(dtype, [&](auto t) -> cudaError_t {
    using T = decltype(t);
    if (wdtype == DType::kFloat32) return f(T{}, float{});
    if (wdtype != dtype) return cudaErrorInvalidValue;
    return f(T{}, T{});
  });
}

}  // namespace

cudaError_t bias_gelu_fwd(const BiasGeluFwdArgs& a, cudaStream_t stream) {
  if (a.rows < 0 || a.n < 0) return cudaErrorInvalidValue;
  if (a.rows == 0 || a.n == 0) return cudaSuccess;
  return with_wt(a.dtype, a.wdtype, [&](auto t, auto wt) -> cudaError_t {
    using T = decltype(t);
    using WT = decltype(wt);
    constexpr int VEC = kVec16<T>;
    const bool aligned = is_aligned16(a.x) && is_aligned16(a.y) && a.stride_x % VEC == 0 &&
                         a.stride_y % VEC == 0 && (!a.bias || is_aligned16(a.bias)) &&
                         (!a.preact || (is_aligned16(a.preact) && a.stride_p % VEC == 0));
    const unsigned grid = grid_for(a.rows, a.n, VEC);
    if (a.approximate == Gelu::kTanh)
      bias_gelu_fwd_kernel<T, WT, Gelu::kTanh><<<grid, 256, 0, stream>>>(a, aligned);
    else
      bias_gelu_fwd_kernel<T, WT, Gelu::kErf><<<grid, 256, 0, stream>>>(a, aligned);
    return cudaGetLastError();
  });
}

cudaError_t gelu_bwd(const GeluBwdArgs& a, cudaStream_t stream) {
  if (a.rows < 0 || a.n < 0) return cudaErrorInvalidValue;
  if (a.rows == 0 || a.n == 0) return cudaSuccess;
  return dispatch_dtype(a.dtype, [&](auto t) -> cudaError_t {
    using T = decltype(t);
    constexpr int VEC = kVec16<T>;
    const bool aligned = is_aligned16(a.dy) && is_aligned16(a.h) && is_aligned16(a.dh) &&
                         a.stride_dy % VEC == 0 && a.stride_h % VEC == 0 &&
                         a.stride_dh % VEC == 0;
    const unsigned grid = grid_for(a.rows, a.n, VEC);
    if (a.approximate == Gelu::kTanh)
      gelu_bwd_kernel<T, Gelu::kTanh><<<grid, 256, 0, stream>>>(a, aligned);
    else
      gelu_bwd_kernel<T, Gelu::kErf><<<grid, 256, 0, stream>>>(a, aligned);
    return cudaGetLastError();
  });
}

cudaError_t bias_residual_add(const BiasResidualArgs& a, cudaStream_t stream) {
  if (a.rows < 0 || a.n < 0) return cudaErrorInvalidValue;
  if (a.rows == 0 || a.n == 0) return cudaSuccess;
  return with_wt(a.dtype, a.wdtype, [&](auto t, auto wt) -> cudaError_t {
    using T = decltype(t);
    using WT = decltype(wt);
    constexpr int VEC = kVec16<T>;
    const bool aligned = is_aligned16(a.x) && is_aligned16(a.y) && is_aligned16(a.residual) &&
                         a.stride_x % VEC == 0 && a.stride_y % VEC == 0 &&
                         a.stride_r % VEC == 0 && (!a.bias || is_aligned16(a.bias));
    bias_residual_kernel<T, WT><<<grid_for(a.rows, a.n, VEC), 256, 0, stream>>>(a, aligned);
    return cudaGetLastError();
  });
}

}  // namespace fastlm
