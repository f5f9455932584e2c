// AVX-512 fp32 math shared by optc's native kernels (decode.cpp's softmax, gemv.cpp's SwiGLU).
#pragma once

#if defined(__AVX512F__)
#include <immintrin.h>

namespace optc_native {

// e^x for x <= 0 (softmax arguments), Cephes expf's reduction and polynomial: relative error
// ~2 ulp; below -87.3 it returns 0.
inline __m512 exp_nonpos(__m512 x) {
    const __m512 lo = _mm512_set1_ps(-87.33654f);
    const __mmask16 tiny = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
    x = _mm512_max_ps(x, lo);
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_maskz_mov_ps(static_cast<__mmask16>(~tiny), _mm512_scalef_ps(p, n));
}

// e^x over the whole fp32 range: exp_nonpos's reduction and polynomial (valid for positive x
// too), +inf above 88.3762626647949 (where expf overflows), 0 below -87.3.
inline __m512 exp_ps(__m512 x) {
    const __m512 hi = _mm512_set1_ps(88.3762626647949f);
    const __mmask16 big = _mm512_cmp_ps_mask(x, hi, _CMP_GT_OQ);
    return _mm512_mask_mov_ps(exp_nonpos(_mm512_min_ps(x, hi)), big,
                              _mm512_set1_ps(__builtin_inff()));
}

}  // namespace optc_native
#endif
