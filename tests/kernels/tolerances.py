"""The one tolerance table for the kernel tests. Every number is justified where it is defined.

Unit roundoff ``u`` of a storage dtype is half its machine epsilon: fp32 2**-24, fp16 2**-11, bf16 2**-8.
"""

import torch

# Integer quantization round trip, per element: |x - deq(q(x))| <= scale/2 + QUANT_REL[dtype] * absmax(group).
# scale/2 is the rounding of the code. The extra term covers three roundings to the storage dtype, each at
# most u * absmax(group): the stored zero (min rounded, can push a value below it -> clamped code), the
# stored scale (scale*levels can fall short of max -> clamped code), and the output cast. 3u, padded to 4u
# (fp32 also absorbs the float32 arithmetic of (x - zero) / scale).
QUANT_REL = {torch.float32: 4 * 2.0**-24, torch.float16: 4 * 2.0**-11, torch.bfloat16: 4 * 2.0**-8}

# fp8 round trip: |x - deq| <= FP8_REL[fmt] * |x| + FP8_SUB[fmt] * scale + QUANT_REL-like output cast.
# Half an ulp relative: e4m3 has 3 mantissa bits (2**-4), e5m2 has 2 (2**-3). Below the normal range the
# step is absolute: half the smallest subnormal, 2**-10 (e4m3) and 2**-17 (e5m2), times the scale.
FP8_REL = {"e4m3": 2.0**-4, "e5m2": 2.0**-3}
FP8_SUB = {"e4m3": 2.0**-10, "e5m2": 2.0**-17}
OUT_CAST_REL = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}

# Triton vs reference for the quantizers: identical codes are expected (same fp32 arithmetic, same
# half-up rounding); dequantized values may differ by the order of the fused multiply-add, one output ulp.
QUANT_TRITON_VS_REF = {torch.float32: (1e-6, 1e-6), torch.float16: (1e-3, 1e-3), torch.bfloat16: (8e-3, 8e-3)}

# Decode attention (atol, rtol) on outputs of magnitude ~1 (softmax-weighted means of N(0,1) values).
# fp32: accumulation order differs (split-KV merge, blocked dot products), error ~ sqrt(T) * 2**-24 -> 1e-5.
# fp16/bf16 inputs: both paths accumulate in fp32 but the output is rounded to the input dtype (u = 2**-11,
# 2**-8) and the Triton path casts p to the input dtype before the p@V product -> 2u-4u.
ATTN = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}

# Decode attention over fp8 / int KV, Triton vs reference. The reference dequantizes to float32; the kernel
# feeds tensor-core dots in the input dtype, so it rounds once more: the dequantized tile (c*s + z) or the
# scale-folded query (q*s), and p*s for per-token value scales -> one extra u on top of ATTN, padded 2x.
ATTN_QUANT = {torch.float32: (2e-5, 2e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}

# Attention probabilities summed per KV head (values in [0, group]); same reasoning, fp32 exp/log.
ATTN_PROBS = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (8e-3, 8e-3)}

# Reference decode attention vs torch SDPA on the same (dequantized) tensors: both fp32 math; only the
# summation order differs.
REF_VS_SDPA = (1e-5, 1e-5)

# Gathers and copies move bits: exact.
EXACT = (0.0, 0.0)
