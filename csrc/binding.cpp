// torch binding of the fastlm CUDA kernels: TORCH_LIBRARY(fastlm_cuda) ops.
//
// The only file that includes torch headers (built where a CUDA torch exists: the JIT build
// in fastlm/_cuda_ext.py or the AOT build in setup.py). Every tensor is checked (device,
// dtype, shape, last-dim contiguity, alignment) with a message naming the op, the operand,
// what was expected and what was given; kernels launch on the current stream with no host
// synchronisation, so every op can be captured in a CUDA graph. Outputs are allocated
// contiguous; inputs are never copied except the (N,) LayerNorm/bias parameters when their
// dtype is neither the activation dtype nor fp32.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <string>

#include "fastlm_kernels.h"

namespace {

using at::Tensor;
using fastlm::DType;

std::string where(const char* op) { return std::string("fastlm_cuda.") + op; }

DType dtype_of(const char* op, const char* name, const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, where(op), ": ", name, " must be float32, float16 or bfloat16, got ",
                       t.scalar_type());
  }
}

void check_cuda(const char* op, const char* name, const Tensor& t, const Tensor& ref) {
  TORCH_CHECK(t.is_cuda(), where(op), ": ", name, " must be a CUDA tensor, got device ",
              t.device());
  TORCH_CHECK(t.device() == ref.device(), where(op), ": ", name, " is on ", t.device(),
              " but the first operand is on ", ref.device(), "; all operands must be on one device");
}

void check_same_dtype(const char* op, const char* name, const Tensor& t, const Tensor& ref) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), where(op), ": ", name, " has dtype ",
                   t.scalar_type(), " but the first operand has ", ref.scalar_type(),
                   "; operands must share one dtype");
}

void check_last_contig(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, where(op), ": ", name,
              " must have a contiguous last dimension (stride 1), got strides ", t.strides(),
              " for shape ", t.sizes());
}

void check_2d_like(const char* op, const char* name, const Tensor& t, const Tensor& ref) {
  TORCH_CHECK(t.sizes() == ref.sizes(), where(op), ": ", name, " must have shape ", ref.sizes(),
              ", got ", t.sizes());
  check_cuda(op, name, t, ref);
  check_same_dtype(op, name, t, ref);
  check_last_contig(op, name, t);
}

void check_rows(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(t.is_cuda(), where(op), ": ", name, " must be a CUDA tensor, got device ",
              t.device());
  TORCH_CHECK(t.dim() == 2, where(op), ": ", name, " must be 2-D (rows, features), got shape ",
              t.sizes());
  dtype_of(op, name, t);
  check_last_contig(op, name, t);
}

// (N,) parameters: returned as-is when their dtype is the activation dtype or fp32 (the
// kernels read both), else converted to fp32. All given parameters share one dtype.
std::pair<std::optional<Tensor>, std::optional<Tensor>> params(
    const char* op, const Tensor& x, const std::optional<Tensor>& w,
    const std::optional<Tensor>& b, DType* wdtype) {
  const int64_t n = x.size(-1);
  for (const auto* p : {&w, &b}) {
    if (!p->has_value()) continue;
    const Tensor& t = **p;
    const char* name = p == &w ? "weight" : "bias";
    check_cuda(op, name, t, x);
    TORCH_CHECK(t.dim() == 1 && t.size(0) == n, where(op), ": ", name, " must have shape (", n,
                ",), got ", t.sizes());
    dtype_of(op, name, t);
  }
  auto st = x.scalar_type();
  const bool same = (!w || w->scalar_type() == st) && (!b || b->scalar_type() == st);
  auto prep = [&](const std::optional<Tensor>& t) -> std::optional<Tensor> {
    if (!t) return std::nullopt;
    return same ? t->contiguous() : t->to(at::kFloat).contiguous();
  };
  *wdtype = same ? dtype_of(op, "x", x) : DType::kFloat32;
  return {prep(w), prep(b)};
}

