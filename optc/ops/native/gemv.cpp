// optc native CPU kernels: weight-only quantized matmuls: GEMVs for decode, AMX GEMMs and an
// AVX512-BF16 panel GEMM (for CPUs without AMX) for prefill.
//
// The kernels read optc's packed formats in place (optc/quant/formats.py, the layouts ATen's
// _weight_int8pack_mm / _weight_int4pack_mm_for_cpu read), take bf16 activations x (M, K) and
// write y (M, N) in bf16 or fp32, accumulating in fp32. Decode reads every weight byte once per
// token, so these are streaming loops written to keep up with DRAM on two cores; the output
// channels are split over torch's OpenMP pool (at::parallel_for), each thread streaming a
// contiguous range of the weight.
//
// int8 (N, K) int8 per output channel, scales (N,) bf16:
//     y[m, n] = s[n] * sum_k x[m, k] * w[n, k]
//   One channel at a time (one sequential stream per thread); 16 weights -> vpmovsxbd ->
//   vcvtdq2ps -> FMA with x in fp32 (exact products of int8 and bf16 values, fp32 sums).
//
// int4 tile-64 (Np/64, K, 32) uint8: byte j of (block b, k) holds channel 64b + j (low nibble) and
//   64b + j + 32 (high nibble), u in [0, 15]; scales_zeros (K/G, Np, 2) bf16 (s, z) per group g:
//     w[n, k] = (u - 8) * s + z
//   Per pair of rows k, k+1 the nibbles become bf16 pairs with one OR: bf16 bits 0x4300 | u are
//   exactly the value 128 + u, so vdpbf16ps (AVX512-BF16) multiplies them with the (x[k], x[k+1])
//   pair and sums in fp32: acc = sum_k x (128 + u). Per group and channel
//     sum_k x w = s * acc + (z - 136 s) * X_g,    X_g = sum over the group of x
//   (sum x (u - 8) s = s (acc - 128 X_g) - 8 s X_g). The products are exact; the fp32 sums carry
//   the 128 X_g offset, a relative error ~1e-5 of the result, far below the bf16 output rounding
//   (2^-9) and the int4 quantization error (tests compare against the dequantized reference).
//   The same pairs are AMX's B-tile layout: int4_gemm_amx feeds them to tdpbf16ps for M >= 2.
//
// Software prefetch kPrefetchBytes ahead of each weight stream: measured on 30 distinct
// 2048x5632 weights (2 threads), the int4 GEMV read 8.8 GB/s with none, 18.8 at 2 KiB ahead and
// 21-22 at 4-8 KiB; the int8 GEMV 12.9 with none and 21-25 at 2-4 KiB ahead. Hint T1, or
// distances of 16 KiB, were slower.
#include <ATen/Parallel.h>

#include "bf16.h"
#include "vmath.h"

#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define OPTC_HAVE_INT8 1
#if defined(__AVX512BF16__)
#define OPTC_HAVE_INT4 1
#endif
#endif

namespace {

using optc_native::bf16_to_f32;
using optc_native::f32_to_bf16_rne;

inline void store(void* y, bool out_bf16, int64_t i, float v) {
    if (out_bf16) static_cast<uint16_t*>(y)[i] = f32_to_bf16_rne(v);
    else static_cast<float*>(y)[i] = v;
}

#ifndef OPTC_PF
#define OPTC_PF 8192
#endif
#ifndef OPTC_PF8
#define OPTC_PF8 4096
#endif
#ifndef OPTC_PFH
#define OPTC_PFH _MM_HINT_T0
#endif
constexpr int64_t kPrefetchBytes = OPTC_PF, kPrefetchBytes8 = OPTC_PF8;
#define kPrefetchHint OPTC_PFH
constexpr int kMaxRows = 4;   // rows of x per pass over a weight block (accumulators in registers)

#ifdef OPTC_HAVE_INT8
// y[m, n0:n1] for m < rows; xf (rows, K) fp32; K % 16 == 0.
template <int rows>
void int8_channels(const int8_t* w, const uint16_t* scales, const float* xf, void* y,
                   bool out_bf16, int64_t k, int64_t ldy, int64_t n0, int64_t n1) {
    // One output channel at a time: each thread reads its rows as one sequential stream (what
    // the prefetchers follow best), four accumulators per row of x hide the FMA latency.
    for (int64_t n = n0; n < n1; ++n) {
        const int8_t* r = w + n * k;
        __m512 acc[rows][4];
        for (int m = 0; m < rows; ++m)
            for (int u = 0; u < 4; ++u) acc[m][u] = _mm512_setzero_ps();
        int64_t kk = 0;
        for (; kk + 64 <= k; kk += 64) {
            _mm_prefetch(reinterpret_cast<const char*>(r + kk + kPrefetchBytes8), kPrefetchHint);
            for (int u = 0; u < 4; ++u) {
                __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                    _mm_loadu_si128(reinterpret_cast<const __m128i*>(r + kk + 16 * u))));
                for (int m = 0; m < rows; ++m)
                    acc[m][u] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xf + m * k + kk + 16 * u),
                                                acc[m][u]);
            }
        }
        for (int u = 0; kk < k; kk += 16, ++u) {        // K % 64 tail (K % 16 == 0)
            __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                _mm_loadu_si128(reinterpret_cast<const __m128i*>(r + kk))));
            for (int m = 0; m < rows; ++m)
                acc[m][u] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xf + m * k + kk), acc[m][u]);
        }
        const float s = bf16_to_f32(scales[n]);
        for (int m = 0; m < rows; ++m) {
            __m512 t = _mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]),
                                     _mm512_add_ps(acc[m][2], acc[m][3]));
            store(y, out_bf16, m * ldy + n, _mm512_reduce_add_ps(t) * s);
        }
    }
}
#endif

#ifdef OPTC_HAVE_INT4
// The bf16 pairs (128 + u[k, c], 128 + u[k + 1, c]) of one 64-channel block at rows k, k + 1 (the 64
// bytes at r0): v[0] channels 0-15, v[1] 16-31, v[2] 32-47, v[3] 48-63. One vpermb per 16 channels
// puts byte c of row k and of row k + 1 in the low bytes of one dword's two words.
inline void decode_pair(const uint8_t* r0, const __m512i idx[2], __m512i nib, __m512i one28,
                        __m512i v[4]) {
    const __m512i both = _mm512_loadu_si512(r0);
    for (int h = 0; h < 2; ++h) {
        __m512i pair = _mm512_permutexvar_epi8(idx[h], both);
        v[h] = _mm512_ternarylogic_epi32(pair, nib, one28, 0xEA);            // (pair & nib) | one28
        v[2 + h] = _mm512_ternarylogic_epi32(_mm512_srli_epi32(pair, 4), nib, one28, 0xEA);
    }
}

