// LayerNorm with fused residual add: forward and backward (math in fastlm_kernels.h).
//
// Work decomposition. A row of N features is split into 16-byte vectors of VEC elements
// (VEC = 16 / sizeof(T)); `tpr` threads (a multiple of 32, at most 1024) share a row and
// thread t owns vectors t, t + tpr, ... (NV of them, a template constant), so every warp
// access is one coalesced 512-byte transaction. Small rows pack several rows per block
// (blockDim = (tpr, rows_per_block)) so a block always has enough work.
//
// Forward keeps z in registers: two-pass statistics (mean, then sum of squared
// deviations) are exact in fp32 and need no Welford merging. Row reductions are warp
// shuffles followed, when a row spans several warps, by a shared-memory exchange.
//
// Backward: a fixed grid of blocks walks row groups; pass 1 computes the two row means
// (g and g*xhat), pass 2 re-reads the row (an L1 hit) to write dz and accumulate the
// dweight/dbias partials in registers. Re-reading instead of keeping z and dy live keeps
// the kernel under 64 registers at 1024 threads. The per-block partials are summed by a
// column-reduction kernel: deterministic, no atomics.
#include <algorithm>

#include "common.cuh"
#include "fastlm_kernels.h"

namespace fastlm {
namespace {

constexpr int kMaxRowsPerBlock = 8;
// Threads per row at most: the forward keeps z (NV*VEC floats) live and fits 64 registers
// at 1024 threads; the backward keeps the dweight/dbias partials (2*NV*VEC floats) live
// and gets 128 registers at 512 threads.
constexpr int kFwdThreads = 1024;
constexpr int kBwdThreads = 512;

struct LnConfig {
  int nv;   // vectors per thread
  int tpr;  // threads per row
  int rpb;  // rows per block
};

template <typename T>
LnConfig ln_config(int64_t n, int max_threads) {
  const int64_t nvec = ceil_div(n, kVec16<T>);
  int nv = 1;
  while (nvec > static_cast<int64_t>(nv) * max_threads) nv *= 2;
  const int tpr = static_cast<int>(ceil_div(ceil_div(nvec, nv), 32) * 32);
  const int rpb = std::max(1, std::min(kMaxRowsPerBlock, 256 / tpr));
  return {nv, tpr, rpb};
}

// Sum each of v[0..K) over the threads of this block row (threadIdx.y); every thread of
// the row gets the totals. Must be reached by all threads of the block.
template <int K>
__device__ __forceinline__ void row_allreduce(float (&v)[K],
                                              float (&red)[kMaxRowsPerBlock][32][2]) {
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = warp_sum(v[k]);
  const int warps = blockDim.x / 32;
  if (warps == 1) return;  // uniform over the block
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) red[threadIdx.y][warp][k] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) {
    float s = 0.f;
    for (int w = 0; w < warps; ++w) s += red[threadIdx.y][w][k];
    v[k] = s;
  }
  __syncthreads();  // `red` is reused by the next reduction
}

template <typename T, typename WT, int NV>
__global__ void __launch_bounds__(kFwdThreads)
    ln_fwd_kernel(LayerNormFwdArgs a, bool aligned) {
  constexpr int VEC = kVec16<T>;
  __shared__ float red[kMaxRowsPerBlock][32][2];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool row_ok = row < a.rows;
  const int64_t r = row_ok ? row : 0;  // keep pointers in bounds for idle rows
  const int64_t n = a.n;
  const T* x = static_cast<const T*>(a.x) + r * a.stride_x;
  const T* res = a.residual ? static_cast<const T*>(a.residual) + r * a.stride_r : nullptr;

  float z[NV][VEC];
  float stat[1] = {0.f};
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int64_t col = (static_cast<int64_t>(i) * blockDim.x + threadIdx.x) * VEC;
    if (row_ok && col < n) {
      load_row_vec<T, VEC>(x, col, n, aligned, z[i]);
      if (res != nullptr) {
        float rv[VEC];
        load_row_vec<T, VEC>(res, col, n, aligned, rv);
        // z is rounded to the activation dtype: the stored z and the statistics agree.
#pragma unroll
        for (int e = 0; e < VEC; ++e) z[i][e] = round_to<T>(z[i][e] + rv[e]);
        store_row_vec<T, VEC>(static_cast<T*>(a.z) + r * a.stride_z, col, n, aligned, z[i]);
      }
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) z[i][e] = 0.f;
    }
