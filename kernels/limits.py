"""The Triton kernels' limits, declared once and importable without triton.

The ops' ``_triton.py`` backend files read these to say why a call cannot run on the
Triton kernels (backend choice must not import triton); the kernels read them too.
"""

# LayerNorm keeps a whole row in registers (one program per row block): N <= 16384 fp32
# values is 64 KB per row, the most a program holds without spilling.
LAYER_NORM_MAX_N = 16384

# Attention tiles pad head_dim to a power of two >= 16 (the smallest tl.dot K); 256 is the
# widest tile whose q/k/v/o blocks fit in shared memory with useful block sizes.
ATTENTION_MIN_HEAD_DIM = 16
ATTENTION_MAX_HEAD_DIM = 256

# The split-KV decode kernel keeps one query row and a key block of head_dim in registers.
DECODE_MAX_HEAD_DIM = 256

# Its grid puts blocks of query rows (seqlen_q * heads / kv_heads per kv head, at least 32
# rows a block) on axis 2, which CUDA caps at 65535 blocks.
DECODE_MAX_QUERY_ROWS = 65535 * 32