// vpermb indices for decode_pair: output byte p of half h <- source byte 32 ((p / 2) % 2) + 16 h
// + p / 4 (the high byte of each word is a don't-care, cleared by the nibble mask)
inline void pair_indices(__m512i idx[2]) {
    for (int h = 0; h < 2; ++h) {
        alignas(64) uint8_t ix[64];
        for (int p = 0; p < 64; ++p) ix[p] = static_cast<uint8_t>(32 * ((p / 2) % 2) + 16 * h + p / 4);
        idx[h] = _mm512_load_si512(ix);
    }
}

// The constants both int4 kernels decode with, and the per-group scale terms they apply.
struct Int4Decode {
    __m512i idx[2];
    const __m512i nib = _mm512_set1_epi32(0x000F000F);
    const __m512i one28 = _mm512_set1_epi32(0x43004300);   // bf16 128.0 in both halves
    const __m512i hi_mask = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
    const __m512 c136 = _mm512_set1_ps(136.0f);

    Int4Decode() { pair_indices(idx); }
    void pairs(const uint8_t* r0, __m512i v[4]) const { decode_pair(r0, idx, nib, one28, v); }
    // s and z - 136 s of the 16 channels 16c .. 16c + 15 of one block's group (szg: its pairs)
    void scales(const uint16_t* szg, int c, __m512& s, __m512& t) const {
        __m512i p = _mm512_loadu_si512(szg + 32 * c);
        s = _mm512_castsi512_ps(_mm512_slli_epi32(p, 16));
        t = _mm512_fnmadd_ps(c136, s, _mm512_castsi512_ps(_mm512_and_si512(p, hi_mask)));
    }
};

// sum of one group of x (bf16) in fp32: the X_g of the int4 kernels' offset terms
inline float group_sum(const uint16_t* xr, int64_t group) {
    __m512 acc = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= group; i += 16)
        acc = _mm512_add_ps(acc, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + i))), 16)));
    float s = _mm512_reduce_add_ps(acc);
    for (; i < group; ++i) s += bf16_to_f32(xr[i]);
    return s;
}

// Blocks [b0, b1) of 64 channels, rows [0, rows) of x (bf16, row stride k); xg (rows, K/G) the
// group sums of x. Channels >= n (the tile padding) are not written.
template <int rows>
void int4_blocks(const uint8_t* w, const uint16_t* sz, const uint16_t* x, const float* xg, void* y,
                 bool out_bf16, int64_t k, int64_t np, int64_t n, int64_t group, int64_t ldy,
                 int64_t b0, int64_t b1) {
    const Int4Decode dec;
    const int64_t ngroups = k / group;
    for (int64_t b = b0; b < b1; ++b) {
        const uint8_t* wb = w + b * k * 32;
        __m512 out[rows][4];
        for (int m = 0; m < rows; ++m)
            for (int c = 0; c < 4; ++c) out[m][c] = _mm512_setzero_ps();
        for (int64_t g = 0; g < ngroups; ++g) {
            __m512 acc[rows][4];
            for (int m = 0; m < rows; ++m)
                for (int c = 0; c < 4; ++c) acc[m][c] = _mm512_setzero_ps();
            const int64_t k_end = (g + 1) * group;
            for (int64_t kk = g * group; kk < k_end; kk += 2) {
                const uint8_t* r0 = wb + kk * 32;
                _mm_prefetch(reinterpret_cast<const char*>(r0 + kPrefetchBytes), kPrefetchHint);
                __m512i v[4];
                dec.pairs(r0, v);
                for (int m = 0; m < rows; ++m) {
                    int32_t xp;
                    std::memcpy(&xp, x + m * k + kk, 4);
                    __m512bh xv = (__m512bh)_mm512_set1_epi32(xp);
                    for (int c = 0; c < 4; ++c)
                        acc[m][c] = _mm512_dpbf16_ps(acc[m][c], (__m512bh)v[c], xv);
                }
            }
            const uint16_t* szg = sz + (g * np + b * 64) * 2;
            for (int c = 0; c < 4; ++c) {
                __m512 s, t;                                      // s, z - 136 s
                dec.scales(szg, c, s, t);
                for (int m = 0; m < rows; ++m) {
                    __m512 xs = _mm512_set1_ps(xg[m * ngroups + g]);
                    out[m][c] = _mm512_fmadd_ps(s, acc[m][c], _mm512_fmadd_ps(t, xs, out[m][c]));
                }
            }
        }
        for (int m = 0; m < rows; ++m)
            for (int c = 0; c < 4; ++c) {
                alignas(64) float tmp[16];
                _mm512_store_ps(tmp, out[m][c]);
                const int64_t base = b * 64 + c * 16;
                for (int i = 0; i < 16 && base + i < n; ++i)
                    store(y, out_bf16, m * ldy + base + i, tmp[i]);
            }
    }
}
#endif

// A per-thread buffer that only grows (64-byte aligned): a fresh multi-MB allocation per call is
// mmap'd and page-faulted again each time (~10 ms for the 23 MB packed x of a 2048 x 5632 call).
// Each calling thread has its own, so concurrent calls from several Python threads do not share.
// Slots: 0 the caller's packed x (AMX GEMMs), 1-2 int8_gemm_amx's and 3-4 panel_gemm's per-worker
// buffers (the caller is also OpenMP thread 0, so the two sets must differ).
inline void* scratch(int slot, size_t bytes) {
    struct Buf { void* p = nullptr; size_t n = 0; ~Buf() { std::free(p); } };
    thread_local Buf bufs[5];
    Buf& b = bufs[slot];
    if (b.n < bytes) {
        std::free(b.p);
        b.n = (bytes + 63) / 64 * 64;
        b.p = std::aligned_alloc(64, b.n);
        if (b.p == nullptr) b.n = 0;
    }
    return b.p;
}

#ifdef OPTC_HAVE_INT4
// Prefill without AMX (panel_gemm): a bf16 GEMM on AVX512-BF16 whose B operand is the quantized
// weight decoded panel by panel. Each panel (64 channels x kPanelK k in bf16 pairs (w[k, c],
// w[k + 1, c]) per channel: 32 KiB, in L1) is decoded once per call and used by all M rows,
// kPanelRows at a time with 4 x kPanelRows fp32 accumulators in registers (one vdpbf16ps per 16
// channels per row per pair of k, x's pair broadcast). The fp32 sums of one 64-channel block
// live in a per-thread (M, 64) buffer between panels. The decoded values are those the dequant
// path hands oneDNN (int4: bf16_rne((u - 8) s + z), one fp32 rounding then RNE, as
// int4_tile64_to_bf16_t; int8: q itself, exact, the scale applied to the fp32 sum), without
// writing and re-reading a bf16 weight. Measured in the module docstring of optc/ops/quant.py.
constexpr int64_t kPanelK = 256;
constexpr int kPanelRows = 6;

