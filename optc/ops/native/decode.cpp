// Decode-step kernels: the small ops between the quantized matmuls, one call each instead of a
// chain of ATen dispatches.
//
// Why: in a TinyLlama decode step each ATen op runs ~3x slower than alone, because the weight
// stream of the matmul before it has evicted the caches the dispatcher's code and data live in
// (measured: add + RMSNorm, 8 dispatches, 26-44 us hot and 80-116 us right after a GEMV, the same
// after a plain 6 MB sum, so it is the eviction and not the threads). These kernels touch a few
// KiB of code and data per call.
//
// optc_add_rms_norm: h = x + r (rounded to x's dtype), y = w * (h * rsqrt(mean(h^2) + eps)) with
//   HF LlamaRMSNorm's roundings, BIT-EXACT with ATen's composite (torch.rms_norm and HF's code):
//   the sum of squares is added in the order of ATen's CPU sum kernel for a contiguous row (lane
//   vectors of 8 floats, 4 interleaved accumulators, the two-level cascade over groups of 16
//   vector rows, then the tails and the lanes in order), which tests check against torch on
//   every row length class. Nothing here may be contracted into an FMA: the library is built
//   with -ffp-contract=off, so each product and sum rounds where ATen's does.
// optc_rope: rotate-half RoPE (HF's x * cos + rotate_half(x) * sin) in one pass, with eager's
//   roundings (each product and the sum rounded to the dtype): bit-exact.
// optc_decode_attention: softmax(scale q k^T + mask) v for a few query rows (decode), fp32 sums
//   and probabilities, GQA by head index, bool or additive masks with any (broadcast) strides,
//   top-left causal. Not bit-exact with ATen's flash kernel (which rounds the probabilities to
//   bf16 before the second product); the tests compare both with an fp64 reference.
#include <ATen/Parallel.h>

#include "bf16.h"
#include "vmath.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define OPTC_HAVE_DECODE 1      // else every entry point returns 9 and callers use ATen
#endif