const void* ptr_or_null(const std::optional<Tensor>& t) {
  return t ? t->data_ptr() : nullptr;
}

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, where(op), ": kernel launch failed: ", cudaGetErrorString(err));
}

int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// ------------------------------------------------------------------------------ LayerNorm

std::tuple<Tensor, Tensor, Tensor, Tensor> layer_norm_fwd(const Tensor& x,
                                                          const std::optional<Tensor>& residual,
                                                          const std::optional<Tensor>& weight,
                                                          const std::optional<Tensor>& bias,
                                                          double eps) {
  const char* op = "layer_norm_fwd";
  check_rows(op, "x", x);
  const int64_t m = x.size(0), n = x.size(1);
  TORCH_CHECK(n >= 1 && n <= fastlm::kLayerNormMaxN, where(op), ": hidden size must be in [1, ",
              fastlm::kLayerNormMaxN, "], got ", n);
  TORCH_CHECK(eps >= 0, where(op), ": eps must be non-negative, got ", eps);
  if (residual) check_2d_like(op, "residual", *residual, x);
  DType wdtype;
  auto [w, b] = params(op, x, weight, bias, &wdtype);
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor y = at::empty({m, n}, x.options());
  Tensor z = residual ? at::empty({m, n}, x.options()) : at::empty({0}, x.options());
  Tensor mean = at::empty({m}, x.options().dtype(at::kFloat));
  Tensor rstd = at::empty({m}, x.options().dtype(at::kFloat));
  fastlm::LayerNormFwdArgs a{};
  a.x = x.data_ptr();
  a.residual = ptr_or_null(residual);
  a.weight = ptr_or_null(w);
  a.bias = ptr_or_null(b);
  a.y = y.data_ptr();
  a.z = residual ? z.data_ptr() : nullptr;
  a.mean = mean.data_ptr<float>();
  a.rstd = rstd.data_ptr<float>();
  a.rows = m;
  a.n = n;
  a.stride_x = x.stride(0);
  a.stride_r = residual ? residual->stride(0) : 0;
  a.stride_y = y.stride(0);
  a.stride_z = residual ? z.stride(0) : 0;
  a.eps = static_cast<float>(eps);
  a.dtype = dtype_of(op, "x", x);
  a.wdtype = wdtype;
  check_launch(op, fastlm::layer_norm_fwd(a, at::cuda::getCurrentCUDAStream()));
  return {y, z, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd(const Tensor& dy,
                                                  const std::optional<Tensor>& dz_extra,
                                                  const Tensor& z,
                                                  const std::optional<Tensor>& weight,
                                                  const Tensor& mean, const Tensor& rstd,
                                                  bool need_dw, bool need_db) {
  const char* op = "layer_norm_bwd";
  check_rows(op, "z", z);
  const int64_t m = z.size(0), n = z.size(1);
  TORCH_CHECK(n >= 1 && n <= fastlm::kLayerNormMaxN, where(op), ": hidden size must be in [1, ",
              fastlm::kLayerNormMaxN, "], got ", n);
  check_2d_like(op, "dy", dy, z);
  if (dz_extra) check_2d_like(op, "dz_extra", *dz_extra, z);
  for (const auto* s : {&mean, &rstd}) {
    const char* name = s == &mean ? "mean" : "rstd";
    check_cuda(op, name, *s, z);
    TORCH_CHECK(s->dim() == 1 && s->size(0) == m && s->scalar_type() == at::kFloat &&
                    s->is_contiguous(),
                where(op), ": ", name, " must be a contiguous float32 tensor of shape (", m,
                ",), got ", s->scalar_type(), " ", s->sizes());
  }
  TORCH_CHECK(!need_dw || weight.has_value(), where(op),
              ": need_dw=True needs the weight tensor, got None");
  DType wdtype;
  auto [w, unused] = params(op, z, weight, std::nullopt, &wdtype);
  (void)unused;
  const c10::cuda::CUDAGuard guard(z.device());
  auto f32 = z.options().dtype(at::kFloat);
  Tensor dz = at::empty({m, n}, z.options());
  Tensor dw = need_dw ? at::empty({n}, f32) : at::empty({0}, f32);
  Tensor db = need_db ? at::empty({n}, f32) : at::empty({0}, f32);
  const DType dt = dtype_of(op, "z", z);
  const int sms = sm_count();
  Tensor partial;
  if (need_dw || need_db) {
    partial = at::empty({2 * fastlm::layer_norm_bwd_partial_rows(m, n, dt, sms) * n}, f32);
  }
  fastlm::LayerNormBwdArgs a{};
  a.dy = dy.data_ptr();
  a.dz_extra = ptr_or_null(dz_extra);
  a.z = z.data_ptr();
  a.weight = ptr_or_null(w);
  a.mean = mean.data_ptr<float>();
  a.rstd = rstd.data_ptr<float>();
  a.dz = dz.data_ptr();
  a.dweight = need_dw ? dw.data_ptr<float>() : nullptr;
  a.dbias = need_db ? db.data_ptr<float>() : nullptr;
  a.partial = partial.defined() ? partial.data_ptr<float>() : nullptr;
  a.rows = m;
  a.n = n;
  a.stride_dy = dy.stride(0);
  a.stride_dze = dz_extra ? dz_extra->stride(0) : 0;
  a.stride_z = z.stride(0);
  a.stride_dz = dz.stride(0);
  a.dtype = dt;
  a.wdtype = wdtype;
  a.sm_count = sms;
  check_launch(op, fastlm::layer_norm_bwd(a, at::cuda::getCurrentCUDAStream()));
  return {dz, dw, db};
}

// ------------------------------------------------------------------------------ bias + GELU

fastlm::Gelu gelu_mode(const char* op, const std::string& approximate) {
  if (approximate == "none") return fastlm::Gelu::kErf;
  if (approximate == "tanh") return fastlm::Gelu::kTanh;
  TORCH_CHECK(false, where(op), ": approximate must be 'none' or 'tanh', got '", approximate, "'");
}

std::tuple<Tensor, Tensor> bias_gelu_fwd(const Tensor& x, const std::optional<Tensor>& bias,
                                         const std::string& approximate, bool store_preact) {
  const char* op = "bias_gelu_fwd";
  check_rows(op, "x", x);
  const auto mode = gelu_mode(op, approximate);
  DType wdtype;
  auto [unused, b] = params(op, x, std::nullopt, bias, &wdtype);
  (void)unused;
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor y = at::empty(x.sizes(), x.options());
  Tensor h = store_preact ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  fastlm::BiasGeluFwdArgs a{};
  a.x = x.data_ptr();
  a.bias = ptr_or_null(b);
  a.y = y.data_ptr();
  a.preact = store_preact ? h.data_ptr() : nullptr;
  a.rows = x.size(0);
  a.n = x.size(1);
  a.stride_x = x.stride(0);
  a.stride_y = y.stride(0);
  a.stride_p = store_preact ? h.stride(0) : 0;
  a.dtype = dtype_of(op, "x", x);
  a.wdtype = wdtype;
  a.approximate = mode;
  check_launch(op, fastlm::bias_gelu_fwd(a, at::cuda::getCurrentCUDAStream()));
  return {y, h};
}

Tensor gelu_bwd(const Tensor& dy, const Tensor& h, const std::string& approximate) {
  const char* op = "gelu_bwd";
  check_rows(op, "h", h);
  check_2d_like(op, "dy", dy, h);
  const auto mode = gelu_mode(op, approximate);
  const c10::cuda::CUDAGuard guard(h.device());
  Tensor dh = at::empty(h.sizes(), h.options());
  fastlm::GeluBwdArgs a{};
  a.dy = dy.data_ptr();
  a.h = h.data_ptr();
  a.dh = dh.data_ptr();
  a.rows = h.size(0);
  a.n = h.size(1);
  a.stride_dy = dy.stride(0);
  a.stride_h = h.stride(0);
  a.stride_dh = dh.stride(0);
  a.dtype = dtype_of(op, "h", h);
  a.approximate = mode;
  check_launch(op, fastlm::gelu_bwd(a, at::cuda::getCurrentCUDAStream()));
  return dh;
}

Tensor bias_residual_add(const Tensor& x, const std::optional<Tensor>& bias,
                         const Tensor& residual) {
  const char* op = "bias_residual_add";
  check_rows(op, "x", x);
  check_2d_like(op, "residual", residual, x);
  DType wdtype;
  auto [unused, b] = params(op, x, std::nullopt, bias, &wdtype);
  (void)unused;
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor y = at::empty(x.sizes(), x.options());
  fastlm::BiasResidualArgs a{};
  a.x = x.data_ptr();
  a.bias = ptr_or_null(b);
  a.residual = residual.data_ptr();
  a.y = y.data_ptr();
  a.rows = x.size(0);
  a.n = x.size(1);
  a.stride_x = x.stride(0);
  a.stride_r = residual.stride(0);
  a.stride_y = y.stride(0);
  a.dtype = dtype_of(op, "x", x);
  a.wdtype = wdtype;
  check_launch(op, fastlm::bias_residual_add(a, at::cuda::getCurrentCUDAStream()));
  return y;
}

// ------------------------------------------------------------------------------ attention

// q/k/v checks shared by the dense, varlen and decode entry points: dtype fp16/bf16, head
// dim 64/128, 16-byte aligned data and strides that are multiples of 8 elements (the
// kernels move 16-byte chunks), H divisible by Hkv.
bool supported_head_dim(int64_t d) {
  for (int h : fastlm::kAttentionHeadDims) {
    if (d == h) return true;
  }
  return false;
}

std::string supported_head_dims_text() {
  std::string text;
  for (int h : fastlm::kAttentionHeadDims) {
    text += (text.empty() ? "" : ", ") + std::to_string(h);
  }
  return text;
}

void check_qkv(const char* op, const Tensor& q, const Tensor& k, const Tensor& v, int seq_dims) {
  const int nd = seq_dims + 2;  // (..., heads, head_dim)
  const char* names[3] = {"q", "k", "v"};
  const Tensor* ts[3] = {&q, &k, &v};
  for (int i = 0; i < 3; ++i) {
    const Tensor& t = *ts[i];
    check_cuda(op, names[i], t, q);
    TORCH_CHECK(t.dim() == nd, where(op), ": ", names[i], " must be ", nd, "-D, got shape ",
                t.sizes());
    check_same_dtype(op, names[i], t, q);
    check_last_contig(op, names[i], t);
    for (int d = 0; d < nd - 1; ++d) {
      TORCH_CHECK(t.stride(d) * t.element_size() % fastlm::kOperandAlignBytes == 0 || t.size(d) == 1,
                  where(op), ": ", names[i], " strides must be multiples of ",
                  fastlm::kOperandAlignBytes, " bytes, got strides ", t.strides());
    }
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % fastlm::kOperandAlignBytes == 0,
                where(op), ": ", names[i], " data must be ", fastlm::kOperandAlignBytes,
                "-byte aligned");
  }
  TORCH_CHECK_TYPE(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, where(op),
                   ": q must be float16 or bfloat16, got ", q.scalar_type());
  const int64_t d = q.size(-1);
  TORCH_CHECK(supported_head_dim(d), where(op), ": head_dim must be one of ",
              supported_head_dims_text(), ", got ", d);
  TORCH_CHECK(k.size(-1) == d && v.size(-1) == d, where(op),
              ": q, k and v must share head_dim, got ", d, ", ", k.size(-1), ", ", v.size(-1));
  TORCH_CHECK(k.sizes() == v.sizes(), where(op), ": k and v must have one shape, got ",
              k.sizes(), " and ", v.sizes());
  const int64_t h = q.size(-2), hkv = k.size(-2);
  TORCH_CHECK(hkv >= 1 && h % hkv == 0, where(op), ": q heads (", h,
              ") must be a multiple of k/v heads (", hkv, ")");
}

std::tuple<Tensor, Tensor> attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                         const std::optional<Tensor>& key_padding_mask,
                                         double softmax_scale, bool causal) {
  const char* op = "attention_fwd";
  check_qkv(op, q, k, v, 2);
  const int64_t bsz = q.size(0), sq = q.size(1), h = q.size(2), d = q.size(3);
  const int64_t sk = k.size(1);
  TORCH_CHECK(k.size(0) == bsz, where(op), ": k batch ", k.size(0), " != q batch ", bsz);
  TORCH_CHECK(bsz <= fastlm::kMaxGridYZ && h <= fastlm::kMaxGridYZ, where(op), ": batch and heads must be <= ", fastlm::kMaxGridYZ, ", got ",
              bsz, " and ", h);
  if (key_padding_mask) {
    const Tensor& mk = *key_padding_mask;
    check_cuda(op, "key_padding_mask", mk, q);
    TORCH_CHECK_TYPE(mk.scalar_type() == at::kBool, where(op),
                     ": key_padding_mask must be bool, got ", mk.scalar_type());
    TORCH_CHECK(mk.dim() == 2 && mk.size(0) == bsz && mk.size(1) == sk, where(op),
                ": key_padding_mask must have shape (", bsz, ", ", sk, "), got ", mk.sizes());
    TORCH_CHECK(sk <= 1 || mk.stride(1) == 1, where(op),
                ": key_padding_mask must have a contiguous last dimension, got strides ",
                mk.strides());
  }
  const c10::cuda::CUDAGuard guard(q.device());
  Tensor o = at::empty({bsz, sq, h, d}, q.options());
  Tensor lse = at::empty({bsz, h, sq}, q.options().dtype(at::kFloat));
  fastlm::AttentionFwdArgs a{};
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.o = o.data_ptr();
  a.lse = lse.data_ptr<float>();
  a.key_padding_mask = key_padding_mask ? key_padding_mask->data_ptr<bool>() : nullptr;
  a.batch = bsz;
  a.heads = h;
  a.kv_heads = k.size(2);
  a.head_dim = d;
  a.seqlen_q = sq;
  a.seqlen_k = sk;
  a.q_stride_b = q.stride(0), a.q_stride_s = q.stride(1), a.q_stride_h = q.stride(2);
  a.k_stride_b = k.stride(0), a.k_stride_s = k.stride(1), a.k_stride_h = k.stride(2);
  a.v_stride_b = v.stride(0), a.v_stride_s = v.stride(1), a.v_stride_h = v.stride(2);
  a.o_stride_b = o.stride(0), a.o_stride_s = o.stride(1), a.o_stride_h = o.stride(2);
  a.lse_stride_b = h * sq;
  a.lse_stride_h = sq;
  a.mask_stride_b = key_padding_mask ? key_padding_mask->stride(0) : 0;
  a.softmax_scale = static_cast<float>(softmax_scale);
  a.causal = causal;
  a.dtype = dtype_of(op, "q", q);
  check_launch(op, fastlm::attention_fwd(a, at::cuda::getCurrentCUDAStream()));
  return {o, lse};
}