#pragma unroll
    for (int e = 0; e < VEC; ++e) stat[0] += z[i][e];
  }
  row_allreduce<1>(stat, red);
  const float mean = stat[0] / static_cast<float>(n);

  stat[0] = 0.f;
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int64_t col = (static_cast<int64_t>(i) * blockDim.x + threadIdx.x) * VEC;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float d = (row_ok && col + e < n) ? z[i][e] - mean : 0.f;
      stat[0] += d * d;
    }
  }
  row_allreduce<1>(stat, red);
  const float rstd = 1.f / sqrtf(stat[0] / static_cast<float>(n) + a.eps);

  if (!row_ok) return;  // no barrier follows
  if (threadIdx.x == 0) {
    a.mean[row] = mean;
    a.rstd[row] = rstd;
  }
  T* y = static_cast<T*>(a.y) + r * a.stride_y;
  const WT* w = static_cast<const WT*>(a.weight);
  const WT* b = static_cast<const WT*>(a.bias);
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int64_t col = (static_cast<int64_t>(i) * blockDim.x + threadIdx.x) * VEC;
    if (col >= n) continue;
    float out[VEC], wv[VEC], bv[VEC];
    if (w) load_row_vec<WT, VEC>(w, col, n, aligned, wv);
    if (b) load_row_vec<WT, VEC>(b, col, n, aligned, bv);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      float v = (z[i][e] - mean) * rstd;
      if (w) v *= wv[e];
      if (b) v += bv[e];
      out[e] = v;
    }
    store_row_vec<T, VEC>(y, col, n, aligned, out);
  }
}

template <typename T, typename WT, int NV>
__global__ void __launch_bounds__(kBwdThreads)
    ln_bwd_kernel(LayerNormBwdArgs a, bool aligned, bool part_aligned, int64_t partial_rows) {
  constexpr int VEC = kVec16<T>;
  __shared__ float red[kMaxRowsPerBlock][32][2];
  const int64_t n = a.n;
  const int64_t groups = ceil_div(a.rows, blockDim.y);
  const WT* w = static_cast<const WT*>(a.weight);
  const bool need_part = a.dweight != nullptr || a.dbias != nullptr;

  float dw[NV][VEC], db[NV][VEC];
#pragma unroll
  for (int i = 0; i < NV; ++i) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) dw[i][e] = db[i][e] = 0.f;
  }

  for (int64_t g = blockIdx.x; g < groups; g += gridDim.x) {  // uniform over the block
    const int64_t row = g * blockDim.y + threadIdx.y;
    const bool row_ok = row < a.rows;
    const int64_t r = row_ok ? row : 0;
    const T* z = static_cast<const T*>(a.z) + r * a.stride_z;
    const T* dy = static_cast<const T*>(a.dy) + r * a.stride_dy;
    const float mean = row_ok ? a.mean[r] : 0.f;
    const float rstd = row_ok ? a.rstd[r] : 0.f;

    // Pass 1: c[0] = sum(g * xhat), c[1] = sum(g).
    float c[2] = {0.f, 0.f};
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int64_t col = (static_cast<int64_t>(i) * blockDim.x + threadIdx.x) * VEC;
      if (!row_ok || col >= n) continue;
      float zv[VEC], dyv[VEC], wv[VEC];
      load_row_vec<T, VEC>(z, col, n, aligned, zv);
      load_row_vec<T, VEC>(dy, col, n, aligned, dyv);
      if (w) load_row_vec<WT, VEC>(w, col, n, aligned, wv);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        if (col + e >= n) continue;
        const float gv = w ? dyv[e] * wv[e] : dyv[e];
        c[0] += gv * (zv[e] - mean) * rstd;
        c[1] += gv;
      }
    }
    row_allreduce<2>(c, red);
    const float c1 = c[0] / static_cast<float>(n), c2 = c[1] / static_cast<float>(n);

    // Pass 2: dz, and the dweight/dbias partials.
    if (!row_ok) continue;  // the next iteration's barriers are reached by all: groups is uniform
    T* dz = static_cast<T*>(a.dz) + r * a.stride_dz;
    const T* dze =
        a.dz_extra ? static_cast<const T*>(a.dz_extra) + r * a.stride_dze : nullptr;
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int64_t col = (static_cast<int64_t>(i) * blockDim.x + threadIdx.x) * VEC;
      if (col >= n) continue;
      float zv[VEC], dyv[VEC], wv[VEC], ev[VEC], out[VEC];
      load_row_vec<T, VEC>(z, col, n, aligned, zv);
      load_row_vec<T, VEC>(dy, col, n, aligned, dyv);
      if (w) load_row_vec<WT, VEC>(w, col, n, aligned, wv);
      if (dze) load_row_vec<T, VEC>(dze, col, n, aligned, ev);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float xhat = (zv[e] - mean) * rstd;  // columns past n: dy reads 0 below
        const float gv = w ? dyv[e] * wv[e] : dyv[e];
        float d = (gv - c2 - xhat * c1) * rstd;
        if (dze) d += ev[e];
        out[e] = d;
        dw[i][e] += dyv[e] * xhat;
        db[i][e] += dyv[e];
      }
      store_row_vec<T, VEC>(dz, col, n, aligned, out);
    }
  }

  if (!need_part) return;
  const int64_t slot = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  float* pdw = a.partial + slot * n;
  float* pdb = a.partial + (partial_rows + slot) * n;
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int64_t col = (static_cast<int64_t>(i) * blockDim.x + threadIdx.x) * VEC;
    if (col >= n) continue;
    store_row_vec<float, VEC>(pdw, col, n, part_aligned, dw[i]);
    store_row_vec<float, VEC>(pdb, col, n, part_aligned, db[i]);
  }
}