namespace {

using optc_native::bf16_to_f32;
using optc_native::f32_to_bf16_rne;

enum Dtype { kF32 = 0, kBF16 = 1 };

inline float load(const void* p, int dt, int64_t i) {
    return dt == kBF16 ? bf16_to_f32(static_cast<const uint16_t*>(p)[i])
                       : static_cast<const float*>(p)[i];
}

inline void put(void* p, int dt, int64_t i, float v) {
    if (dt == kBF16) static_cast<uint16_t*>(p)[i] = f32_to_bf16_rne(v);
    else static_cast<float*>(p)[i] = v;
}

#ifdef OPTC_HAVE_DECODE
// sum(v[0:n]) in the order of ATen's vectorized inner sum (SumKernel.cpp, row_sum over
// Vectorized<float> of 8 lanes with ilp 4 and multi_row_sum's cascade), reproduced from its
// structure and verified bit for bit against torch.sum in the tests.
float aten_row_sum(const float* v, int64_t n) {
    constexpr int L = 8, kIlp = 4, kLevels = 4;
    const int64_t nvec = n / L, rows = nvec / kIlp;
    int64_t ceil_log2 = 1;
    if (rows > 2) {
        ceil_log2 = 0;
        while ((int64_t{1} << ceil_log2) < rows) ++ceil_log2;
    }
    const int64_t level_power = ceil_log2 / kLevels > 4 ? ceil_log2 / kLevels : 4;
    const int64_t level_step = int64_t{1} << level_power, level_mask = level_step - 1;
    // acc[level][ilp]: one 8-lane vector each; lane l of every vector only ever meets lane l
    __m256 acc[kLevels][kIlp];
    for (int j = 0; j < kLevels; ++j)
        for (int k = 0; k < kIlp; ++k) acc[j][k] = _mm256_setzero_ps();
    int64_t i = 0;
    while (i + level_step <= rows) {
        for (int64_t j = 0; j < level_step; ++j, ++i)
            for (int k = 0; k < kIlp; ++k)
                acc[0][k] = _mm256_add_ps(acc[0][k], _mm256_loadu_ps(v + (i * kIlp + k) * L));
        for (int j = 1; j < kLevels; ++j) {
            for (int k = 0; k < kIlp; ++k) {
                acc[j][k] = _mm256_add_ps(acc[j][k], acc[j - 1][k]);
                acc[j - 1][k] = _mm256_setzero_ps();
            }
            if ((i & (level_mask << (j * level_power))) != 0) break;
        }
    }
    for (; i < rows; ++i)
        for (int k = 0; k < kIlp; ++k)
            acc[0][k] = _mm256_add_ps(acc[0][k], _mm256_loadu_ps(v + (i * kIlp + k) * L));
    for (int j = 1; j < kLevels; ++j)
        for (int k = 0; k < kIlp; ++k) acc[0][k] = _mm256_add_ps(acc[0][k], acc[j][k]);
    __m256 p = acc[0][0];
    for (int64_t r = rows * kIlp; r < nvec; ++r)           // vectors past the last ilp row
        p = _mm256_add_ps(p, _mm256_loadu_ps(v + r * L));
    for (int k = 1; k < kIlp; ++k) p = _mm256_add_ps(p, acc[0][k]);
    alignas(32) float lanes[L];
    _mm256_store_ps(lanes, p);
    float s = 0.0f;
    for (int64_t t = nvec * L; t < n; ++t) s += v[t];        // scalar tail first, then the lanes
    for (int l = 0; l < L; ++l) s += lanes[l];
    return s;
}

using optc_native::exp_nonpos;

inline __mmask16 first(int64_t n) {          // lanes [0, n) of 16
    return n >= 16 ? static_cast<__mmask16>(0xFFFF)
                   : n <= 0 ? static_cast<__mmask16>(0) : static_cast<__mmask16>((1u << n) - 1u);
}

// 16 consecutive elements of dtype DT as fp32, lanes outside m zero
template <int DT>
inline __m512 load16m(const void* p, __mmask16 m) {
    if constexpr (DT == kBF16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
    else
        return _mm512_maskz_loadu_ps(m, p);
}

// 16 consecutive elements of a row as fp32 (n <= 16 valid, the rest 0)
inline __m512 load16(const void* p, int dt, int64_t n) {
    return dt == kBF16 ? load16m<kBF16>(p, first(n)) : load16m<kF32>(p, first(n));
}

// 16 fp32 values stored as dtype DT (bf16: round to nearest even, NaN -> 0x7FC0 as c10 does)
template <int DT>
inline void store16m(void* p, __m512 v, __mmask16 m) {
    if constexpr (DT == kBF16) {
        const __m512i b = _mm512_castps_si512(v);
        __m512i r = _mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF),
                        _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1))));
        r = _mm512_mask_mov_epi32(_mm512_srli_epi32(r, 16), _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q),
                                  _mm512_set1_epi32(0x7FC0));
        _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(r));
    } else {
        _mm512_mask_storeu_ps(p, m, v);
    }
}

template <int DT>
inline __m512 round16(__m512 v) {          // the value as stored in DT
    if constexpr (DT == kBF16) {
        alignas(32) uint16_t t[16];
        store16m<kBF16>(t, v, static_cast<__mmask16>(0xFFFF));
        return load16m<kBF16>(t, static_cast<__mmask16>(0xFFFF));
    } else {
        return v;
    }
}