// int4 tile-64 block wb (its (K, 32) bytes), scales_zeros of its channels szb (row stride np
// pairs), k in [k0, k0 + kc): out (kc / 2, 64, 2) bf16.
void decode_panel_int4(const Int4Decode& dec, __m512i inter, const uint8_t* wb,
                       const uint16_t* szb, int64_t np, int64_t group, int64_t k0, int64_t kc,
                       uint16_t* out) {
    __m512 s[4], z[4];
    for (int64_t kk = k0; kk < k0 + kc; kk += 2) {
        if (kk == k0 || kk % group == 0) {
            const uint16_t* szg = szb + (kk / group) * np * 2;
            for (int c = 0; c < 4; ++c) {
                __m512i p = _mm512_loadu_si512(szg + 32 * c);
                s[c] = _mm512_castsi512_ps(_mm512_slli_epi32(p, 16));
                z[c] = _mm512_castsi512_ps(_mm512_and_si512(p, dec.hi_mask));
            }
        }
        __m512i v[4];
        dec.pairs(wb + kk * 32, v);
        uint16_t* o = out + (kk - k0) * 64;
        for (int c = 0; c < 4; ++c) {     // 128 + u -> u - 8 (exact) -> (u - 8) s + z
            __m512 lo = _mm512_sub_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v[c], 16)), dec.c136);
            __m512 hi = _mm512_sub_ps(_mm512_castsi512_ps(_mm512_and_si512(v[c], dec.hi_mask)),
                                      dec.c136);
            lo = _mm512_fmadd_ps(lo, s[c], z[c]);
            hi = _mm512_fmadd_ps(hi, s[c], z[c]);
            __m512i words = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);   // lo 0-15, then hi 0-15
            _mm512_store_si512(o + 32 * c, _mm512_permutexvar_epi16(inter, words));
        }
    }
}

// Lane c of the (q[4d], .., q[4d + 3]) dwords of 16 channels -> the two bf16 pair rows of k = 4d
// and 4d + 2 (exact integers) at o and o + 128.
inline void int8_quads_to_pairs(__m512i d, __m512i inter, uint16_t* o) {
    __m512 q[4];
    for (int j = 0; j < 4; ++j)
        q[j] = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(d, 24 - 8 * j), 24));
    _mm512_store_si512(o, _mm512_permutexvar_epi16(inter, (__m512i)_mm512_cvtne2ps_pbh(q[1], q[0])));
    _mm512_store_si512(o + 128,
                       _mm512_permutexvar_epi16(inter, (__m512i)_mm512_cvtne2ps_pbh(q[3], q[2])));
}

// r[i] <- column i of the 16 x 16 matrix of 32-bit elements whose rows are r (4 unpack/shuffle
// stages, 64 instructions for 256 elements). The int8 panel decode transposes with it instead of
// 16 dword gathers: the whole int8 GEMM at M=128, 2048 -> 5632 took 4.30 ms with the transpose
// and 5.46 ms with gathers (dense bf16 4.15-4.17 ms).
inline void transpose16(__m512i r[16]) {
    __m512i t[16], u[16];
    for (int i = 0; i < 8; ++i) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int g = 0; g < 4; ++g) {       // u[4 g + c], lane L: rows 4g .. 4g + 3 of column 4 L + c
        u[4 * g] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
        u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
        u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
        u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
    }
    for (int c = 0; c < 4; ++c) {
        const __m512i v0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x88);     // lanes 0, 2
        const __m512i w0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xDD);     // lanes 1, 3
        const __m512i v1 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x88);
        const __m512i w1 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xDD);
        r[c] = _mm512_shuffle_i32x4(v0, v1, 0x88);
        r[8 + c] = _mm512_shuffle_i32x4(v0, v1, 0xDD);
        r[4 + c] = _mm512_shuffle_i32x4(w0, w1, 0x88);
        r[12 + c] = _mm512_shuffle_i32x4(w0, w1, 0xDD);
    }
}

// int8 (N, K) rows c0 .. c0 + 63 (rows >= n repeat row n - 1: computed, never stored), k in
// [k0, k0 + kc) (kc % 4 == 0): out (kc / 2, 64, 2) bf16, the exact integers q.
void decode_panel_int8(__m512i inter, const int8_t* w, int64_t k, int64_t n, int64_t c0,
                       int64_t k0, int64_t kc, uint16_t* out) {
    for (int c = 0; c < 4; ++c) {
        const int8_t* rows[16];
        alignas(64) int32_t ix[16];
        for (int l = 0; l < 16; ++l) {
            const int64_t ch = c0 + 16 * c + l < n ? c0 + 16 * c + l : n - 1;
            rows[l] = w + ch * k;
            ix[l] = static_cast<int32_t>(ch * (k / 4));
        }
        int64_t kk = k0;
        for (; kk + 64 <= k0 + kc; kk += 64) {
            __m512i r[16];
            for (int l = 0; l < 16; ++l) r[l] = _mm512_loadu_si512(rows[l] + kk);
            transpose16(r);                 // r[j] lane l: q[channel l][kk + 4 j .. + 3]
            for (int j = 0; j < 16; ++j)
                int8_quads_to_pairs(r[j], inter, out + (kk + 4 * j - k0) * 64 + 32 * c);
        }
        const __m512i idx = _mm512_load_si512(ix);
        for (; kk < k0 + kc; kk += 4)    // q[k .. k + 3] per lane
            int8_quads_to_pairs(_mm512_i32gather_epi32(idx, w + kk, 4), inter,
                                out + (kk - k0) * 64 + 32 * c);
    }
}

// acc (R rows x 64 channels, row stride 64 floats) (+)= x rows (stride k, from k0) @ panel
template <int R>
void panel_rows(const uint16_t* panel, const uint16_t* x, int64_t k, int64_t kc, float* acc_mem,
                bool first) {
    __m512 acc[R][4];
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < 4; ++c)
            acc[r][c] = first ? _mm512_setzero_ps() : _mm512_load_ps(acc_mem + r * 64 + 16 * c);
    for (int64_t p = 0; p < kc / 2; ++p) {
        const uint16_t* b = panel + p * 128;
        __m512bh bv[4];
        for (int c = 0; c < 4; ++c) bv[c] = (__m512bh)_mm512_load_si512(b + 32 * c);
        for (int r = 0; r < R; ++r) {
            int32_t xp;
            std::memcpy(&xp, x + r * k + 2 * p, 4);
            const __m512bh xv = (__m512bh)_mm512_set1_epi32(xp);
            for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], bv[c], xv);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < 4; ++c) _mm512_store_ps(acc_mem + r * 64 + 16 * c, acc[r][c]);
}

void panel_all_rows(const uint16_t* panel, const uint16_t* x, int64_t m, int64_t k, int64_t kc,
                    float* acc, bool first) {
    int64_t r = 0;
    for (; r + kPanelRows <= m; r += kPanelRows)
        panel_rows<kPanelRows>(panel, x + r * k, k, kc, acc + r * 64, first);
    switch (m - r) {
        case 0: break;
        case 1: panel_rows<1>(panel, x + r * k, k, kc, acc + r * 64, first); break;
        case 2: panel_rows<2>(panel, x + r * k, k, kc, acc + r * 64, first); break;
        case 3: panel_rows<3>(panel, x + r * k, k, kc, acc + r * 64, first); break;
        case 4: panel_rows<4>(panel, x + r * k, k, kc, acc + r * 64, first); break;
        default: panel_rows<5>(panel, x + r * k, k, kc, acc + r * 64, first); break;
    }
}

