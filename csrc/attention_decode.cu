// Decode attention over a KV cache, split over the key axis (split-KV / flash-decoding).
//
// For query row i of sequence b and head h (kv head h / (H / Hkv)):
//   keys visible: j < end = seqlens_k[b] - (causal ? Sq - 1 - i : 0), clamped to the cache
//   S_j = softmax_scale * q . k_j,  o = sum_j softmax(S)_j v_j,  lse = logsumexp(S)
//
// Stage 1 (grid: splits x Hkv*head_blocks x B*Sq, 128 threads). One block serves QPB query
// heads of one kv head (GQA: the group's heads, up to 4 per block), so each K/V row is read
// once for all of them, not once per query head. Split s covers keys [s*chunk, (s+1)*chunk)
// of this row's visible keys, chunk = ceil(end / splits) rounded up to a loop step: the
// split follows the actual length read on the device, so a large preallocated cache with
// short sequences still spreads the real keys over every split (splitting the capacity
// left most splits empty). A key is read by D/8 lanes, 16 bytes each (one 128-bit load per
// lane for K and for V), so a warp reads 32/(D/8) keys per step and the block 16 (D=64) or
// 8 (D=128) keys; each lane loads 4 keys of K and V before using any, keeping 128 bytes
// per lane in flight, which is what a memory-bound kernel needs. Each group of D/8 lanes
// runs its own online softmax per query head (fp32, log2 units); the groups are merged
// through shared memory at the end, one head at a time. With one split the result is
// final; otherwise the split's normalised output and its lse go to fp32 scratch and stage
// 2 merges them:
//   M = max_s lse_s,  w_s = 2^(lse_s - M),  o = sum_s w_s o_s / sum_s w_s.
// Lengths come from device memory (seqlens_k): no host synchronisation, CUDA-graph safe.
// Rows that see no key get o = 0 and lse = +inf.
#include <algorithm>
#include <cmath>

#include "common.cuh"
#include "fastlm_kernels.h"

namespace fastlm {
namespace {

constexpr int kThreads = 128;
constexpr int kUnroll = 4;
constexpr int kMaxSplits = 64;
// Query heads sharing one K/V read. ptxas (sm_90): 56 registers at 1 head, ~130 at 4, 255 at
// 8; 4 keeps three blocks (48 KB of loads in flight) per multiprocessor, 8 only two.
constexpr int kMaxHeadsPerBlock = 4;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Query heads per block: the GQA group size rounded up to a power of two, at most 4.
int heads_per_block(int64_t heads, int64_t kv_heads) {
  const int64_t group = std::max<int64_t>(1, heads / std::max<int64_t>(1, kv_heads));
  int qpb = 1;
  while (qpb < group && qpb < kMaxHeadsPerBlock) qpb *= 2;
  return qpb;
}

template <typename T, int D, int QPB>
__global__ void __launch_bounds__(kThreads) decode_split_kernel(AttentionDecodeArgs a) {
  constexpr int TPK = D / 8;              // lanes per key
  constexpr int G = kThreads / TPK;       // key groups per block
  constexpr int STEP = G * kUnroll;       // keys per loop iteration
  __shared__ float sm_m[G], sm_l[G];
  __shared__ float sm_acc[G][D];

  const int split = blockIdx.x;
  const int64_t group = a.heads / a.kv_heads;
  const int64_t head_blocks = ceil_div(group, QPB);
  const int64_t kvh = blockIdx.y / head_blocks;
  const int64_t h0 = kvh * group + (blockIdx.y % head_blocks) * QPB;  // first query head
  const int64_t left = kvh * group + group - h0;
  const int64_t nq = left < QPB ? left : QPB;  // the heads of this block that exist
  const int64_t b = blockIdx.z / a.seqlen_q, i = blockIdx.z % a.seqlen_q;
  const int g = threadIdx.x / TPK, d0 = (threadIdx.x % TPK) * 8;

  int64_t end = a.seqlens_k[b];
  if (a.causal) end -= a.seqlen_q - 1 - i;
  end = end < 0 ? 0 : (end > a.cache_len ? a.cache_len : end);
  const int64_t chunk = ceil_div(ceil_div(end, a.splits), STEP) * STEP;
  const int64_t start = split * chunk;
  const int64_t stop = start + chunk < end ? start + chunk : end;

  const T* kc = static_cast<const T*>(a.k_cache) + b * a.k_stride_b + kvh * a.k_stride_h + d0;
  const T* vc = static_cast<const T*>(a.v_cache) + b * a.v_stride_b + kvh * a.v_stride_h + d0;

  const float scale_log2 = a.softmax_scale * kLog2e;
  float qv[QPB][8], acc[QPB][8], m[QPB], l[QPB];
#pragma unroll
  for (int qh = 0; qh < QPB; ++qh) {
    // Heads past the group (nq < QPB) compute on head h0's q and are never stored.
    const int64_t h = qh < nq ? h0 + qh : h0;
    const T* q = static_cast<const T*>(a.q) + b * a.q_stride_b + i * a.q_stride_s + h * a.q_stride_h;
    unpack16<T>(*reinterpret_cast<const uint4*>(q + d0), qv[qh]);
    m[qh] = -INFINITY;
    l[qh] = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      qv[qh][e] *= scale_log2;
      acc[qh][e] = 0.f;
    }
  }