// One row of add + RMSNorm (see the file comment for the rounding points).
template <int DT>
void norm_row(const void* x, const void* r, const void* w, void* h, void* y, int dtw, int dty,
              int64_t base, int64_t c, float eps, float* sq) {
    constexpr size_t el = DT == kBF16 ? 2 : 4;
    const char* xr = static_cast<const char*>(x) + base * el;
    const char* rr = r ? static_cast<const char*>(r) + base * el : nullptr;
    char* hr = h ? static_cast<char*>(h) + base * el : nullptr;
    for (int64_t j = 0; j < c; j += 16) {
        const __mmask16 m = first(c - j);
        __m512 v = load16m<DT>(xr + j * el, m);
        if (rr) {
            v = round16<DT>(_mm512_add_ps(v, load16m<DT>(rr + j * el, m)));
            store16m<DT>(hr + j * el, v, m);
        }
        _mm512_mask_storeu_ps(sq + j, m, _mm512_mul_ps(v, v));
    }
    const float var = aten_row_sum(sq, c) / static_cast<float>(c);
    const __m512 rs = _mm512_set1_ps(1.0f / std::sqrt(var + eps));
    const char* src = rr ? hr : xr;                        // h as stored: the normalized value
    const size_t elw = dtw == kBF16 ? 2 : 4, ely = dty == kBF16 ? 2 : 4;
    char* yr = static_cast<char*>(y) + base * ely;
    for (int64_t j = 0; j < c; j += 16) {
        const __mmask16 m = first(c - j);
        const __m512 t = round16<DT>(_mm512_mul_ps(load16m<DT>(src + j * el, m), rs));
        const __m512 wv = dtw == kBF16 ? load16m<kBF16>(static_cast<const char*>(w) + j * elw, m)
                                       : load16m<kF32>(static_cast<const char*>(w) + j * elw, m);
        const __m512 out = _mm512_mul_ps(wv, t);
        if (dty == kBF16) store16m<kBF16>(yr + j * ely, out, m);
        else store16m<kF32>(yr + j * ely, out, m);
    }
}

// One row of rotate-half RoPE, eager's roundings: out = r(r(x cos) + r(rot(x) sin)) with
// rot(x) = (-x2, x1), each product and the sum rounded to DT (negation is exact).
template <int DT>
void rope_row(const char* x, const char* c, const char* s, char* out, int64_t d) {
    constexpr size_t el = DT == kBF16 ? 2 : 4;
    const int64_t half = d / 2;
    for (int64_t j = 0; j < half; j += 16) {
        const __mmask16 m = first(half - j);
        const __m512 x1 = load16m<DT>(x + j * el, m), x2 = load16m<DT>(x + (j + half) * el, m);
        const __m512 c1 = load16m<DT>(c + j * el, m), c2 = load16m<DT>(c + (j + half) * el, m);
        const __m512 s1 = load16m<DT>(s + j * el, m), s2 = load16m<DT>(s + (j + half) * el, m);
        const __m512 o1 = _mm512_add_ps(round16<DT>(_mm512_mul_ps(x1, c1)),
                                        round16<DT>(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), x2), s1)));
        const __m512 o2 = _mm512_add_ps(round16<DT>(_mm512_mul_ps(x2, c2)),
                                        round16<DT>(_mm512_mul_ps(x1, s2)));
        store16m<DT>(out + j * el, o1, m);
        store16m<DT>(out + (j + half) * el, o2, m);
    }
}

struct AttnArgs {
    const void* q; const void* k; const void* v; const void* mask; void* out;
    int dt, mask_kind;   // mask_kind 0 none, 1 bool, 2 additive in dtype mask_dt
    int mask_dt;
    int64_t B, H, Hkv, Tq, Tk, D, Dv;
    const int64_t* qs; const int64_t* ks; const int64_t* vs; const int64_t* ms; const int64_t* os;
    int causal;
    float scale;
};

constexpr int kRows = 8;     // query rows (GQA heads x query positions) sharing one pass over K