std::tuple<Tensor, Tensor> attention_varlen_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                                const Tensor& cu_seqlens_q,
                                                const Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                                int64_t max_seqlen_k, double softmax_scale,
                                                bool causal) {
  const char* op = "attention_varlen_fwd";
  check_qkv(op, q, k, v, 1);
  for (const auto* c : {&cu_seqlens_q, &cu_seqlens_k}) {
    const char* name = c == &cu_seqlens_q ? "cu_seqlens_q" : "cu_seqlens_k";
    check_cuda(op, name, *c, q);
    TORCH_CHECK_TYPE(c->scalar_type() == at::kInt, where(op), ": ", name, " must be int32, got ",
                     c->scalar_type());
    TORCH_CHECK(c->dim() == 1 && c->size(0) >= 2 && c->is_contiguous(), where(op), ": ", name,
                " must be a contiguous 1-D tensor of batch + 1 >= 2 offsets, got shape ",
                c->sizes());
  }
  TORCH_CHECK(cu_seqlens_q.size(0) == cu_seqlens_k.size(0), where(op),
              ": cu_seqlens_q and cu_seqlens_k must have one length, got ", cu_seqlens_q.size(0),
              " and ", cu_seqlens_k.size(0));
  TORCH_CHECK(max_seqlen_q >= 0 && max_seqlen_k >= 0, where(op),
              ": max_seqlen_q/k must be non-negative, got ", max_seqlen_q, ", ", max_seqlen_k);
  const int64_t bsz = cu_seqlens_q.size(0) - 1, total_q = q.size(0), h = q.size(1);
  TORCH_CHECK(bsz <= fastlm::kMaxGridYZ && h <= fastlm::kMaxGridYZ, where(op), ": batch and heads must be <= ", fastlm::kMaxGridYZ);
  const c10::cuda::CUDAGuard guard(q.device());
  Tensor o = at::empty({total_q, h, q.size(2)}, q.options());
  Tensor lse = at::empty({h, total_q}, q.options().dtype(at::kFloat));
  fastlm::AttentionFwdArgs a{};
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.o = o.data_ptr();
  a.lse = lse.data_ptr<float>();
  a.cu_seqlens_q = cu_seqlens_q.data_ptr<int32_t>();
  a.cu_seqlens_k = cu_seqlens_k.data_ptr<int32_t>();
  a.batch = bsz;
  a.heads = h;
  a.kv_heads = k.size(1);
  a.head_dim = q.size(2);
  a.seqlen_q = max_seqlen_q;
  a.seqlen_k = max_seqlen_k;
  a.total_q = total_q;
  a.total_k = k.size(0);
  a.q_stride_s = q.stride(0), a.q_stride_h = q.stride(1);
  a.k_stride_s = k.stride(0), a.k_stride_h = k.stride(1);
  a.v_stride_s = v.stride(0), a.v_stride_h = v.stride(1);
  a.o_stride_s = o.stride(0), a.o_stride_h = o.stride(1);
  a.lse_stride_h = total_q;
  a.softmax_scale = static_cast<float>(softmax_scale);
  a.causal = causal;
  a.dtype = dtype_of(op, "q", q);
  check_launch(op, fastlm::attention_fwd(a, at::cuda::getCurrentCUDAStream()));
  return {o, lse};
}

