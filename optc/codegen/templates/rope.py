"""Rotate-half rotary position embedding (RoPE), one program per (batch, head, position) row.

``out = x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = cat(-x[D/2:], x[:D/2])``: each
program loads both halves of its row of x (``BLOCK_H >= D/2`` lanes, masked past D/2) and the
matching halves of the cos/sin rows (broadcast dimensions have stride 0), and writes both
halves of the output. Arithmetic in fp32, rounded to the storage dtype after each product and
after the sum, exactly where eager rounds (a product of two bf16/fp16 values is exact in fp32).

The row index is split into (b, h, t) with the sizes ``n_heads`` and ``n_pos``; every operand
has its own three strides (elements), its last dimension is contiguous.
"""

KERNEL = '''\
${header}
import triton
import triton.language as tl


@triton.jit
def ${entry}(
    # pointers
    x_ptr, cos_ptr, sin_ptr, out_ptr,
    # dimensions
    n_heads, n_pos, half,
    sx_b, sx_h, sx_t, sc_b, sc_h, sc_t, ss_b, ss_h, ss_t, so_b, so_h, so_t,
    # meta-parameters
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // (n_heads * n_pos)
    h = (row // n_pos) % n_heads
    t = row % n_pos
    cols = tl.arange(0, BLOCK_H)
    mask = cols < half
    xr = x_ptr + b * sx_b + h * sx_h + t * sx_t
    cr = cos_ptr + b * sc_b + h * sc_h + t * sc_t
    sr = sin_ptr + b * ss_b + h * ss_h + t * ss_t
    orow = out_ptr + b * so_b + h * so_h + t * so_t
    dt = out_ptr.dtype.element_ty
    x1 = tl.load(xr + cols, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(xr + half + cols, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(cr + cols, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(cr + half + cols, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(sr + cols, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(sr + half + cols, mask=mask, other=0.0).to(tl.float32)
    o1 = (x1 * c1).to(dt).to(tl.float32) + ((0.0 - x2) * s1).to(dt).to(tl.float32)
    o2 = (x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)
    tl.store(orow + cols, o1.to(dt), mask=mask)
    tl.store(orow + half + cols, o2.to(dt), mask=mask)
'''