// Scores s[r][0:Tk] of query rows rows[0:nr] (each (head, position)) of one (batch, K/V head):
// 16 keys at a time across the lanes, K's columns gathered (one gather serves all nr rows: the
// GQA group reads each key once), bf16 pairs multiplied by vdpbf16ps (exact products, fp32 sums)
// or fp32 FMAs. Masked keys get -inf.
template <int nr>
void scores(const AttnArgs& a, int64_t b, const int64_t* hs, const int64_t* ts,
            const char* kb, float* const* s) {
    const bool bf = a.dt == kBF16;
    const int64_t kstride_bytes = a.ks[2] * (bf ? 2 : 4);
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i vidx = _mm512_mullo_epi32(lane, _mm512_set1_epi32(static_cast<int>(kstride_bytes)));
    const char* qrow[kRows];
    const char* mrow[kRows];
    const size_t mel = a.mask_kind == 1 ? 1 : (a.mask_dt == kBF16 ? 2 : 4);
    for (int r = 0; r < nr; ++r) {
        qrow[r] = static_cast<const char*>(a.q)
                  + (b * a.qs[0] + hs[r] * a.qs[1] + ts[r] * a.qs[2]) * (bf ? 2 : 4);
        mrow[r] = a.mask_kind ? static_cast<const char*>(a.mask)
                                    + (b * a.ms[0] + hs[r] * a.ms[1] + ts[r] * a.ms[2]) * mel
                              : nullptr;
    }
    const __m512 scale = _mm512_set1_ps(a.scale), ninf = _mm512_set1_ps(-INFINITY);
    for (int64_t j0 = 0; j0 < a.Tk; j0 += 16) {
        const int64_t nk = a.Tk - j0 < 16 ? a.Tk - j0 : 16;
        const __mmask16 km = nk == 16 ? static_cast<__mmask16>(0xFFFF)
                                      : static_cast<__mmask16>((1u << nk) - 1u);
        const char* kblk = kb + j0 * kstride_bytes;
        __m512 acc[nr];
        for (int r = 0; r < nr; ++r) acc[r] = _mm512_setzero_ps();
        if (bf) {
            for (int64_t dp = 0; dp < a.D / 2; ++dp) {
                const __m512i kv = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), km, vidx,
                                                               kblk + dp * 4, 1);
                for (int r = 0; r < nr; ++r) {
                    int32_t qp;
                    std::memcpy(&qp, qrow[r] + dp * 4, 4);
                    acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)kv, (__m512bh)_mm512_set1_epi32(qp));
                }
            }
        } else {
            for (int64_t d = 0; d < a.D; ++d) {
                const __m512 kv = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), km, vidx,
                                                           kblk + d * 4, 1);
                for (int r = 0; r < nr; ++r)
                    acc[r] = _mm512_fmadd_ps(kv, _mm512_set1_ps(
                        reinterpret_cast<const float*>(qrow[r])[d]), acc[r]);
            }
        }
        for (int r = 0; r < nr; ++r) {
            __m512 sc = _mm512_mul_ps(acc[r], scale);
            __mmask16 keep = km;
            if (a.causal) {          // top-left: position t sees keys j <= t
                const int64_t lim = ts[r] - j0;   // lanes <= lim are visible
                keep &= lim >= 15 ? static_cast<__mmask16>(0xFFFF)
                      : lim < 0 ? static_cast<__mmask16>(0)
                                : static_cast<__mmask16>((1u << (lim + 1)) - 1u);
            }
            if (a.mask_kind == 1 && a.ms[3] == 1) {         // contiguous bool row: 16 bytes
                keep &= _mm_mask_cmpneq_epi8_mask(km, _mm_maskz_loadu_epi8(km, mrow[r] + j0),
                                                  _mm_setzero_si128());
            } else if (a.mask_kind == 2 && a.ms[3] == 1) {  // contiguous additive row
                sc = _mm512_add_ps(sc, load16(mrow[r] + j0 * mel, a.mask_dt, nk));
            } else if (a.mask_kind) {                       // strided (broadcast) key axis
                alignas(64) float add[16] = {};
                __mmask16 mk = 0;
                for (int l = 0; l < nk; ++l) {
                    const int64_t off = (j0 + l) * a.ms[3];
                    if (a.mask_kind == 1) {
                        if (mrow[r][off] != 0) mk |= static_cast<__mmask16>(1u << l);
                    } else {
                        add[l] = load(mrow[r], a.mask_dt, off);
                    }
                }
                if (a.mask_kind == 1) keep &= mk;
                else sc = _mm512_add_ps(sc, _mm512_load_ps(add));
            }
            _mm512_mask_storeu_ps(s[r] + j0, km, _mm512_mask_blend_ps(keep, ninf, sc));
        }
    }
}

template <int... I> struct Seq {};

// Dispatch a runtime n in [1, N] to f.template operator()<n>() (the tile loops below need their
// trip counts at compile time to keep the accumulators in registers).
template <typename F, int... I>
inline void dispatch(int n, F&& f, Seq<I...>) { ((n == I + 1 ? f.template operator()<I + 1>() : void()), ...); }

void scores_any(const AttnArgs& a, int64_t b, const int64_t* hs, const int64_t* ts, int nr,
                const char* kb, float* const* s) {
    dispatch(nr, [&]<int R>() { scores<R>(a, b, hs, ts, kb, s); }, Seq<0, 1, 2, 3, 4, 5, 6, 7>{});
}

