// FlashAttention-2 forward, hand-written on tensor cores (mma.sync m16n8k16, sm_80+).
//
//   S = softmax_scale * Q K^T  (masked: key past the sequence, causal, key padding)
//   O = softmax(S) V,  lse = logsumexp(S) per query row (natural log, fp32)
//
// Shapes and layouts: see AttentionFwdArgs in fastlm_kernels.h.
//
// Decomposition: one block of 8 warps owns BM = 128 query rows of one (batch, head); warp
// w owns rows 16w..16w+15 and keeps its Q fragments and its O accumulator (16 x D fp32) in
// registers for the whole pass over the keys, which go by in tiles of BN = 64:
//
//   S_w = Q_w K_j^T                  (ldmatrix K from shared memory, mma)
//   online softmax on S_w in fp32    (row max / sum across the 4 lanes of a quad)
//   O_w = O_w * alpha + P_w V_j      (P re-used from the S accumulators as an A fragment,
//                                     V read with ldmatrix.trans)
//
// K_j and V_j stream through shared memory with cp.async: the load of V_j overlaps
// Q K_j^T and the softmax, the load of K_{j+1} overlaps P V_j (FlashAttention-2's
// schedule). Shared rows are padded by 8 elements (16 bytes) so ldmatrix row addresses
// fall in distinct banks. Scores are kept in log2 units (scale * log2 e folded in) so the
// exponentials are exp2. Rows with no visible key end with l = 0: O = 0, lse = +inf.
// Causal tiles entirely above the diagonal are skipped; masks are evaluated only on tiles
// that need them.
#include <cmath>

#include "common.cuh"
#include "fastlm_kernels.h"
#include "mma.cuh"