std::tuple<Tensor, Tensor> attention_decode(const Tensor& q, const Tensor& k_cache,
                                            const Tensor& v_cache, const Tensor& seqlens_k,
                                            double softmax_scale, bool causal) {
  const char* op = "attention_decode";
  check_qkv(op, q, k_cache, v_cache, 2);
  const int64_t bsz = q.size(0), sq = q.size(1), h = q.size(2), d = q.size(3);
  TORCH_CHECK(k_cache.size(0) == bsz, where(op), ": k_cache batch ", k_cache.size(0),
              " != q batch ", bsz);
  check_cuda(op, "cache_seqlens", seqlens_k, q);
  TORCH_CHECK_TYPE(seqlens_k.scalar_type() == at::kInt, where(op),
                   ": cache_seqlens must be int32, got ", seqlens_k.scalar_type());
  TORCH_CHECK(seqlens_k.dim() == 1 && seqlens_k.size(0) == bsz && seqlens_k.is_contiguous(),
              where(op), ": cache_seqlens must be a contiguous (", bsz, ",) tensor, got shape ",
              seqlens_k.sizes());
  TORCH_CHECK(h <= fastlm::kMaxGridYZ && bsz * sq <= fastlm::kMaxGridYZ, where(op),
              ": heads and batch * seqlen_q must be <= ", fastlm::kMaxGridYZ, ", got ", h, " and ",
              bsz * sq);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t cache_len = k_cache.size(1);
  const int splits =
      fastlm::attention_decode_num_splits(bsz, sq, h, k_cache.size(2), cache_len, sm_count());
  auto f32 = q.options().dtype(at::kFloat);
  Tensor o = at::empty({bsz, sq, h, d}, q.options());
  Tensor lse = at::empty({bsz, h, sq}, f32);
  Tensor op_part, lse_part;
  if (splits > 1) {
    op_part = at::empty({bsz * sq * h * splits * d}, f32);
    lse_part = at::empty({bsz * sq * h * splits}, f32);
  }
  fastlm::AttentionDecodeArgs a{};
  a.q = q.data_ptr();
  a.k_cache = k_cache.data_ptr();
  a.v_cache = v_cache.data_ptr();
  a.seqlens_k = seqlens_k.data_ptr<int32_t>();
  a.o = o.data_ptr();
  a.lse = lse.data_ptr<float>();
  a.o_partial = splits > 1 ? op_part.data_ptr<float>() : nullptr;
  a.lse_partial = splits > 1 ? lse_part.data_ptr<float>() : nullptr;
  a.batch = bsz;
  a.seqlen_q = sq;
  a.heads = h;
  a.kv_heads = k_cache.size(2);
  a.head_dim = d;
  a.cache_len = cache_len;
  a.q_stride_b = q.stride(0), a.q_stride_s = q.stride(1), a.q_stride_h = q.stride(2);
  a.k_stride_b = k_cache.stride(0), a.k_stride_s = k_cache.stride(1);
  a.k_stride_h = k_cache.stride(2);
  a.v_stride_b = v_cache.stride(0), a.v_stride_s = v_cache.stride(1);
  a.v_stride_h = v_cache.stride(2);
  a.o_stride_b = o.stride(0), a.o_stride_s = o.stride(1), a.o_stride_h = o.stride(2);
  a.softmax_scale = static_cast<float>(softmax_scale);
  a.causal = causal;
  a.splits = splits;
  a.dtype = dtype_of(op, "q", q);
  check_launch(op, fastlm::attention_decode(a, at::cuda::getCurrentCUDAStream()));
  return {o, lse};
}

}  // namespace