// o[r][c] = sum_j p[r][j] v[j][16 (c0 + c) ...] for RR rows and CC 16-column chunks, stored.
// sum_j p[r][j] * v[j] over 16-column chunks: o[r][c] for RR rows, CC chunks. The full 4 x 4 tile
// is written out with named accumulators: GCC keeps an array of vector accumulators in memory
// (it stored all 16 back every iteration), which halved this loop's speed.
template <int DT, int RR, int CC>
inline void accumulate(__m512 (&o)[RR][CC], const char* vr, int64_t vstride,
                       const float* const (&pr)[RR], const __mmask16 (&cm)[CC], int64_t tk) {
    constexpr size_t el = DT == kBF16 ? 2 : 4;
    if constexpr (RR == 4 && CC == 4) {
        __m512 a00 = _mm512_setzero_ps();
        __m512 a01 = _mm512_setzero_ps();
        __m512 a02 = _mm512_setzero_ps();
        __m512 a03 = _mm512_setzero_ps();
        __m512 a10 = _mm512_setzero_ps();
        __m512 a11 = _mm512_setzero_ps();
        __m512 a12 = _mm512_setzero_ps();
        __m512 a13 = _mm512_setzero_ps();
        __m512 a20 = _mm512_setzero_ps();
        __m512 a21 = _mm512_setzero_ps();
        __m512 a22 = _mm512_setzero_ps();
        __m512 a23 = _mm512_setzero_ps();
        __m512 a30 = _mm512_setzero_ps();
        __m512 a31 = _mm512_setzero_ps();
        __m512 a32 = _mm512_setzero_ps();
        __m512 a33 = _mm512_setzero_ps();
        for (int64_t j = 0; j < tk; ++j, vr += vstride) {
            const __m512 v0 = load16m<DT>(vr, cm[0]), v1 = load16m<DT>(vr + 16 * el, cm[1]),
                         v2 = load16m<DT>(vr + 32 * el, cm[2]), v3 = load16m<DT>(vr + 48 * el, cm[3]);
            const __m512 p0 = _mm512_set1_ps(pr[0][j]), p1 = _mm512_set1_ps(pr[1][j]),
                         p2 = _mm512_set1_ps(pr[2][j]), p3 = _mm512_set1_ps(pr[3][j]);
        a00 = _mm512_fmadd_ps(p0, v0, a00);
        a01 = _mm512_fmadd_ps(p0, v1, a01);
        a02 = _mm512_fmadd_ps(p0, v2, a02);
        a03 = _mm512_fmadd_ps(p0, v3, a03);
        a10 = _mm512_fmadd_ps(p1, v0, a10);
        a11 = _mm512_fmadd_ps(p1, v1, a11);
        a12 = _mm512_fmadd_ps(p1, v2, a12);
        a13 = _mm512_fmadd_ps(p1, v3, a13);
        a20 = _mm512_fmadd_ps(p2, v0, a20);
        a21 = _mm512_fmadd_ps(p2, v1, a21);
        a22 = _mm512_fmadd_ps(p2, v2, a22);
        a23 = _mm512_fmadd_ps(p2, v3, a23);
        a30 = _mm512_fmadd_ps(p3, v0, a30);
        a31 = _mm512_fmadd_ps(p3, v1, a31);
        a32 = _mm512_fmadd_ps(p3, v2, a32);
        a33 = _mm512_fmadd_ps(p3, v3, a33);
        }
        o[0][0] = a00;
        o[0][1] = a01;
        o[0][2] = a02;
        o[0][3] = a03;
        o[1][0] = a10;
        o[1][1] = a11;
        o[1][2] = a12;
        o[1][3] = a13;
        o[2][0] = a20;
        o[2][1] = a21;
        o[2][2] = a22;
        o[2][3] = a23;
        o[3][0] = a30;
        o[3][1] = a31;
        o[3][2] = a32;
        o[3][3] = a33;
    } else {
        for (int r = 0; r < RR; ++r)
            for (int c = 0; c < CC; ++c) o[r][c] = _mm512_setzero_ps();
        for (int64_t j = 0; j < tk; ++j, vr += vstride)
            for (int c = 0; c < CC; ++c) {
                const __m512 vz = load16m<DT>(vr + 16 * c * el, cm[c]);
                for (int r = 0; r < RR; ++r)
                    o[r][c] = _mm512_fmadd_ps(_mm512_set1_ps(pr[r][j]), vz, o[r][c]);
            }
    }
}