// out[c] = sum over r < rows of part[r * n + c]; block (32, 8), one column per x-thread.
__global__ void __launch_bounds__(256)
    column_sum_kernel(const float* __restrict__ part, int64_t rows, int64_t n,
                      float* __restrict__ out) {
  __shared__ float s[8][33];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  float acc = 0.f;
  if (col < n) {
    for (int64_t r = threadIdx.y; r < rows; r += 8) acc += part[r * n + col];
  }
  s[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && col < n) {
    float t = 0.f;
#pragma unroll
    for (int k = 0; k < 8; ++k) t += s[k][threadIdx.x];
    out[col] = t;
  }
}

template <typename T>
int64_t bwd_blocks(int64_t rows, int64_t n, int sm_count) {
  const LnConfig c = ln_config<T>(n, kBwdThreads);
  const int64_t groups = ceil_div(rows, c.rpb);
  const int64_t per_sm = std::max(1, 2048 / (c.tpr * c.rpb));
  // Enough blocks to fill the GPU, but at least ~4 row groups per block so the partials
  // stay a small fraction of the traffic.
  const int64_t blocks = std::min<int64_t>(std::max(sm_count, 1) * per_sm, ceil_div(groups, 4));
  return std::max<int64_t>(1, std::min(blocks, groups));
}

// Launch Launch<T, WT, NV>::run for the runtime config; WT is T or float. Only the NV
// values some N <= kLayerNormMaxN can need are instantiated (Launch::kThreads per row).
template <typename T, int THREADS, template <typename, typename, int> class Launch,
          typename... Args>
cudaError_t with_wt_nv(DType wdtype, int nv, Args&&... args) {
  auto go = [&](auto wt) -> cudaError_t {
    using WT = decltype(wt);
    constexpr int64_t cover = static_cast<int64_t>(THREADS) * kVec16<T>;
    if (nv == 1) return Launch<T, WT, 1>::run(args...);
    if constexpr (cover < kLayerNormMaxN) {
      if (nv == 2) return Launch<T, WT, 2>::run(args...);
    }
    if constexpr (2 * cover < kLayerNormMaxN) {
      if (nv == 4) return Launch<T, WT, 4>::run(args...);
    }
    if constexpr (4 * cover < kLayerNormMaxN) {
      if (nv == 8) return Launch<T, WT, 8>::run(args...);
    }
    return cudaErrorInvalidValue;
  };
  if (wdtype == DType::kFloat32) return go(float{});
  return go(T{});
}

template <typename T, typename WT, int NV>
struct FwdLaunch {
  static cudaError_t run(const LayerNormFwdArgs& a, const LnConfig& c, bool aligned,
                         cudaStream_t stream) {
    const dim3 block(c.tpr, c.rpb);
    const dim3 grid(static_cast<unsigned>(ceil_div(a.rows, c.rpb)));
    ln_fwd_kernel<T, WT, NV><<<grid, block, 0, stream>>>(a, aligned);
    return cudaGetLastError();
  }
};