namespace fastlm {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kBM = 16 * kWarps;
constexpr int kBN = 64;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <int D>
constexpr int smem_bytes() {
  return (kBM + 2 * kBN) * (D + 8) * 2;
}

// Copy `rows` rows of D elements (row stride `stride`) into shared memory with row stride
// LD; rows at or past `valid_rows` are zero-filled.
template <typename T, int D, int ROWS>
__device__ __forceinline__ void load_tile(T* smem, const T* gmem, int64_t stride,
                                          int64_t valid_rows) {
  constexpr int LD = D + 8;
  constexpr int CHUNKS = D / 8;  // 16-byte chunks per row
  for (int c = threadIdx.x; c < ROWS * CHUNKS; c += kThreads) {
    const int r = c / CHUNKS, k = (c % CHUNKS) * 8;
    const bool ok = r < valid_rows;
    cp_async16(smem + r * LD + k, ok ? gmem + r * stride + k : gmem, ok);
  }
}

// Sequence b of a packed batch: start = cu[b] and end = cu[b + 1], both clamped into
// [0, total] (end >= start); *len = min(end - start, max_len). Valid offsets pass unchanged.
__device__ __forceinline__ int64_t clamp_span(const int32_t* cu, int b, int64_t total,
                                              int64_t max_len, int64_t* len) {
  const int64_t start = min(max(static_cast<int64_t>(cu[b]), int64_t{0}), total);
  const int64_t end = min(max(static_cast<int64_t>(cu[b + 1]), start), total);
  *len = min(end - start, max_len);
  return start;
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_fwd_kernel(AttentionFwdArgs a) {
  constexpr int LD = D + 8;
  constexpr int NT = kBN / 8;  // n-tiles of S per warp
  constexpr int DT = D / 8;    // n-tiles of O per warp
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + kBM * LD;
  T* sV = sK + kBN * LD;

  const int b = blockIdx.z, h = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const bool varlen = a.cu_seqlens_q != nullptr;
  int64_t q_start = 0, k_start = 0, sq = a.seqlen_q, sk = a.seqlen_k;
  if (varlen) {
    // Unvalidated offsets (no host sync): each span clamped into the packed tensor and to
    // max_seqlen, so any values stay in bounds.
    q_start = clamp_span(a.cu_seqlens_q, b, a.total_q, a.seqlen_q, &sq);
    k_start = clamp_span(a.cu_seqlens_k, b, a.total_k, a.seqlen_k, &sk);
  }
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM;
  if (m0 >= sq) return;  // whole block: uniform
  const int64_t kvh = h / (a.heads / a.kv_heads);
  const T* q = static_cast<const T*>(a.q) + (varlen ? q_start * a.q_stride_s : b * a.q_stride_b) +
               h * a.q_stride_h + m0 * a.q_stride_s;
  const T* k = static_cast<const T*>(a.k) + (varlen ? k_start * a.k_stride_s : b * a.k_stride_b) +
               kvh * a.k_stride_h;
  const T* v = static_cast<const T*>(a.v) + (varlen ? k_start * a.v_stride_s : b * a.v_stride_b) +
               kvh * a.v_stride_h;
  T* o = static_cast<T*>(a.o) + (varlen ? q_start * a.o_stride_s : b * a.o_stride_b) +
         h * a.o_stride_h;
  float* lse = a.lse + (varlen ? q_start : b * a.lse_stride_b) + h * a.lse_stride_h;
  const bool* kpm = a.key_padding_mask ? a.key_padding_mask + b * a.mask_stride_b : nullptr;

  // Keys visible to the last row of this block bound the key loop (bottom-right causal).
  const int64_t m_end = m0 + kBM < sq ? m0 + kBM : sq;
  const int64_t diag = sk - sq;  // query i sees keys j <= i + diag
  int64_t n_end = sk;
  if (a.causal && m_end + diag < n_end) n_end = m_end + diag;
  const int64_t n_blocks = n_end > 0 ? ceil_div(n_end, kBN) : 0;

  // This thread's two rows (g and g + 8 of the warp's 16).
  const int64_t row0 = m0 + warp * 16 + lane / 4;
  const int64_t rows[2] = {row0, row0 + 8};

  float acc[DT][4];
#pragma unroll
  for (int t = 0; t < DT; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};

  if (n_blocks > 0) {
    load_tile<T, D, kBM>(sQ, q, a.q_stride_s, sq - m0);
    load_tile<T, D, kBN>(sK, k, a.k_stride_s, sk);
    cp_async_commit();
    load_tile<T, D, kBN>(sV, v, a.v_stride_s, sk);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
  }
  uint32_t qf[D / 16][4];
  if (n_blocks > 0) {
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      const int r = warp * 16 + (lane % 8) + ((lane / 8) % 2) * 8;
      ldmatrix_x4(qf[ks], sQ + r * LD + ks * 16 + (lane / 16) * 8);
    }
  }
  const float scale_log2 = a.softmax_scale * kLog2e;

  for (int64_t j = 0; j < n_blocks; ++j) {
    const int64_t n0 = j * kBN;
    if (j > 0) {
      cp_async_wait<1>();  // K_j landed
      __syncthreads();
    }
    // ---- S = Q K_j^T
    float s[NT][4];
#pragma unroll
    for (int t = 0; t < NT; ++t) s[t][0] = s[t][1] = s[t][2] = s[t][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
#pragma unroll
      for (int p = 0; p < NT / 2; ++p) {
        uint32_t kb[4];
        const int key = p * 16 + (lane % 8) + (lane / 16) * 8;
        ldmatrix_x4(kb, sK + key * LD + ks * 16 + ((lane / 8) % 2) * 8);
        mma_16816<T>(s[2 * p], qf[ks], kb[0], kb[1]);
        mma_16816<T>(s[2 * p + 1], qf[ks], kb[2], kb[3]);
      }
    }
    __syncthreads();  // every warp is done with sK
    if (j + 1 < n_blocks) {
      load_tile<T, D, kBN>(sK, k + (n0 + kBN) * a.k_stride_s, a.k_stride_s, sk - n0 - kBN);
    }
    cp_async_commit();  // possibly empty: keeps the group count uniform

    // ---- mask, scale, online softmax
    const bool need_mask = n0 + kBN > sk || kpm != nullptr || (a.causal && n0 + kBN - 1 > m0 + diag);
#pragma unroll
    for (int t = 0; t < NT; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[t][e] * scale_log2;
        if (need_mask) {
          const int64_t col = n0 + t * 8 + (lane % 4) * 2 + (e % 2);
          const int64_t row = rows[e / 2];
          bool ok = col < sk;
          if (ok && a.causal) ok = col <= row + diag;
          if (ok && kpm) ok = kpm[col];
          if (!ok) x = -INFINITY;
        }
        s[t][e] = x;
      }
    }
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int t = 0; t < NT; ++t) mx = fmaxf(mx, fmaxf(s[t][2 * r], s[t][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m_run[r], mx);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;  // no (-inf) - (-inf)
      alpha[r] = exp2f(m_run[r] - m_use);
      float sum = 0.f;
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        s[t][2 * r] = exp2f(s[t][2 * r] - m_use);
        s[t][2 * r + 1] = exp2f(s[t][2 * r + 1] - m_use);
        sum += s[t][2 * r] + s[t][2 * r + 1];
      }
      l_run[r] = l_run[r] * alpha[r] + sum;  // per-lane partial; quad-summed at the end
      m_run[r] = m_new;
    }
#pragma unroll
    for (int t = 0; t < DT; ++t) {
      acc[t][0] *= alpha[0];
      acc[t][1] *= alpha[0];
      acc[t][2] *= alpha[1];
      acc[t][3] *= alpha[1];
    }