// y[row0 : row0 + m, c0 : c0 + 64) (channels < n) <- acc (m, 64), times scales (64 bf16 at c0)
// when given
void panel_store(const float* acc, const uint16_t* scales, void* y, bool out_bf16, int64_t m,
                 int64_t n, int64_t ldy, int64_t row0, int64_t c0) {
    const int64_t cols = n - c0 < 64 ? n - c0 : 64;
    alignas(64) float s[64];
    for (int i = 0; i < 64; ++i) s[i] = scales != nullptr && i < cols ? bf16_to_f32(scales[c0 + i]) : 1.0f;
    for (int64_t r = 0; r < m; ++r) {
        const float* a = acc + r * 64;
        const int64_t o = (row0 + r) * ldy + c0;
        int64_t i = 0;
        for (; i + 16 <= cols; i += 16) {
            const __m512 v = _mm512_mul_ps(_mm512_load_ps(a + i), _mm512_load_ps(s + i));
            if (out_bf16)
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(y) + o + i),
                                    (__m256i)_mm512_cvtneps_pbh(v));
            else
                _mm512_storeu_ps(static_cast<float*>(y) + o + i, v);
        }
        for (; i < cols; ++i) store(y, out_bf16, o + i, a[i] * s[i]);
    }
}

inline __m512i pair_interleave() {   // vpermw: words (lo 0-15, hi 0-15) -> (lo0, hi0, lo1, ...)
    alignas(64) uint16_t inter[32];
    for (int i = 0; i < 16; ++i) {
        inter[2 * i] = static_cast<uint16_t>(i);
        inter[2 * i + 1] = static_cast<uint16_t>(16 + i);
    }
    return _mm512_load_si512(inter);
}

// All M rows of x against 64-channel blocks [b0, b1), in chunks of rows whose x (rows x K bf16)
// stays within kPanelXBytes: every block reads all of its chunk's x, so a chunk larger than the
// last-level cache is streamed from DRAM once per block (measured at M=2048, 5632 -> 2048:
// 23 MB of x, 0.81x dense bf16 unchunked). The cost of a chunk: each panel is decoded once more.
// kind 0: int8 (w (N, K), aux scales (N,)); kind 1: int4 tile-64 (aux scales_zeros). False when
// the thread's buffers cannot be allocated.
constexpr int64_t kPanelXBytes = 8 << 20;

bool panel_gemm(int kind, const void* w, const uint16_t* aux, const uint16_t* x, void* y,
                bool out_bf16, int64_t m, int64_t k, int64_t np, int64_t n, int64_t group,
                int64_t ldy, int64_t b0, int64_t b1) {
    int64_t mc = kPanelXBytes / (2 * k) / kPanelRows * kPanelRows;
    if (mc < kPanelRows) mc = kPanelRows;
    const int64_t chunks = (m + mc - 1) / mc;
    mc = ((m + chunks - 1) / chunks + kPanelRows - 1) / kPanelRows * kPanelRows;   // balanced
    float* acc = static_cast<float*>(scratch(3, (mc < m ? mc : m) * 64 * sizeof(float)));
    uint16_t* panel = static_cast<uint16_t*>(scratch(4, kPanelK * 64 * sizeof(uint16_t)));
    if (acc == nullptr || panel == nullptr) return false;
    const Int4Decode dec;
    const __m512i inter = pair_interleave();
    for (int64_t m0 = 0; m0 < m; m0 += mc) {
        const int64_t rows = m - m0 < mc ? m - m0 : mc;
        for (int64_t b = b0; b < b1; ++b) {
            for (int64_t k0 = 0; k0 < k; k0 += kPanelK) {
                const int64_t kc = k - k0 < kPanelK ? k - k0 : kPanelK;
                if (kind == 1)
                    decode_panel_int4(dec, inter, static_cast<const uint8_t*>(w) + b * k * 32,
                                      aux + b * 64 * 2, np, group, k0, kc, panel);
                else
                    decode_panel_int8(inter, static_cast<const int8_t*>(w), k, n, b * 64, k0, kc,
                                      panel);
                panel_all_rows(panel, x + m0 * k + k0, rows, k, kc, acc, k0 == 0);
            }
            panel_store(acc, kind == 0 ? aux : nullptr, y, out_bf16, rows, n, ldy, m0, b * 64);
        }
    }
    return true;
}
#endif

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define OPTC_HAVE_AMX 1
// AMX: the same sums, with TDPBF16PS doing the multiply-adds. Its B operand (16 rows of 16 bf16
// pairs (k, k + 1)) is exactly decode_pair's layout, so each 32 k x 16 channel tile is decoded into
// a 1 KiB buffer and loaded; A is x packed into 16-row tiles (pack_a_tiles), C one (rows x 16)
// fp32 tile per 16 channels, stored and scaled at each group end. The vector ports then only
// decode, once for up to 256 rows of x: measured (quant_kernels), the AVX512-BF16 GEMV's time grows
// with every 4 rows (it decodes again), this kernel's barely up to M=16 (1.42 vs 4.57 ms at
// 2048x5632). At M=1 the GEMV is as fast or faster (a tile op costs as much for 1 row as for 16).
struct TileConfig {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};

bool amx_permitted() {   // Linux grants AMX state per process on request (arch_prctl)
    static const bool ok = [] {
        constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
        return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
    }();
    return ok;
}

// All M rows of x against blocks [b0, b1). x comes packed as A tiles (pack_a_tiles): tile t holds
// rows r0(t) = min(16 t, M - 16) .. + 16 (the last tile overlaps the previous one; only its new rows
// are accumulated), per 32-k chunk 16 rows x 64 bytes at a 64-byte stride: A tiles read straight
// from x with its 2K-byte row stride thrash L1 (rows 4 KiB apart share a set). Tiles are taken in
// chunks of kMTiles (kept in L2 across the weight blocks). Per block, group g is decoded into one
// half of a double buffer while the tiles multiply group g - 1 from the other half.
constexpr int64_t kMTiles = 16;

inline int64_t tile_row0(int64_t t, int64_t m, int tile_rows) {
    return 16 * t + tile_rows <= m ? 16 * t : m - tile_rows;
}

void pack_a_tiles(const uint16_t* x, uint16_t* xp, int64_t m, int64_t k, int tile_rows,
                  int64_t t0, int64_t t1) {
    const int64_t kc = k / 32;
    for (int64_t t = t0; t < t1; ++t) {
        const int64_t r0 = tile_row0(t, m, tile_rows);
        for (int64_t j = 0; j < kc; ++j)
            for (int i = 0; i < tile_rows; ++i)
                std::memcpy(xp + ((t * kc + j) * tile_rows + i) * 32, x + (r0 + i) * k + 32 * j, 64);
    }
}

