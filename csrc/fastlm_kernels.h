// fastlm CUDA C++ kernels: torch-free launchers.
//
// Every launcher takes raw device pointers, sizes, strides (in elements) and a
// cudaStream_t, launches asynchronously (no host synchronisation, so the calls are safe
// inside CUDA-graph capture) and returns cudaGetLastError() of the launch. Validation of
// user input happens in csrc/binding.cpp (TORCH_CHECK) and fastlm/_cuda_ext.py; the
// launchers only assume what those checks guarantee (documented per struct).
//
// This header is plain C++ so that nvcc can compile-check every kernel file without
// torch headers (tests/csrc/test_compile.py).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "fastlm_limits.h"

namespace fastlm {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// ------------------------------------------------------------------------ LayerNorm
// Forward, per row of N features (statistics in fp32):
//   z = x + residual (rounded to the activation dtype), mean = sum(z)/N,
//   rstd = 1/sqrt(sum((z-mean)^2)/N + eps), y = (z-mean)*rstd*weight + bias.
// x, residual, y, z: (M, N) with the given row strides, contiguous rows.
// weight, bias: (N,) of dtype `wdtype` (== dtype, or kFloat32), or nullptr.
// mean, rstd: (M,) fp32, contiguous.  residual == nullptr: z is not written.

struct LayerNormFwdArgs {
  const void* x;
  const void* residual;  // nullable
  const void* weight;    // nullable
  const void* bias;      // nullable
  void* y;
  void* z;  // written when residual != nullptr (then it must be non-null)
  float* mean;
  float* rstd;
  int64_t rows;
  int64_t n;
  int64_t stride_x, stride_r, stride_y, stride_z;
  float eps;
  DType dtype;
  DType wdtype;
};
cudaError_t layer_norm_fwd(const LayerNormFwdArgs& a, cudaStream_t stream);

// Backward, with xhat = (z-mean)*rstd and g = dy*weight:
//   dz = rstd*(g - mean(g) - xhat*mean(g*xhat)) + dz_extra
//   dweight = sum_rows(dy*xhat), dbias = sum_rows(dy)     (fp32, (N,))
// dweight/dbias are reduced in two stages: per-block partials into `partial`
// (layer_norm_bwd_partial_rows(...) rows of N fp32 each for dw, the same again for db),
// then a column reduction kernel. dz has the dtype of z.
struct LayerNormBwdArgs {
  const void* dy;
  const void* dz_extra;  // nullable
  const void* z;
  const void* weight;  // nullable
  const float* mean;
  const float* rstd;
  void* dz;
  float* dweight;  // (N,) fp32, nullable (not needed)
  float* dbias;    // (N,) fp32, nullable (not needed)
  float* partial;  // 2 * partial_rows * N fp32 scratch when dweight or dbias is needed
  int64_t rows;
  int64_t n;
  int64_t stride_dy, stride_dze, stride_z, stride_dz;
  DType dtype;
  DType wdtype;
  int sm_count;
};
int64_t layer_norm_bwd_partial_rows(int64_t rows, int64_t n, DType dtype, int sm_count);
cudaError_t layer_norm_bwd(const LayerNormBwdArgs& a, cudaStream_t stream);

// ------------------------------------------------------------------------ bias + activation
// h = x + bias (rounded to the dtype when stored), y = gelu(h) computed from the fp32 h.
// approximate: 0 = exact erf GELU, 1 = tanh approximation.
// x, y, preact: (M, N) with row strides; bias: (N,) of `wdtype` or nullptr.
enum class Gelu : int { kErf = 0, kTanh = 1 };

struct BiasGeluFwdArgs {
  const void* x;
  const void* bias;  // nullable
  void* y;
  void* preact;  // nullable: store h = x + bias for the backward
  int64_t rows, n;
  int64_t stride_x, stride_y, stride_p;
  DType dtype;
  DType wdtype;
  Gelu approximate;
};
cudaError_t bias_gelu_fwd(const BiasGeluFwdArgs& a, cudaStream_t stream);

// dh = dy * gelu'(h); dy, h, dh: (M, N) with row strides.
struct GeluBwdArgs {
  const void* dy;
  const void* h;
  void* dh;
  int64_t rows, n;
  int64_t stride_dy, stride_h, stride_dh;
  DType dtype;
  Gelu approximate;
};
cudaError_t gelu_bwd(const GeluBwdArgs& a, cudaStream_t stream);

// y = x + bias + residual (fp32 sum, one rounding); bias nullable.
struct BiasResidualArgs {
  const void* x;
  const void* bias;  // nullable
  const void* residual;
  void* y;
  int64_t rows, n;
  int64_t stride_x, stride_r, stride_y;
  DType dtype;
  DType wdtype;
};
cudaError_t bias_residual_add(const BiasResidualArgs& a, cudaStream_t stream);

// ------------------------------------------------------------------------ attention forward
// FlashAttention-2 forward on tensor cores (mma.sync m16n8k16), fp16/bf16, head_dim 64/128.
//   S = softmax_scale * Q K^T, masked; O = softmax(S) V; lse = logsumexp(S) per row.
// Dense: q (B, Sq, H, D), k/v (B, Sk, Hkv, D), o (B, Sq, H, D), lse (B, H, Sq) fp32.
// Varlen (cu_seqlens_q != nullptr): q/o (total_q, H, D), k/v (total_k, Hkv, D); batch
//   strides are ignored, sequence b spans rows cu_seqlens[b] .. cu_seqlens[b+1];
//   lse is (H, total_q). The grid covers max_seqlen_q rows per sequence. The offsets are
//   not validated on the host (that would be a sync): the kernel clamps every span into
//   [0, total_q] / [0, total_k] and its length to max_seqlen, so no offsets can make it
//   read or write outside the tensors (the caller flags invalid ones).
// causal: query i sees key j iff j <= i + (Sk - Sq) (bottom-right aligned).
// key_padding_mask: bool (B, Sk) with batch stride, true = attend (dense only).
// A query row with no key to attend to gets o = 0 and lse = +inf.
// Requirements (checked by the binding): 16-byte aligned base pointers, strides multiples
// of 8 elements, H % Hkv == 0.
struct AttentionFwdArgs {
  const void* q;
  const void* k;
  const void* v;
  void* o;
  float* lse;
  const bool* key_padding_mask;  // nullable
  const int32_t* cu_seqlens_q;   // nullable (dense)
  const int32_t* cu_seqlens_k;   // nullable (dense)
  int64_t batch, heads, kv_heads, head_dim;
  int64_t seqlen_q, seqlen_k;  // dense sizes, or max_seqlen_q / max_seqlen_k for varlen
  int64_t total_q, total_k;    // varlen: rows of q/o and of k/v (every span is clamped into them)
  int64_t q_stride_b, q_stride_s, q_stride_h;
  int64_t k_stride_b, k_stride_s, k_stride_h;
  int64_t v_stride_b, v_stride_s, v_stride_h;
  int64_t o_stride_b, o_stride_s, o_stride_h;
  int64_t lse_stride_b, lse_stride_h;  // lse row index = (b | cu_q[b]) ... + h*stride_h + i
  int64_t mask_stride_b;
  float softmax_scale;
  bool causal;
  DType dtype;
};
cudaError_t attention_fwd(const AttentionFwdArgs& a, cudaStream_t stream);

// ------------------------------------------------------------------------ decode
// Attention of a few new query rows over a KV cache, split over the key axis.
// q (B, Sq, H, D); k_cache/v_cache (B, S_cache, Hkv, D); seqlens_k (B,) int32: the number
// of valid keys of each sequence (already including the Sq new ones when causal).
// causal: query i sees key j iff j <= i + seqlens_k[b] - Sq. o (B, Sq, H, D);
// lse (B, H, Sq) fp32 (+inf where no key is visible, and o = 0 there).
// Split-KV: partial results go to o_partial ((B*Sq*H) x splits x D fp32) and
// lse_partial ((B*Sq*H) x splits fp32), then a combine kernel writes o and lse. Each row's
// visible keys (its actual length, read on the device) are divided over the splits; one
// block serves up to 4 query heads of a kv head, reading each K/V row once for them.
struct AttentionDecodeArgs {
  const void* q;
  const void* k_cache;
  const void* v_cache;
  const int32_t* seqlens_k;
  void* o;
  float* lse;
  float* o_partial;    // scratch, attention_decode_num_splits(...) * B*Sq*H*D floats
  float* lse_partial;  // scratch, splits * B*Sq*H floats
  int64_t batch, seqlen_q, heads, kv_heads, head_dim, cache_len;
  int64_t q_stride_b, q_stride_s, q_stride_h;
  int64_t k_stride_b, k_stride_s, k_stride_h;
  int64_t v_stride_b, v_stride_s, v_stride_h;
  int64_t o_stride_b, o_stride_s, o_stride_h;
  float softmax_scale;
  bool causal;
  int splits;  // from attention_decode_num_splits
  DType dtype;
};
int attention_decode_num_splits(int64_t batch, int64_t seqlen_q, int64_t heads, int64_t kv_heads,
                                int64_t cache_len, int sm_count);
cudaError_t attention_decode(const AttentionDecodeArgs& a, cudaStream_t stream);

}  // namespace fastlm
