"""Row-wise normalization kernels, optionally fused with the residual add before them.

One program normalizes one row of ``n_cols`` elements held in a single block of
``BLOCK_C >= n_cols`` lanes (the row widths of transformer hidden states, up to ~16k, fit one
block). Lanes past ``n_cols`` are masked on every load and store; ``other=0.0`` keeps them out
of the sums, and the layer-norm centering zeroes them again before the variance.

Arithmetic is fp32 throughout; values are rounded to a storage dtype exactly where eager
PyTorch rounds them (``h``, HF's normalized row, the output). A product of two bf16/fp16
values is exact in fp32, so "multiply in fp32, round once" equals eager's half-precision
multiply. (It also keeps the kernels correct under ``TRITON_INTERPRET=1``, which does
arithmetic on bf16 values as raw uint16 bit patterns.)

Filled by ``optc.ops.norms``: ``${load}`` is ``LOAD`` or ``LOAD_ADD``; ``${normalize}`` is
``RMS`` or ``LAYER`` followed by the optional ``WEIGHT`` / ``BIAS`` lines.
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
    # scalars
    ${scalars},
    # meta-parameters
    BLOCK_C: tl.constexpr,
):
    # One program per row; BLOCK_C >= n_cols lanes, lanes past n_cols are masked.
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < n_cols
${load}
    hf = h.to(tl.float32)
${normalize}
    tl.store(y_ptr + ${y_offset}, y.to(y_ptr.dtype.element_ty), mask=mask)
'''

LOAD = '''\
    h = tl.load(x_ptr + ${x_offset}, mask=mask, other=0.0)'''

# h is rounded to its storage dtype before it is normalized, as in eager `x + residual`.
LOAD_ADD = '''\
    x = tl.load(x_ptr + ${x_offset}, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(res_ptr + ${res_offset}, mask=mask, other=0.0).to(tl.float32)
    h = (x + r).to(h_ptr.dtype.element_ty)
    tl.store(h_ptr + ${h_offset}, h, mask=mask)'''

# HF LlamaRMSNorm numerics: mean of squares in fp32, the normalized row rounded back to the
# input dtype, then `weight * that` in the promoted dtype.
RMS = '''\
    inv = tl.rsqrt(tl.sum(hf * hf, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + ${w_offset}, mask=mask, other=0.0).to(tl.float32)
    y = w * (hf * inv).to(h.dtype).to(tl.float32)'''

# torch layer_norm numerics: statistics and the affine transform in fp32, one final rounding.
LAYER = '''\
    mean = tl.sum(hf, axis=0) / n_cols
    d = tl.where(mask, hf - mean, 0.0)
    y = d * tl.rsqrt(tl.sum(d * d, axis=0) / n_cols + eps)'''

WEIGHT = '''\
    y = y * tl.load(w_ptr + ${w_offset}, mask=mask, other=0.0).to(tl.float32)'''

BIAS = '''\
    y = y + tl.load(b_ptr + ${b_offset}, mask=mask, other=0.0).to(tl.float32)'''