void int4_gemm_amx(const uint8_t* w, const uint16_t* sz, const uint16_t* xp, const float* xg,
                   void* y, bool out_bf16, int64_t k, int64_t np, int64_t n, int64_t group,
                   int64_t ldy, int64_t m, int64_t b0, int64_t b1) {
    const int tile_rows = m < 16 ? static_cast<int>(m) : 16;
    TileConfig cfg;
    for (int t = 0; t < 8; ++t) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = static_cast<uint8_t>(t <= 4 ? tile_rows : 16);   // 0-3 C, 4 A, 5-7 B
    }
    _tile_loadconfig(&cfg);
    const Int4Decode dec;
    const int64_t ngroups = k / group;
    const int chunks = static_cast<int>(group / 32);
    alignas(64) uint8_t bt[2][4][4][16 * 64];    // [buffer][32-k chunk][16 channels] B tiles
    alignas(64) float ct[4][16 * 16];            // C tiles at a group end
    const int64_t tiles = (m + 15) / 16, kc = k / 32;
    float* out = static_cast<float*>(std::aligned_alloc(64, 16 * kMTiles * 64 * sizeof(float)));
    for (int64_t tc = 0; tc < tiles; tc += kMTiles) {
        const int64_t tn = tiles - tc < kMTiles ? tiles - tc : kMTiles;
        const int64_t mc = 16 * tc;                                   // first row of this chunk
        const int64_t mrows = (m < mc + 16 * tn ? m : mc + 16 * tn) - mc;
        for (int64_t b = b0; b < b1; ++b) {
            const uint8_t* wb = w + b * k * 32;
            std::memset(out, 0, mrows * 64 * sizeof(float));
            auto decode = [&](int64_t g, int buf) {
                for (int j = 0; j < chunks; ++j)
                    for (int r = 0; r < 16; ++r) {
                        const uint8_t* r0 = wb + (g * group + 32 * j + 2 * r) * 32;
                        _mm_prefetch(reinterpret_cast<const char*>(r0 + kPrefetchBytes), kPrefetchHint);
                        __m512i v[4];
                        dec.pairs(r0, v);
                        for (int c = 0; c < 4; ++c) _mm512_store_si512(bt[buf][j][c] + 64 * r, v[c]);
                    }
            };
            auto multiply = [&](int64_t g, int buf) {
                const uint16_t* szg = sz + (g * np + b * 64) * 2;
                for (int64_t t = tc; t < tc + tn; ++t) {
                    const int64_t r0 = tile_row0(t, m, tile_rows) - mc;    // may be < 0: overlap
                    const int64_t first = 16 * t - mc;                     // first new row
                    _tile_zero(0);
                    _tile_zero(1);
                    _tile_zero(2);
                    _tile_zero(3);
                    for (int j = 0; j < chunks; ++j) {
                        _tile_loadd(4, xp + ((t * kc + g * group / 32 + j) * tile_rows) * 32, 64);
                        _tile_loadd(5, bt[buf][j][0], 64);
                        _tile_dpbf16ps(0, 4, 5);
                        _tile_loadd(6, bt[buf][j][1], 64);
                        _tile_dpbf16ps(1, 4, 6);
                        _tile_loadd(7, bt[buf][j][2], 64);
                        _tile_dpbf16ps(2, 4, 7);
                        _tile_loadd(5, bt[buf][j][3], 64);
                        _tile_dpbf16ps(3, 4, 5);
                    }
                    _tile_stored(0, ct[0], 64);
                    _tile_stored(1, ct[1], 64);
                    _tile_stored(2, ct[2], 64);
                    _tile_stored(3, ct[3], 64);
                    for (int c = 0; c < 4; ++c) {
                        __m512 s, t;
                        dec.scales(szg, c, s, t);
                        for (int64_t i = first - r0; i < tile_rows; ++i) {
                            const int64_t row = r0 + i;
                            __m512 xs = _mm512_set1_ps(xg[(mc + row) * ngroups + g]);
                            float* o = out + row * 64 + 16 * c;
                            _mm512_store_ps(o, _mm512_fmadd_ps(s, _mm512_load_ps(ct[c] + 16 * i),
                                                               _mm512_fmadd_ps(t, xs, _mm512_load_ps(o))));
                        }
                    }
                }
            };
            for (int64_t g = 0; g < ngroups; ++g) {
                decode(g, static_cast<int>(g & 1));
                if (g > 0) multiply(g - 1, static_cast<int>((g - 1) & 1));
            }
            multiply(ngroups - 1, static_cast<int>((ngroups - 1) & 1));
            for (int64_t row = 0; row < mrows; ++row)
                for (int i = 0; i < 64 && b * 64 + i < n; ++i)
                    store(y, out_bf16, (mc + row) * ldy + b * 64 + i, out[row * 64 + i]);
        }
    }
    std::free(out);
    _tile_release();
}

// int8 GEMM on AMX with the roles of the operands swapped: C^T = W x^T. The int8 weight's rows
// (channels) are A's rows as they are, 32 k per 64-byte tile row once converted to bf16 (exact:
// |q| <= 127), so no transposition of the weight; x is packed once per call as B tiles (16 k
// pairs x 16 tokens, xt_pack). C tiles hold 16 channels x 16 tokens in fp32 and accumulate over
// the whole K (symmetric per-channel scale: applied once, at the end), 2 A x 2 B -> 4 C per 32-k
// step. Per 32-channel block the weight is converted once per chunk of kMTiles token tiles (kept
// in L2) into a panel of A tiles; the output is written transposed and scaled.
// xt (tiles, K/32, 16 pairs, 16 tokens) bf16 pairs: pair (x[16 t + i][32 j + 2 p], ... + 1); tokens
// past M are zero.
void xt_pack(const uint16_t* x, uint32_t* xt, int64_t m, int64_t k, int64_t t0, int64_t t1) {
    const int64_t kc = k / 32;
    for (int64_t t = t0; t < t1; ++t)
        for (int64_t j = 0; j < kc; ++j) {
            __m512i r[16];
            for (int i = 0; i < 16; ++i)
                r[i] = 16 * t + i < m ? _mm512_loadu_si512(x + (16 * t + i) * k + 32 * j)
                                      : _mm512_setzero_si512();
            transpose16(r);
            uint32_t* dst = xt + (t * kc + j) * 256;
            for (int p = 0; p < 16; ++p) _mm512_store_si512(dst + 16 * p, r[p]);
        }
}

// Blocking of int8_gemm_amx: K in slices of kInt8KSlice (the weight panel of one 32-channel block
// and slice is 2 x 16 x 2048 bf16 = 128 KiB), tokens in chunks of kMTiles tiles (their packed x,
// 16 x 2048 bf16 per tile and slice, 1 MiB: both stay in L2 while every block of the thread's
// range passes over them). Partial sums between slices wait in a per-thread buffer.
constexpr int64_t kInt8KSlice = 2048;