  // Uniform trip count over the block: the lane shuffles below need the whole warp.
  for (int64_t it = start; it < stop; it += STEP) {
    uint4 kr[kUnroll], vr[kUnroll];
    bool ok[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t key = it + u * G + g;
      ok[u] = key < stop;
      kr[u] = ok[u] ? *reinterpret_cast<const uint4*>(kc + key * a.k_stride_s) : make_uint4(0, 0, 0, 0);
      vr[u] = ok[u] ? *reinterpret_cast<const uint4*>(vc + key * a.v_stride_s) : make_uint4(0, 0, 0, 0);
    }
    // K/V stay packed (16 registers each) and are unpacked per head: holding them as
    // floats too would cost 64 more registers per thread.
#pragma unroll
    for (int qh = 0; qh < QPB; ++qh) {
      float sc[kUnroll];
      float mx = -INFINITY;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        float kv[8];
        unpack16<T>(kr[u], kv);
        float dot = 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) dot += qv[qh][e] * kv[e];
#pragma unroll
        for (int off = TPK / 2; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
        sc[u] = ok[u] ? dot : -INFINITY;
        mx = fmaxf(mx, sc[u]);
      }
      const float m_new = fmaxf(m[qh], mx);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      const float alpha = exp2f(m[qh] - m_use);
      l[qh] *= alpha;
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[qh][e] *= alpha;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const float p = exp2f(sc[u] - m_use);
        float vv[8];
        unpack16<T>(vr[u], vv);
        l[qh] += p;
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[qh][e] += p * vv[e];
      }
      m[qh] = m_new;
    }
  }

  // Merge the G groups of this block, one query head at a time (one shared buffer).
  const int64_t bi = b * a.seqlen_q + i;
#pragma unroll
  for (int qh = 0; qh < QPB; ++qh) {
    if (threadIdx.x % TPK == 0) {
      sm_m[g] = m[qh];
      sm_l[g] = l[qh];
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) sm_acc[g][d0 + e] = acc[qh][e];
    __syncthreads();
    if (qh < nq) {  // uniform over the block
      const int64_t h = h0 + qh;
      float big = -INFINITY;
#pragma unroll
      for (int k = 0; k < G; ++k) big = fmaxf(big, sm_m[k]);
      float lt = 0.f;
      if (big != -INFINITY) {
#pragma unroll
        for (int k = 0; k < G; ++k) lt += exp2f(sm_m[k] - big) * sm_l[k];
      }
      const int64_t row = bi * a.heads + h;  // index of (b, i, h)
      for (int d = threadIdx.x; d < D; d += kThreads) {
        float o = 0.f;
        if (lt > 0.f) {
#pragma unroll
          for (int k = 0; k < G; ++k) o += exp2f(sm_m[k] - big) * sm_acc[k][d];
          o /= lt;
        }
        if (a.splits == 1) {
          T* out = static_cast<T*>(a.o) + b * a.o_stride_b + i * a.o_stride_s + h * a.o_stride_h;
          out[d] = from_float<T>(o);
        } else {
          a.o_partial[(row * a.splits + split) * D + d] = o;
        }
      }
      if (threadIdx.x == 0) {
        if (a.splits == 1) {
          a.lse[(b * a.heads + h) * a.seqlen_q + i] = lt > 0.f ? (big + log2f(lt)) * kLn2 : INFINITY;
        } else {
          a.lse_partial[row * a.splits + split] = lt > 0.f ? big + log2f(lt) : -INFINITY;
        }
      }
    }
    __syncthreads();  // the next head overwrites the shared buffers
  }
}

