"""Flash-decoding: a few query tokens against a long K/V, split across programs, merged by LSE.

With one query token per sequence the FlashAttention-2 grid has only ``batch * heads``
programs, too few to fill a GPU, and each streams the whole cache alone. Flash-decoding
(Dao, Haziza, Massa, Sizov 2023) splits the keys into ``n_splits`` contiguous chunks: the
``split`` kernel computes, per chunk, the attention output normalized within the chunk and
that chunk's log-sum-exp; the ``merge`` kernel combines the chunks exactly,

    lse = log(sum_s exp(lse_s)),   out = sum_s exp(lse_s - lse) * out_s.

The split kernel's grid is ``(batch * n_kv_heads, n_splits)``. Its ``BLOCK_M`` rows are the
``kv_group`` query heads that share one K/V head times the ``t_q`` query positions, so each
K/V block is read once for the whole GQA group (and a repeated K/V never exists).
``seq_lens`` (optional, (batch,) int32) bounds the keys each sequence reads: the valid prefix
of a static KV cache, so the unused tail of the cache is never loaded. The optional mask is
the same bool/additive mask as the prefill kernel's, broadcast through its strides.

Partial results are fp32: ``part_out`` (B, H, t_q, n_splits, head_dim) and ``part_lse``
(B, H, t_q, n_splits). A chunk with no visible key stores out = 0 and lse = -inf, which the
merge weights by exp(-inf) = 0. The key loop is ``attention.LOOP``, FlashAttention-2's; precision
and masking as there.
"""

KERNEL = '''\
${header}
import triton
import triton.language as tl


@triton.jit
def ${split_entry}(
    # pointers
    ${pointers},
    # dimensions
    n_kv_heads, kv_group, t_q, t_k, head_dim, split_len,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    ${mask_strides}
    # scalars
    qk_scale,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per (batch * K/V head, split of the keys).
    pid_bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    b = pid_bh // n_kv_heads
    h_kv = pid_bh % n_kv_heads
    r = tl.arange(0, BLOCK_M)
    row_ok = r < kv_group * t_q
    h = h_kv * kv_group + r // t_q  # the query heads of this K/V head's group ...
    rows = r % t_q                   # ... times the query positions
    cols0 = tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
${kv_len}
    lo = split * split_len
    hi = tl.minimum(lo + split_len, kv_len)
    q = tl.load(q_ptr + b * stride_qb + h[:, None] * stride_qh + rows[:, None] * stride_qt
                + d[None, :] * stride_qd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)${cast}
    k_base = k_ptr + b * stride_kb + h_kv * stride_kh
    v_base = v_ptr + b * stride_vb + h_kv * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
${loop}
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # an empty chunk: 0, weighted 0 below
    lse = tl.where(l_i == 0.0, float("-inf"), m_i * 0.6931471805599453 + tl.log(l_i))
    row = ((b * n_kv_heads * kv_group + h) * t_q + rows) * n_splits + split
    tl.store(part_out_ptr + row[:, None] * head_dim + d[None, :], out,
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(part_lse_ptr + row, lse, mask=row_ok)


@triton.jit
def ${merge_entry}(
    # pointers
    part_out_ptr, part_lse_ptr, out_ptr, lse_ptr,
    # dimensions
    n_heads, t_q, n_splits, head_dim,
    stride_ob, stride_oh, stride_ot, stride_od,
    # meta-parameters
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per output row (batch, head, query position).
    row = tl.program_id(0).to(tl.int64)
    t = row % t_q
    b = row // t_q // n_heads
    h = row // t_q % n_heads
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_ok = s < n_splits
    d_ok = d < head_dim
    lse_s = tl.load(part_lse_ptr + row * n_splits + s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse_s, 0)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse_s - m_use)
    total = tl.sum(w, 0)
    part = tl.load(part_out_ptr + (row * n_splits + s[:, None]) * head_dim + d[None, :],
                   mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    out = tl.sum(w[:, None] * part, 0) / total
    tl.store(out_ptr + b * stride_ob + h * stride_oh + t * stride_ot + d * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=d_ok)
    tl.store(lse_ptr + row, m_use + tl.log(total))
'''

KV_LEN = '''\
    kv_len = t_k'''

# The valid prefix of a static KV cache: keys at or past seq_lens[b] are never read.
KV_LEN_SEQ_LENS = '''\
    kv_len = tl.minimum(tl.load(seq_lens_ptr + b), t_k)'''

# Rows of one program belong to several query heads: the head term is per row.
MASK_OFFSET = ('b * stride_mb + h[:, None] * stride_mh + rows[:, None] * stride_mq'
               ' + cols[None, :] * stride_mk')