TORCH_LIBRARY(fastlm_cuda, m) {
  m.def(
      "layer_norm_fwd(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps)"
      " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "layer_norm_bwd(Tensor dy, Tensor? dz_extra, Tensor z, Tensor? weight, Tensor mean,"
      " Tensor rstd, bool need_dw, bool need_db) -> (Tensor, Tensor, Tensor)");
  m.def(
      "bias_gelu_fwd(Tensor x, Tensor? bias, str approximate, bool store_preact)"
      " -> (Tensor, Tensor)");
  m.def("gelu_bwd(Tensor dy, Tensor h, str approximate) -> Tensor");
  m.def("bias_residual_add(Tensor x, Tensor? bias, Tensor residual) -> Tensor");
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask,"
      " float softmax_scale, bool causal) -> (Tensor, Tensor)");
  m.def(
      "attention_varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q,"
      " Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float softmax_scale,"
      " bool causal) -> (Tensor, Tensor)");
  m.def(
      "attention_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor seqlens_k,"
      " float softmax_scale, bool causal) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastlm_cuda, CUDA, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd);
  m.impl("layer_norm_bwd", &layer_norm_bwd);
  m.impl("bias_gelu_fwd", &bias_gelu_fwd);
  m.impl("gelu_bwd", &gelu_bwd);
  m.impl("bias_residual_add", &bias_residual_add);
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_varlen_fwd", &attention_varlen_fwd);
  m.impl("attention_decode", &attention_decode);
}