// False (nothing written) when this thread's buffers could not be allocated.
bool int8_gemm_amx(const int8_t* w, const uint16_t* scales, const uint32_t* xt, void* y,
                   bool out_bf16, int64_t m, int64_t k, int64_t n, int64_t ldy, int64_t b0,
                   int64_t b1) {
    const int64_t slice = k < kInt8KSlice ? k : kInt8KSlice;
    uint16_t* panel = static_cast<uint16_t*>(scratch(1, 2 * 16 * slice * sizeof(uint16_t)));
    float* partial = static_cast<float*>(scratch(2, kMTiles * 4 * 256 * sizeof(float)));
    if (panel == nullptr || partial == nullptr) return false;
    TileConfig cfg;
    for (int t = 0; t < 8; ++t) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;                      // 0-3 C, 4-5 A (channels), 6-7 B (token tiles)
    }
    _tile_loadconfig(&cfg);
    const int64_t kc = k / 32, tiles = (m + 15) / 16;
    alignas(64) float ct[4][16 * 16];
    auto emit = [&](const float* c, int64_t ch0, int64_t tok0) {   // C tile (16 ch x 16 tok)
        const int64_t nch = n - ch0 < 16 ? n - ch0 : 16;
        if (nch <= 0) return;
        const __mmask16 mask = static_cast<__mmask16>((1u << nch) - 1);
        const __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
            _mm256_maskz_loadu_epi16(mask, scales + ch0)), 16));
        __m512i r[16];
        for (int i = 0; i < 16; ++i) r[i] = _mm512_load_si512(c + 16 * i);
        transpose16(r);                                           // r[t]: token t's 16 channels
        for (int t = 0; t < 16 && tok0 + t < m; ++t) {
            const __m512 v = _mm512_mul_ps(_mm512_castsi512_ps(r[t]), s);
            if (out_bf16)
                _mm256_mask_storeu_epi16(static_cast<uint16_t*>(y) + (tok0 + t) * ldy + ch0, mask,
                                         (__m256i)_mm512_cvtneps_pbh(v));
            else
                _mm512_mask_storeu_ps(static_cast<float*>(y) + (tok0 + t) * ldy + ch0, mask, v);
        }
    };
    for (int64_t tc = 0; tc < tiles; tc += kMTiles) {
        const int64_t tn = tiles - tc < kMTiles ? tiles - tc : kMTiles;
        for (int64_t b = b0; b < b1; ++b)
            for (int64_t k0 = 0; k0 < k; k0 += slice) {
                const int64_t sc = ((k - k0 < slice ? k - k0 : slice)) / 32;   // 32-k steps
                const bool first = k0 == 0, last = k0 + 32 * sc == k;
                for (int a = 0; a < 2; ++a)        // the panel: 2 A tiles of 16 channels per 32 k
                    for (int c = 0; c < 16; ++c) {
                        const int64_t ch = 32 * b + 16 * a + c;
                        for (int64_t j = 0; j < sc; ++j) {
                            uint16_t* dst = panel + ((a * sc + j) * 16 + c) * 32;
                            if (ch >= n) {
                                _mm512_store_si512(dst, _mm512_setzero_si512());
                                continue;
                            }
                            const int8_t* src = w + ch * k + k0 + 32 * j;
                            _mm_prefetch(reinterpret_cast<const char*>(src + kPrefetchBytes8),
                                         kPrefetchHint);
                            const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                _mm_loadu_si128(reinterpret_cast<const __m128i*>(src))));
                            const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16))));
                            _mm512_store_si512(dst, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
                        }
                    }
                const uint16_t* a0 = panel;
                const uint16_t* a1 = panel + sc * 16 * 32;
                for (int64_t t = tc; t < tc + tn; t += 2) {
                    const bool pair = t + 1 < tc + tn;
                    float* keep = partial + (t - tc) * 4 * 256;   // C of this tile pair between slices
                    if (first) {
                        _tile_zero(0);
                        _tile_zero(1);
                        _tile_zero(2);
                        _tile_zero(3);
                    } else {
                        _tile_loadd(0, keep, 64);
                        _tile_loadd(1, keep + 256, 64);
                        _tile_loadd(2, keep + 512, 64);
                        _tile_loadd(3, keep + 768, 64);
                    }
                    const uint32_t* x0 = xt + (t * kc + k0 / 32) * 256;
                    if (pair) {
                        const uint32_t* x1 = x0 + kc * 256;
                        for (int64_t j = 0; j < sc; ++j) {
                            _tile_loadd(4, a0 + j * 512, 64);
                            _tile_loadd(6, x0 + j * 256, 64);
                            _tile_dpbf16ps(0, 4, 6);
                            _tile_loadd(7, x1 + j * 256, 64);
                            _tile_dpbf16ps(1, 4, 7);
                            _tile_loadd(5, a1 + j * 512, 64);
                            _tile_dpbf16ps(2, 5, 6);
                            _tile_dpbf16ps(3, 5, 7);
                        }
                    } else {                           // an odd last token tile
                        for (int64_t j = 0; j < sc; ++j) {
                            _tile_loadd(4, a0 + j * 512, 64);
                            _tile_loadd(6, x0 + j * 256, 64);
                            _tile_dpbf16ps(0, 4, 6);
                            _tile_loadd(5, a1 + j * 512, 64);
                            _tile_dpbf16ps(2, 5, 6);
                        }
                    }
                    float* dst = last ? ct[0] : keep;
                    _tile_stored(0, dst, 64);
                    _tile_stored(1, dst + 256, 64);
                    _tile_stored(2, dst + 512, 64);
                    _tile_stored(3, dst + 768, 64);
                    if (last) {
                        emit(ct[0], 32 * b, 16 * t);
                        emit(ct[2], 32 * b + 16, 16 * t);
                        if (pair) {
                            emit(ct[1], 32 * b, 16 * t + 16);
                            emit(ct[3], 32 * b + 16, 16 * t + 16);
                        }
                    }
                }
            }
    }
    _tile_release();
    return true;
}
#endif

