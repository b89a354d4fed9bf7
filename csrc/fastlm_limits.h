// The limits of fastlm's CUDA C++ kernels: the one table.
//
// The binding (binding.cpp) checks every call against these as a last line of defence;
// the Python side (fastlm/_cuda_ext.py) reads THIS FILE at run time, so the reasons an
// automatic backend choice gives and the checks the binding makes cannot drift apart.
// Keep each limit on one line of the form `inline constexpr int kName = <int>;`
// (arrays: `inline constexpr int kName[] = {<int>, ...};`): that is what Python parses.
#pragma once

namespace fastlm {

// LayerNorm keeps one row in registers: hidden size N <= kLayerNormMaxN.
inline constexpr int kLayerNormMaxN = 16384;

// The attention kernels (forward and split-KV decode) are instantiated for these head dims.
inline constexpr int kAttentionHeadDims[] = {64, 128};

// CUDA's cap on gridDim.y and gridDim.z; the attention kernels put heads and batch there.
inline constexpr int kMaxGridYZ = 65535;

// mma.sync m16n8k16 with fp16/bf16 operands needs sm_80 (compute capability 8.0).
inline constexpr int kAttentionMinCapability = 80;

// cp.async / ldmatrix move 16 bytes: operands' data and row strides are 16-byte aligned.
inline constexpr int kOperandAlignBytes = 16;

}  // namespace fastlm