template <typename T, typename WT, int NV>
struct BwdLaunch {
  static cudaError_t run(const LayerNormBwdArgs& a, const LnConfig& c, bool aligned,
                         bool part_aligned, int64_t blocks, cudaStream_t stream) {
    const dim3 block(c.tpr, c.rpb);
    ln_bwd_kernel<T, WT, NV><<<static_cast<unsigned>(blocks), block, 0, stream>>>(
        a, aligned, part_aligned, blocks * c.rpb);
    return cudaGetLastError();
  }
};

}  // namespace

cudaError_t layer_norm_fwd(const LayerNormFwdArgs& a, cudaStream_t stream) {
  if (a.n <= 0 || a.n > kLayerNormMaxN || a.rows < 0) return cudaErrorInvalidValue;
  if (a.rows == 0) return cudaSuccess;
  if (a.wdtype != a.dtype && a.wdtype != DType::kFloat32) return cudaErrorInvalidValue;
  return dispatch_dtype(a.dtype, [&](auto t) -> cudaError_t {
    using T = decltype(t);
    constexpr int VEC = kVec16<T>;
    const LnConfig c = ln_config<T>(a.n, kFwdThreads);
    const bool aligned = is_aligned16(a.x) && is_aligned16(a.y) && a.stride_x % VEC == 0 &&
                         a.stride_y % VEC == 0 &&
                         (!a.residual || (is_aligned16(a.residual) && is_aligned16(a.z) &&
                                          a.stride_r % VEC == 0 && a.stride_z % VEC == 0)) &&
                         (!a.weight || is_aligned16(a.weight)) &&
                         (!a.bias || is_aligned16(a.bias));
    return with_wt_nv<T, kFwdThreads, FwdLaunch>(a.wdtype, c.nv, a, c, aligned, stream);
  });
}

int64_t layer_norm_bwd_partial_rows(int64_t rows, int64_t n, DType dtype, int sm_count) {
  int64_t out = 0;
  dispatch_dtype(dtype, [&](auto t) -> cudaError_t {
    using T = decltype(t);
    out = bwd_blocks<T>(rows, n, sm_count) * ln_config<T>(n, kBwdThreads).rpb;
    return cudaSuccess;
  });
  return out;
}

cudaError_t layer_norm_bwd(const LayerNormBwdArgs& a, cudaStream_t stream) {
  if (a.n <= 0 || a.n > kLayerNormMaxN || a.rows < 0) return cudaErrorInvalidValue;
  if (a.wdtype != a.dtype && a.wdtype != DType::kFloat32) return cudaErrorInvalidValue;
  const bool need_part = a.dweight != nullptr || a.dbias != nullptr;
  if (need_part && a.partial == nullptr) return cudaErrorInvalidValue;
  if (a.rows == 0) {  // empty sums
    if (a.dweight) cudaMemsetAsync(a.dweight, 0, a.n * sizeof(float), stream);
    if (a.dbias) cudaMemsetAsync(a.dbias, 0, a.n * sizeof(float), stream);
    return cudaGetLastError();
  }
  return dispatch_dtype(a.dtype, [&](auto t) -> cudaError_t {
    using T = decltype(t);
    constexpr int VEC = kVec16<T>;
    const LnConfig c = ln_config<T>(a.n, kBwdThreads);
    const int64_t blocks = bwd_blocks<T>(a.rows, a.n, a.sm_count);
    const bool aligned = is_aligned16(a.dy) && is_aligned16(a.z) && is_aligned16(a.dz) &&
                         a.stride_dy % VEC == 0 && a.stride_z % VEC == 0 &&
                         a.stride_dz % VEC == 0 &&
                         (!a.dz_extra || (is_aligned16(a.dz_extra) && a.stride_dze % VEC == 0)) &&
                         (!a.weight || is_aligned16(a.weight));
    const bool part_aligned = need_part && is_aligned16(a.partial) && a.n % 4 == 0;
    cudaError_t err =
        with_wt_nv<T, kBwdThreads, BwdLaunch>(a.wdtype, c.nv, a, c, aligned, part_aligned, blocks, stream);
    if (err != cudaSuccess || !need_part) return err;
    const int64_t prow = blocks * c.rpb;
    const dim3 grid(static_cast<unsigned>(ceil_div(a.n, 32))), block(32, 8);
    if (a.dweight) column_sum_kernel<<<grid, block, 0, stream>>>(a.partial, prow, a.n, a.dweight);
    if (a.dbias)
      column_sum_kernel<<<grid, block, 0, stream>>>(a.partial + prow * a.n, prow, a.n, a.dbias);
    return cudaGetLastError();
  });
}

}  // namespace fastlm