template <int DT, int RR, int CC>
void pv_tile(const AttnArgs& a, int64_t b, const char* vb, float* const* p, const int64_t* hs,
             const int64_t* ts, const bool* empty, int64_t c0) {
    constexpr size_t el = DT == kBF16 ? 2 : 4;
    __m512 o[RR][CC];
    __mmask16 cm[CC];
    for (int c = 0; c < CC; ++c) cm[c] = first(a.Dv - 16 * (c0 + c));
    for (int r = 0; r < RR; ++r)
        for (int c = 0; c < CC; ++c) o[r][c] = _mm512_setzero_ps();
    const int64_t vstride = a.vs[2] * el;
    const char* vr = vb + 16 * c0 * el;
    const float* pr[RR];
    for (int r = 0; r < RR; ++r) pr[r] = p[r];
    accumulate<DT, RR, CC>(o, vr, vstride, pr, cm, a.Tk);
    for (int r = 0; r < RR; ++r) {
        char* orow = static_cast<char*>(a.out) + (b * a.os[0] + hs[r] * a.os[1] + ts[r] * a.os[2]) * el;
        for (int c = 0; c < CC; ++c) {
            alignas(64) float tmp[16];
            _mm512_store_ps(tmp, empty[r] ? _mm512_setzero_ps() : o[r][c]);   // no key: 0
            for (int64_t i = 0; i < 16 && 16 * (c0 + c) + i < a.Dv; ++i)
                put(orow, a.dt, (16 * (c0 + c) + i) * a.os[3], tmp[i]);
        }
    }
}

void pv_any(int rr, int cc, const AttnArgs& a, int64_t b, const char* vb, float* const* p,
            const int64_t* hs, const int64_t* ts, const bool* empty, int64_t c0) {
    dispatch(rr, [&]<int R>() {
        dispatch(cc, [&]<int C>() {
            if (a.dt == kBF16) pv_tile<kBF16, R, C>(a, b, vb, p, hs, ts, empty, c0);
            else pv_tile<kF32, R, C>(a, b, vb, p, hs, ts, empty, c0);
        }, Seq<0, 1, 2, 3>{});
    }, Seq<0, 1, 2, 3>{});
}

// Query rows rows [0, nr) of one (batch, K/V head): scores, softmax, then P V with fp32
// probabilities, 4 rows x 64 output columns of accumulators per pass over V.
void attend_rows(const AttnArgs& a, int64_t b, int64_t hk, const int64_t* hs, const int64_t* ts,
                 int nr, float* sbuf) {
    const bool bf = a.dt == kBF16;
    const size_t el = bf ? 2 : 4;
    const char* kb = static_cast<const char*>(a.k) + (b * a.ks[0] + hk * a.ks[1]) * el;
    const char* vb = static_cast<const char*>(a.v) + (b * a.vs[0] + hk * a.vs[1]) * el;
    const int64_t ld = (a.Tk + 15) / 16 * 16;
    float* s[kRows];
    for (int r = 0; r < nr; ++r) s[r] = sbuf + r * ld;
    scores_any(a, b, hs, ts, nr, kb, s);
    bool empty[kRows];
    for (int r = 0; r < nr; ++r) {                         // softmax numerators, in place
        __m512 mxv = _mm512_set1_ps(-INFINITY);
        for (int64_t j = 0; j < a.Tk; j += 16) {
            const __mmask16 m = a.Tk - j >= 16 ? static_cast<__mmask16>(0xFFFF)
                                               : static_cast<__mmask16>((1u << (a.Tk - j)) - 1u);
            mxv = _mm512_max_ps(mxv, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), m, s[r] + j));
        }
        const float mx = _mm512_reduce_max_ps(mxv);
        empty[r] = mx == -INFINITY;
        if (empty[r]) continue;
        mxv = _mm512_set1_ps(mx);
        __m512 sumv = _mm512_setzero_ps();
        for (int64_t j = 0; j < a.Tk; j += 16) {
            const __mmask16 m = a.Tk - j >= 16 ? static_cast<__mmask16>(0xFFFF)
                                               : static_cast<__mmask16>((1u << (a.Tk - j)) - 1u);
            const __m512 e = _mm512_maskz_mov_ps(m, exp_nonpos(_mm512_sub_ps(
                _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), m, s[r] + j), mxv)));
            _mm512_mask_storeu_ps(s[r] + j, m, e);
            sumv = _mm512_add_ps(sumv, e);
        }
        const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sumv));
        for (int64_t j = 0; j < a.Tk; j += 16) {            // normalized probabilities
            const __mmask16 m = a.Tk - j >= 16 ? static_cast<__mmask16>(0xFFFF)
                                               : static_cast<__mmask16>((1u << (a.Tk - j)) - 1u);
            _mm512_mask_storeu_ps(s[r] + j, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, s[r] + j), inv));
        }
    }
    const int64_t nv = (a.Dv + 15) / 16;
    for (int r0 = 0; r0 < nr; r0 += 4) {
        const int rr = nr - r0 < 4 ? nr - r0 : 4;
        for (int64_t c0 = 0; c0 < nv; c0 += 4) {
            const int cc = nv - c0 < 4 ? static_cast<int>(nv - c0) : 4;
            pv_any(rr, cc, a, b, vb, s + r0, hs + r0, ts + r0, empty + r0, c0);
        }
    }
}
#endif

}  // namespace