#if defined(OPTC_HAVE_INT8)
// SiLU(g) * u over bf16 vectors, rounded where the unfused ops round: s = bf16(g / (1 + e^-g))
// (ATen's silu formula in fp32), then bf16(s * u) (ATen's bf16 mul). e^-g: exp_ps, ~2 ulp in fp32,
// so s can differ from ATen's in the last bf16 bit where the fp32 value sits on a rounding edge.
void silu_mul_bf16(const uint16_t* g, const uint16_t* u, uint16_t* y, int64_t c0, int64_t c1) {
    const __m512 one = _mm512_set1_ps(1.0f);
    alignas(64) float sv[16];
    for (int64_t c = c0; c < c1; c += 16) {
        const int64_t len = c1 - c < 16 ? c1 - c : 16;
        const __mmask16 m = static_cast<__mmask16>((1u << len) - 1u);
        const __m512 gv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
            _mm256_maskz_loadu_epi16(m, g + c)), 16));
        const __m512 den = _mm512_add_ps(one, optc_native::exp_ps(
            _mm512_sub_ps(_mm512_setzero_ps(), gv)));
        _mm512_store_ps(sv, _mm512_div_ps(gv, den));
        for (int64_t i = 0; i < len; ++i)
            y[c + i] = f32_to_bf16_rne(bf16_to_f32(f32_to_bf16_rne(sv[i])) * bf16_to_f32(u[c + i]));
    }
}
#endif

}  // namespace

extern "C" {

// Bit 0: the int8 GEMV is compiled in (AVX-512); bit 1: the int4 GEMV (AVX512-BF16); bit 2: its
// AMX form is compiled in and the OS granted AMX state.
int optc_gemv_features() {
    int f = 0;
#ifdef OPTC_HAVE_INT8
    f |= 1;
#endif
#ifdef OPTC_HAVE_INT4
    f |= 2;
#endif
#ifdef OPTC_HAVE_AMX
    if (amx_permitted()) f |= 4;
#endif
    return f;
}

// y (M, ldy) <- x (M, K) bf16 @ (w (N, K) int8 * scales (N,))^T. 0 on success.
int optc_gemv_int8(const uint16_t* x, const int8_t* w, const uint16_t* scales, void* y,
                   int out_bf16, int64_t m, int64_t k, int64_t n, int64_t ldy) {
#ifdef OPTC_HAVE_INT8
    if (k % 16 != 0 || m <= 0 || n <= 0 || ldy < n) return 1;
    // x to fp32 once (M * K floats, cache-resident)
    float* xf = new float[m * k];
    for (int64_t i = 0; i < m * k; ++i) xf[i] = bf16_to_f32(x[i]);
    for (int64_t m0 = 0; m0 < m; m0 += kMaxRows) {
        const int rows = static_cast<int>(m - m0 < kMaxRows ? m - m0 : kMaxRows);
        void* yr = out_bf16 ? static_cast<void*>(static_cast<uint16_t*>(y) + m0 * ldy)
                            : static_cast<void*>(static_cast<float*>(y) + m0 * ldy);
        at::parallel_for(0, n, 64, [&](int64_t c0, int64_t c1) {
            const float* xr = xf + m0 * k;
            const bool ob = out_bf16 != 0;
            switch (rows) {
                case 1: int8_channels<1>(w, scales, xr, yr, ob, k, ldy, c0, c1); break;
                case 2: int8_channels<2>(w, scales, xr, yr, ob, k, ldy, c0, c1); break;
                case 3: int8_channels<3>(w, scales, xr, yr, ob, k, ldy, c0, c1); break;
                default: int8_channels<4>(w, scales, xr, yr, ob, k, ldy, c0, c1); break;
            }
        });
    }
    delete[] xf;
    return 0;
#else
    (void)x; (void)w; (void)scales; (void)y; (void)out_bf16; (void)m; (void)k; (void)n; (void)ldy;
    return 9;
#endif
}

// The same product on AMX (int8_gemm_amx): K % 32 == 0, any M and N. 0 on success, 9 where AMX is
// not compiled in or not granted.
int optc_gemm_int8_amx(const uint16_t* x, const int8_t* w, const uint16_t* scales, void* y,
                       int out_bf16, int64_t m, int64_t k, int64_t n, int64_t ldy) {
#ifdef OPTC_HAVE_AMX
    if (!amx_permitted()) return 9;
    if (k % 32 != 0 || k <= 0 || m <= 0 || n <= 0 || ldy < n) return 1;
    const int64_t tiles = (m + 15) / 16;
    uint32_t* xt = static_cast<uint32_t*>(scratch(0, tiles * 16 * k * sizeof(uint16_t)));
    if (xt == nullptr) return 2;
    at::parallel_for(0, tiles, 4, [&](int64_t t0, int64_t t1) { xt_pack(x, xt, m, k, t0, t1); });
    const int64_t blocks = (n + 31) / 32;
    std::atomic<bool> ok{true};
    at::parallel_for(0, blocks, 1, [&](int64_t lo, int64_t hi) {
        if (!int8_gemm_amx(w, scales, xt, y, out_bf16 != 0, m, k, n, ldy, lo, hi)) ok = false;
    });
    return ok ? 0 : 2;
#else
    (void)x; (void)w; (void)scales; (void)y; (void)out_bf16; (void)m; (void)k; (void)n; (void)ldy;
    return 9;
#endif
}

// y (M, ldy) <- x (M, K) bf16 @ W^T by panel_gemm (AVX512-BF16; the prefill path without AMX).
// kind 0: int8, w (N, K), aux scales (N,), K % 16 == 0, np == n; kind 1: int4 tile-64, aux
// scales_zeros (K / group, np, 2), np % 64 == 0, group even, K % group == 0. Channels [0, n).
// 0 on success, 1 bad arguments, 2 out of memory, 9 not compiled in (no AVX512-BF16).
int optc_gemm_panel(int kind, const uint16_t* x, const void* w, const uint16_t* aux, void* y,
                    int out_bf16, int64_t m, int64_t k, int64_t np, int64_t n, int64_t group,
                    int64_t ldy) {
#ifdef OPTC_HAVE_INT4
    if (m <= 0 || n <= 0 || k <= 0 || ldy < n) return 1;
    if (kind == 1) {
        if (np % 64 != 0 || n > np || group <= 0 || group % 2 != 0 || k % group != 0) return 1;
    } else if (kind != 0 || k % 16 != 0 || np != n) {
        return 1;
    }
    std::atomic<bool> ok{true};
    at::parallel_for(0, (n + 63) / 64, 1, [&](int64_t lo, int64_t hi) {
        if (!panel_gemm(kind, w, aux, x, y, out_bf16 != 0, m, k, np, n, group, ldy, lo, hi))
            ok = false;
    });
    return ok ? 0 : 2;
#else
    (void)kind; (void)x; (void)w; (void)aux; (void)y; (void)out_bf16; (void)m; (void)k; (void)np;
    (void)n; (void)group; (void)ldy;
    return 9;
#endif
}

// y (M, ldy) <- x (M, K) bf16 @ dequant(tile-64 int4 w, sz, group)^T, channels [0, n). 0 on success.
int optc_gemv_int4(const uint16_t* x, const uint8_t* w, const uint16_t* sz, void* y, int out_bf16,
                   int64_t m, int64_t k, int64_t np, int64_t n, int64_t group, int64_t ldy,
                   int use_amx) {
#ifdef OPTC_HAVE_INT4
    if (np % 64 != 0 || group <= 0 || group % 2 != 0 || k % group != 0 || m <= 0 || n <= 0
        || n > np || ldy < n) return 1;
    const int64_t ngroups = k / group;
    float* xg = new float[m * ngroups];
    at::parallel_for(0, m, 16, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r)
            for (int64_t g = 0; g < ngroups; ++g)
                xg[r * ngroups + g] = group_sum(x + r * k + g * group, group);
    });