    cp_async_wait<1>();  // V_j landed
    __syncthreads();
    // ---- O += P V_j
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      const uint32_t pa[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]),
                              pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                              pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t vb[4];
        const int key = kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8;
        ldmatrix_x4_trans(vb, sV + key * LD + dp * 16 + (lane / 16) * 8);
        mma_16816<T>(acc[2 * dp], pa, vb[0], vb[1]);
        mma_16816<T>(acc[2 * dp + 1], pa, vb[2], vb[3]);
      }
    }
    __syncthreads();  // every warp is done with sV
    if (j + 1 < n_blocks) {
      load_tile<T, D, kBN>(sV, v + (n0 + kBN) * a.v_stride_s, a.v_stride_s, sk - n0 - kBN);
    }
    cp_async_commit();
  }
  cp_async_wait<0>();  // nothing may be in flight when the block exits

  // ---- epilogue: O / l, lse
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = l_run[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const int64_t row = rows[r];
    if (row >= sq) continue;
    T* orow = o + row * a.o_stride_s;
#pragma unroll
    for (int t = 0; t < DT; ++t) {
      const int col = t * 8 + (lane % 4) * 2;
      *reinterpret_cast<uint32_t*>(orow + col) =
          pack2<T>(acc[t][2 * r] * inv, acc[t][2 * r + 1] * inv);
    }
    if (lane % 4 == 0) lse[row] = l > 0.f ? (m_run[r] + log2f(l)) * kLn2 : INFINITY;
  }
}

template <typename T, int D>
cudaError_t launch(const AttentionFwdArgs& a, cudaStream_t stream) {
  constexpr int bytes = smem_bytes<D>();
  auto kernel = attention_fwd_kernel<T, D>;
  if (bytes > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(static_cast<unsigned>(ceil_div(a.seqlen_q, kBM)),
                  static_cast<unsigned>(a.heads), static_cast<unsigned>(a.batch));
  kernel<<<grid, kThreads, bytes, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t attention_fwd(const AttentionFwdArgs& a, cudaStream_t stream) {
  if (a.dtype == DType::kFloat32) return cudaErrorInvalidValue;
  if (a.kv_heads <= 0 || a.heads % a.kv_heads != 0) return cudaErrorInvalidValue;
  if (a.batch == 0 || a.heads == 0 || a.seqlen_q == 0) return cudaSuccess;
  const bool f16 = a.dtype == DType::kFloat16;
  if (a.head_dim == 64) return f16 ? launch<__half, 64>(a, stream) : launch<__nv_bfloat16, 64>(a, stream);
  if (a.head_dim == 128)
    return f16 ? launch<__half, 128>(a, stream) : launch<__nv_bfloat16, 128>(a, stream);
  return cudaErrorInvalidValue;
}

}  // namespace fastlm