extern "C" {

// 1 when the decode kernels are compiled in (AVX-512 F/BW/VL and BF16), else 0.
int optc_decode_features() {
#ifdef OPTC_HAVE_DECODE
    return 1;
#else
    return 0;
#endif
}

// Rows [0, rows) of length c, all contiguous. x, r (may be null: plain rms_norm, h unused) in
// dtype dt; w in dtype dtw; y in dty = promote(dt, dtw); h in dt. 0 on success.
int optc_add_rms_norm(const void* x, const void* r, const void* w, void* h, void* y, int dt,
                      int dtw, int dty, int64_t rows, int64_t c, float eps) {
#ifdef OPTC_HAVE_DECODE
    if (rows < 0 || c <= 0 || dt < 0 || dt > 1 || dtw < 0 || dtw > 1 || dty < 0 || dty > 1)
        return 1;
    const int64_t grain = c >= 16384 ? 1 : 16384 / c;
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
        std::vector<float> sq(static_cast<size_t>(c));
        for (int64_t i = r0; i < r1; ++i) {
            const int64_t base = i * c;
            if (dt == kBF16) norm_row<kBF16>(x, r, w, h, y, dtw, dty, base, c, eps, sq.data());
            else norm_row<kF32>(x, r, w, h, y, dtw, dty, base, c, eps, sq.data());
        }
    });
    return 0;
#else
    (void)x; (void)r; (void)w; (void)h; (void)y; (void)dt; (void)dtw; (void)dty; (void)rows;
    (void)c; (void)eps;
    return 9;
#endif
}

// out (B, H, T, D) <- rotate-half RoPE of x with cos/sin tables broadcast to it; strides in
// elements, 4 per tensor (broadcast dimensions 0), the last one 1; D even. 0 on success.
int optc_rope(const void* x, const void* c, const void* s, void* out, int dt, const int64_t* sizes,
              const int64_t* xs, const int64_t* cs, const int64_t* ss, const int64_t* os) {
#ifdef OPTC_HAVE_DECODE
    if (dt < 0 || dt > 1 || sizes[3] % 2 != 0 || xs[3] != 1 || cs[3] != 1 || ss[3] != 1
        || os[3] != 1) return 1;
    const int64_t B = sizes[0], H = sizes[1], T = sizes[2], D = sizes[3], rows = B * H * T;
    const size_t el = dt == kBF16 ? 2 : 4;
    const int64_t grain = D >= 16384 ? 1 : 16384 / (D > 0 ? D : 1);
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
            const int64_t b = r / (H * T), h = (r / T) % H, t = r % T;
            const char* xr = static_cast<const char*>(x) + (b * xs[0] + h * xs[1] + t * xs[2]) * el;
            const char* cr = static_cast<const char*>(c) + (b * cs[0] + h * cs[1] + t * cs[2]) * el;
            const char* sr = static_cast<const char*>(s) + (b * ss[0] + h * ss[1] + t * ss[2]) * el;
            char* orow = static_cast<char*>(out) + (b * os[0] + h * os[1] + t * os[2]) * el;
            if (dt == kBF16) rope_row<kBF16>(xr, cr, sr, orow, D);
            else rope_row<kF32>(xr, cr, sr, orow, D);
        }
    });
    return 0;
