"""FlashAttention-2 forward kernel: exact attention in one pass over K/V with an online softmax.

Work partitioning (FlashAttention-2, Dao 2023, §3.2): the grid is ``(cdiv(t_q, BLOCK_M),
batch * n_heads)``; one program owns ``BLOCK_M`` query rows of one head and streams the keys
and values past them in ``BLOCK_N`` blocks, so the (t_q, t_k) score matrix never exists in
memory (FlashAttention, Dao et al. 2022: linear memory, IO-aware tiling). Per row it keeps the
running maximum ``m_i``, the running sum ``l_i`` of ``exp2(s - m_i)`` and the unnormalized
output ``acc``; each new block rescales them by ``alpha = exp2(m_old - m_new)``, and the output
is divided by ``l_i`` once at the end (FA2's deferred normalization). Scores are kept in log2
units (``qk_scale = scale * log2(e)``) so that ``exp2`` replaces ``exp``.

* causal (top-left aligned, SDPA's ``is_causal``): row ``i`` sees keys ``j <= i``, so the key
  loop of a query block stops at ``(pid_m + 1) * BLOCK_M``: blocks above the diagonal are
  skipped, not computed and masked (``${kv_range}``).
* GQA: query head ``h`` reads K/V head ``h // kv_group`` through the K/V strides; a repeated
  K/V tensor is never materialized.
* masked tails: rows past ``t_q``, keys past ``t_k`` and lanes past ``head_dim`` (``BLOCK_D``
  is the next power of two) are masked on every load and store, so any T and any head dim
  up to ``BLOCK_D`` work.
* attention mask (``${mask}``): none, bool (True = attend; loaded through broadcast strides,
  0 for a broadcast dim) or additive float (added in log2 units).
* precision: inputs are loaded in their dtype and accumulated in fp32. ``${cast}`` is
  ``.to(tl.float32)`` when the dot must run in fp32 (fp32 inputs, and bf16 under
  ``TRITON_INTERPRET=1``, whose ``tl.dot`` multiplies bf16 bit patterns as integers);
  otherwise the dots run on bf16/fp16 tensor cores and ``p`` is rounded to V's dtype first.
* outputs: ``out`` (any strides, optc allocates it (B, T, H, D)-major like ATen's flash
  kernels) and the natural-log log-sum-exp ``lse`` of each row's scaled, masked scores,
  (B, H, t_q) fp32 — what a backward pass or a split-K merge needs.
A row with no visible key (every key masked) gives 0 and lse = -inf, as ATen's CPU flash kernel
does (eager softmax gives NaN there).
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
    n_heads, kv_group, t_q, t_k, head_dim,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    ${mask_strides}
    # scalars
    qk_scale,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per (query block, batch * head).
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    h_kv = h // kv_group  # GQA: the K/V head this query head reads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols0 = tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    row_ok = rows < t_q
    d_ok = d < head_dim
    q_base = q_ptr + b * stride_qb + h * stride_qh
    k_base = k_ptr + b * stride_kb + h_kv * stride_kh
    v_base = v_ptr + b * stride_vb + h_kv * stride_vh
    q = tl.load(q_base + rows[:, None] * stride_qt + d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)${cast}
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
${kv_range}
${loop}
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # no visible key: 0, as ATen's flash
    o_base = out_ptr + b * stride_ob + h * stride_oh
    tl.store(o_base + rows[:, None] * stride_ot + d[None, :] * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    # natural log (m_i is in log2 units); -inf for a row with no visible key
    lse = tl.where(l_i == 0.0, float("-inf"), m_i * 0.6931471805599453 + tl.log(l_i))
    tl.store(lse_ptr + pid_bh * t_q + rows, lse, mask=row_ok)
'''

KV_RANGE = '''\
    lo, hi = 0, t_k'''

# Causal block skipping: keys past this query block's last row are never visible.
KV_RANGE_CAUSAL = '''\
    lo, hi = 0, tl.minimum(t_k, (pid_m + 1) * BLOCK_M)'''

# The FlashAttention-2 inner loop over keys [lo, hi), shared with attention_decode: one block
# of scores, masked, then the online-softmax update of (m_i, l_i, acc).
LOOP = '''\
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + cols0
        col_ok = cols < hi
        kt = tl.load(k_base + cols[None, :] * stride_kt + d[:, None] * stride_kd,
                     mask=d_ok[:, None] & col_ok[None, :], other=0.0)${cast}
        s = tl.dot(q, kt${dot_args}) * qk_scale  # (BLOCK_M, BLOCK_N) scores, log2 units
        keep = row_ok[:, None] & col_ok[None, :]
${mask}
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no visible key yet: stay finite
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * stride_vt + d[None, :] * stride_vd,
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)${cast}
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v${dot_args})
        m_i = m_new'''

CAUSAL = '''\
        keep = keep & (cols[None, :] <= rows[:, None])'''

MASK_OFFSET = ('b * stride_mb + h * stride_mh + rows[:, None] * stride_mq'
               ' + cols[None, :] * stride_mk')

MASK_BOOL = '''\
        keep = keep & (tl.load(mask_ptr + ${offset}, mask=keep, other=0) != 0)'''

MASK_ADD = '''\
        s = s + tl.load(mask_ptr + ${offset}, mask=keep, other=0.0).to(tl.float32) * 1.4426950408889634'''