#ifdef OPTC_HAVE_AMX
    if (use_amx && group % 32 == 0 && group <= 128 && amx_permitted()) {   // bt holds 4 chunks
        const int tile_rows = m < 16 ? static_cast<int>(m) : 16;
        const int64_t tiles = (m + 15) / 16;
        uint16_t* xp = static_cast<uint16_t*>(scratch(0, tiles * (k / 32) * tile_rows * 64));
        if (xp == nullptr) { delete[] xg; return 2; }
        at::parallel_for(0, tiles, 4, [&](int64_t t0, int64_t t1) {
            pack_a_tiles(x, xp, m, k, tile_rows, t0, t1);
        });
        at::parallel_for(0, np / 64, 1, [&](int64_t lo, int64_t hi) {
            int4_gemm_amx(w, sz, xp, xg, y, out_bf16 != 0, k, np, n, group, ldy, m, lo, hi);
        });
        delete[] xg;
        return 0;
    }
#endif
    for (int64_t m0 = 0; m0 < m; m0 += kMaxRows) {
        const int rows = static_cast<int>(m - m0 < kMaxRows ? m - m0 : kMaxRows);
        void* yr = out_bf16 ? static_cast<void*>(static_cast<uint16_t*>(y) + m0 * ldy)
                            : static_cast<void*>(static_cast<float*>(y) + m0 * ldy);
        at::parallel_for(0, np / 64, 1, [&](int64_t lo, int64_t hi) {
            const uint16_t* xr = x + m0 * k;
            const float* xgr = xg + m0 * ngroups;
            const bool ob = out_bf16 != 0;
            switch (rows) {
                case 1: int4_blocks<1>(w, sz, xr, xgr, yr, ob, k, np, n, group, ldy, lo, hi); break;
                case 2: int4_blocks<2>(w, sz, xr, xgr, yr, ob, k, np, n, group, ldy, lo, hi); break;
                case 3: int4_blocks<3>(w, sz, xr, xgr, yr, ob, k, np, n, group, ldy, lo, hi); break;
                default: int4_blocks<4>(w, sz, xr, xgr, yr, ob, k, np, n, group, ldy, lo, hi); break;
            }
        });
    }
    delete[] xg;
    return 0;
#else
    (void)x; (void)w; (void)sz; (void)y; (void)out_bf16; (void)m; (void)k; (void)np; (void)n;
    (void)group; (void)ldy; (void)use_amx;
    return 9;
#endif
}

// One row x (K,) bf16 against nw weights of the same K in one parallel region (a decode step's
// Q/K/V or gate/up projections: one wake of the thread pool and one pass over x instead of nw).
// kind 0: int8, w[i] (n[i], K), aux[i] scales (n[i],); kind 1: int4 tile-64, w[i] (np[i] / 64, K,
// 32), aux[i] scales_zeros (K / group, np[i], 2). y[i] (n[i],) bf16: each channel computed exactly
// as optc_gemv_int8 / optc_gemv_int4 compute it (same loop, same sums: the same bits). The work
// is cut in units of 64 channels over all weights, split evenly over the threads.
// swiglu (nw == 2, equal n): y[0] <- silu(x W0^T) * (x W1^T), each thread applying it to its own
// channels of both (silu_mul_bf16); y[1] is scratch space for the second product.
int optc_gemv_multi(int kind, const uint16_t* x, int nw, const void* const* w,
                    const void* const* aux, void* const* y, const int64_t* np, const int64_t* n,
                    int64_t k, int64_t group, int swiglu) {
#ifdef OPTC_HAVE_INT8
    constexpr int kMaxWeights = 8;
    if (nw < 1 || nw > kMaxWeights || k <= 0 || (kind != 0 && kind != 1)) return 1;
    if (swiglu && (nw != 2 || n[0] != n[1] || np[0] != np[1])) return 1;
    int64_t first[kMaxWeights + 1] = {0};            // prefix sums of units
    for (int i = 0; i < nw; ++i) {
        if (n[i] <= 0 || n[i] > np[i]) return 1;
        if (kind == 1 && np[i] % 64 != 0) return 1;
        first[i + 1] = first[i] + (kind == 1 ? np[i] / 64 : (n[i] + 63) / 64);
    }
    float* xs = nullptr;                             // int8: x in fp32; int4: x's group sums
    if (kind == 0) {
        if (k % 16 != 0) return 1;
        xs = new float[k];
        for (int64_t i = 0; i < k; ++i) xs[i] = bf16_to_f32(x[i]);
    } else {
#ifdef OPTC_HAVE_INT4
        if (group <= 0 || group % 2 != 0 || k % group != 0) return 1;
        const int64_t ngroups = k / group;
        xs = new float[ngroups];
        for (int64_t g = 0; g < ngroups; ++g) xs[g] = group_sum(x + g * group, group);
#else
        return 9;
#endif
    }
    auto run = [&](int i, int64_t u0, int64_t u1) {  // units [u0, u1) of weight i
        if (kind == 0) {
            const int64_t c1 = 64 * u1 < n[i] ? 64 * u1 : n[i];
            int8_channels<1>(static_cast<const int8_t*>(w[i]), static_cast<const uint16_t*>(aux[i]),
                             xs, y[i], true, k, n[i], 64 * u0, c1);
        } else {
#ifdef OPTC_HAVE_INT4
            int4_blocks<1>(static_cast<const uint8_t*>(w[i]), static_cast<const uint16_t*>(aux[i]),
                           x, xs, y[i], true, k, np[i], n[i], group, n[i], u0, u1);
#endif
        }
    };
    if (swiglu) {
        at::parallel_for(0, first[1], 1, [&](int64_t lo, int64_t hi) {
            run(0, lo, hi);
            run(1, lo, hi);
            silu_mul_bf16(static_cast<const uint16_t*>(y[0]), static_cast<const uint16_t*>(y[1]),
                          static_cast<uint16_t*>(y[0]), 64 * lo, 64 * hi < n[0] ? 64 * hi : n[0]);
        });
    } else {
        at::parallel_for(0, first[nw], 1, [&](int64_t lo, int64_t hi) {
            for (int i = 0; i < nw; ++i) {
                const int64_t a = lo > first[i] ? lo : first[i];
                const int64_t b = hi < first[i + 1] ? hi : first[i + 1];
                if (a < b) run(i, a - first[i], b - first[i]);
            }
        });
    }
    delete[] xs;
    return 0;
#else
    (void)kind; (void)x; (void)nw; (void)w; (void)aux; (void)y; (void)np; (void)n; (void)k;
    (void)group; (void)swiglu;
    return 9;
#endif
}

}  // extern "C"