#else
    (void)x; (void)c; (void)s; (void)out; (void)dt; (void)sizes; (void)xs; (void)cs; (void)ss;
    (void)os;
    return 9;
#endif
}

// out <- attention of q (B, H, Tq, D) over k (B, Hkv, Tk, D), v (B, Hkv, Tk, Dv); strides in
// elements, 4 per tensor (the mask's broadcast dimensions have stride 0). dt: q/k/v/out dtype;
// mask_kind 0 none, 1 bool, 2 additive (mask_dt). D, Dv <= 256. 0 on success.
int optc_decode_attention(const void* q, const void* k, const void* v, const void* mask, void* out,
                          int dt, int mask_kind, int mask_dt, int64_t B, int64_t H, int64_t Hkv,
                          int64_t Tq, int64_t Tk, int64_t D, int64_t Dv, const int64_t* qs,
                          const int64_t* ks, const int64_t* vs, const int64_t* ms,
                          const int64_t* os, int causal, float scale) {
#ifdef OPTC_HAVE_DECODE
    if (dt < 0 || dt > 1 || mask_kind < 0 || mask_kind > 2 || mask_dt < 0 || mask_dt > 1
        || B <= 0 || H <= 0 || Hkv <= 0 || H % Hkv != 0 || Tq <= 0 || Tk <= 0 || D <= 0 || Dv <= 0
        || D > 256 || Dv > 256 || ks[3] != 1 || vs[3] != 1 || qs[3] != 1) return 1;
    if ((dt == kBF16 && D % 2 != 0) || ks[2] * Tk * (dt == kBF16 ? 2 : 4) >= (int64_t{1} << 31))
        return 9;                                          // not this kernel's layout: caller's path
    const AttnArgs a{q, k, v, mask, out, dt, mask_kind, mask_dt, B, H, Hkv, Tq, Tk, D, Dv,
                     qs, ks, vs, ms, os, causal, scale};
    // work items: (batch, K/V head, chunk of kRows query rows of its group); a thread takes
    // several when they are small, so tiny problems stay on the calling thread
    const int64_t group = H / Hkv, rows = group * Tq, chunks = (rows + kRows - 1) / kRows;
    const int64_t work = kRows * Tk * (D + Dv);
    const int64_t grain = work >= 65536 ? 1 : 65536 / work;
    at::parallel_for(0, B * Hkv * chunks, grain, [&](int64_t w0, int64_t w1) {
        std::vector<float> sbuf(static_cast<size_t>(kRows * ((Tk + 15) / 16 * 16)));
        for (int64_t w = w0; w < w1; ++w) {
            const int64_t b = w / (Hkv * chunks), hk = (w / chunks) % Hkv, c = w % chunks;
            int64_t hs[kRows], ts[kRows];
            int nr = 0;
            for (int64_t r = c * kRows; r < rows && nr < kRows; ++r, ++nr) {
                hs[nr] = hk * group + r / Tq;              // GQA: heads hk*group .. read head hk
                ts[nr] = r % Tq;
            }
            attend_rows(a, b, hk, hs, ts, nr, sbuf.data());
        }
    });
    return 0;
#else
    (void)q; (void)k; (void)v; (void)mask; (void)out; (void)dt; (void)mask_kind; (void)mask_dt;
    (void)B; (void)H; (void)Hkv; (void)Tq; (void)Tk; (void)D; (void)Dv; (void)qs; (void)ks;
    (void)vs; (void)ms; (void)os; (void)causal; (void)scale;
    return 9;
#endif
}

}  // extern "C"
