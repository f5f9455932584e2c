"""Dequantize-fused GEMM kernels: ``y = x @ dequant(W).T (+ bias)`` for optc's weight formats.

One program computes a (BLOCK_M, BLOCK_N) tile of ``y``, looping over K in BLOCK_K steps: it
loads an x tile, loads the matching tile of the *stored* weight (int8, packed int4, bfp
mantissas), dequantizes it in registers, and accumulates one ``tl.dot``. The weight is read
from memory once per M-tile in its compact form, which is the point of the fusion: at decode
(M=1, one M-tile) the kernel reads 1 (int8) or ~0.5 (int4) bytes per weight instead of 2 or 4.
Variants (``${load_w}`` / ``${epilogue}`` fragments, filled by ``optc.ops.quant``):

  int8   w = q (exact in fp16/bf16/fp32); the per-channel scale is applied once in the epilogue.
  int4   tile-64 layout of ``optc.quant.formats``: byte ``(n // 64) * 32 K + 32 k + n % 32``,
         nibble ``(n // 32) % 2``; w = (q - 8) s + z, with s, z of the tile's one group
         (BLOCK_K divides the group size, so a K step never straddles two groups).
  bfp    w = m * 2^e, 2^e built exactly from the exponent bits; x is gathered through ``perm``.
  w8a8   x arrives quantized (int8 rows + fp32 row scales, from the wrapper); int8 x int8 ->
         int32 ``tl.dot``, exact; scales sx[m] * s[n] in the epilogue.

``DOT_FP32`` (constexpr) casts both dot operands to fp32: required for fp32 activations and
under ``TRITON_INTERPRET=1``, whose ``tl.dot`` on bf16 multiplies raw bit patterns (FACTS.md);
on a GPU with fp16/bf16 activations the dot runs in the activation dtype (tensor cores), the
dequantized weight rounded to it once. fp32 dots use ``input_precision="ieee"`` (no TF32).
Every load and store is masked; masked lanes load 0 and so add nothing to the dot.
"""

KERNEL = '''\
${header}
import triton
import triton.language as tl


@triton.jit
def ${entry}(
    # pointers
    ${pointers},
    # dimensions
    ${dimensions},
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=${acc_dtype})
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_mask = rk < K
        xw_mask = m_mask[:, None] & k_mask[None, :]
        wk_mask = k_mask[:, None] & n_mask[None, :]
${load_x}
${load_w}
${dot}
${epilogue}
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + ${y_offset}, y.to(y_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])
'''

LOAD_X = '''\
        x = tl.load(x_ptr + ${x_offset}, mask=xw_mask, other=0)'''

# bfp: x gathered through the input-channel permutation
LOAD_X_PERM = '''\
        kp = tl.load(perm_ptr + rk, mask=k_mask, other=0)
        x = tl.load(x_ptr + ${x_offset}, mask=xw_mask, other=0)'''

LOAD_W_INT8 = '''\
        w = tl.load(w_ptr + ${w_offset}, mask=wk_mask, other=0)'''

LOAD_W_INT4 = '''\
        byte = tl.load(w_ptr + ${w_offset}, mask=wk_mask, other=0)
        q = (byte >> (((rn[None, :] // 32) % 2) * 4).to(tl.uint8)) & 15
        g = k0 // GROUP
        s = tl.load(sz_ptr + (g * stride_sz_g + rn * 2), mask=n_mask, other=0.0).to(tl.float32)
        z = tl.load(sz_ptr + (g * stride_sz_g + rn * 2 + 1), mask=n_mask, other=0.0).to(tl.float32)
        w = (q.to(tl.float32) - 8.0) * s[None, :] + z[None, :]'''

LOAD_W_BFP = '''\
        m = tl.load(w_ptr + ${w_offset}, mask=wk_mask, other=0)
        e = tl.load(e_ptr + ${e_offset}, mask=wk_mask, other=0)
        p2 = ((e.to(tl.int32) + 127) << 23).to(tl.float32, bitcast=True)
        w = m.to(tl.float32) * p2'''

# float formats: fp32 dot (ieee) or a dot in the activation dtype
DOT_FLOAT = '''\
        if DOT_FP32:
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))'''

DOT_INT8 = '''\
        acc += tl.dot(x, w)'''

EPILOGUE_SCALE = '''\
    y = acc * tl.load(s_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]'''

EPILOGUE_NONE = '''\
    y = acc'''

EPILOGUE_W8A8 = '''\
    sx = tl.load(sx_ptr + rm, mask=m_mask, other=0.0)
    s = tl.load(s_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
    y = acc.to(tl.float32) * sx[:, None] * s[None, :]'''