// Stage 2: one block of D threads per (b, i, h) row merges the splits.
template <typename T, int D>
__global__ void __launch_bounds__(D) decode_combine_kernel(AttentionDecodeArgs a) {
  const int64_t row = blockIdx.x;  // (b * Sq + i) * H + h
  const int64_t h = row % a.heads, bi = row / a.heads;
  const int64_t b = bi / a.seqlen_q, i = bi % a.seqlen_q;
  const float* lp = a.lse_partial + row * a.splits;
  float big = -INFINITY;
  for (int s = 0; s < a.splits; ++s) big = fmaxf(big, lp[s]);
  float wsum = 0.f, o = 0.f;
  if (big != -INFINITY) {
    for (int s = 0; s < a.splits; ++s) {
      const float w = exp2f(lp[s] - big);  // empty splits: 2^-inf = 0
      wsum += w;
      o += w * a.o_partial[(row * a.splits + s) * D + threadIdx.x];
    }
  }
  T* out = static_cast<T*>(a.o) + b * a.o_stride_b + i * a.o_stride_s + h * a.o_stride_h;
  out[threadIdx.x] = from_float<T>(wsum > 0.f ? o / wsum : 0.f);
  if (threadIdx.x == 0) {
    a.lse[(b * a.heads + h) * a.seqlen_q + i] = wsum > 0.f ? (big + log2f(wsum)) * kLn2 : INFINITY;
  }
}

template <typename T, int D, int QPB>
cudaError_t launch(const AttentionDecodeArgs& a, cudaStream_t stream) {
  const int64_t head_blocks = a.kv_heads * ceil_div(a.heads / a.kv_heads, QPB);
  const dim3 grid(static_cast<unsigned>(a.splits), static_cast<unsigned>(head_blocks),
                  static_cast<unsigned>(a.batch * a.seqlen_q));
  decode_split_kernel<T, D, QPB><<<grid, kThreads, 0, stream>>>(a);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || a.splits == 1) return err;
  decode_combine_kernel<T, D>
      <<<static_cast<unsigned>(a.batch * a.seqlen_q * a.heads), D, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t launch_heads(const AttentionDecodeArgs& a, cudaStream_t stream) {
  switch (heads_per_block(a.heads, a.kv_heads)) {
    case 1: return launch<T, D, 1>(a, stream);
    case 2: return launch<T, D, 2>(a, stream);
    default: return launch<T, D, kMaxHeadsPerBlock>(a, stream);
  }
}

}  // namespace

int attention_decode_num_splits(int64_t batch, int64_t seqlen_q, int64_t heads, int64_t kv_heads,
                                int64_t cache_len, int sm_count) {
  // Enough blocks for ~2 waves of the GPU, but at least 256 keys of capacity per split (the
  // host cannot see the actual lengths without a sync; the kernel splits those evenly).
  const int64_t blocks = std::max<int64_t>(
      1, batch * seqlen_q * kv_heads * ceil_div(heads / std::max<int64_t>(1, kv_heads),
                                                heads_per_block(heads, kv_heads)));
  const int64_t want = ceil_div(2LL * std::max(sm_count, 1), blocks);
  const int64_t cap = std::max<int64_t>(1, ceil_div(cache_len, 256));
  return static_cast<int>(std::clamp<int64_t>(std::min(want, cap), 1, kMaxSplits));
}

cudaError_t attention_decode(const AttentionDecodeArgs& a, cudaStream_t stream) {
  if (a.dtype == DType::kFloat32) return cudaErrorInvalidValue;
  if (a.kv_heads <= 0 || a.heads % a.kv_heads != 0) return cudaErrorInvalidValue;
  if (a.splits < 1 || a.splits > kMaxSplits) return cudaErrorInvalidValue;
  if (a.splits > 1 && (a.o_partial == nullptr || a.lse_partial == nullptr))
    return cudaErrorInvalidValue;
  if (a.batch == 0 || a.seqlen_q == 0 || a.heads == 0) return cudaSuccess;
  const bool f16 = a.dtype == DType::kFloat16;
  if (a.head_dim == 64)
    return f16 ? launch_heads<__half, 64>(a, stream) : launch_heads<__nv_bfloat16, 64>(a, stream);
  if (a.head_dim == 128)
    return f16 ? launch_heads<__half, 128>(a, stream) : launch_heads<__nv_bfloat16, 128>(a, stream);
  return cudaErrorInvalidValue;
}

}  // namespace fastlm
