// optc native CPU kernels: weight dequantization for the prefill paths of optc/ops/quant.py.
//
// Plain C ABI, called through ctypes with data pointers (which releases the GIL). The only torch
// header is ATen/Parallel.h (it builds in about a second): at::parallel_for runs the blocks of 64
// output channels on torch's own OpenMP pool. Separate threads (std::thread) were measured 1.6x
// slower at M=16 on 2 cores: torch's OpenMP workers spin after each op and took the cores.
//
// int4_tile64_to_bf16_t: ATen's CPU tile-64 int4 layout (what _weight_int4pack_mm_for_cpu reads,
// optc.quant.formats) to the transposed bf16 weight W^T (K, Np):
//     w_int4   (Np/64, K, 32) uint8: byte j of (block, k) holds channel j (low nibble) and
//              channel j + 32 (high nibble) of that block, unsigned u in [0, 15]
//     sz       (K/G, Np, 2) bf16: scale s and zero z of group g = k / G per channel
//     out      (K, ldo) bf16, for the channel blocks [b0, b1):
//              out[k, n - 64 b0] = bf16_rne(float(u - 8) * float(s) + float(z))
//              (ldo = Np and the whole range: all of W^T; a narrower range: one column chunk)
// The product (u - 8) * s is exact in fp32 (4-bit times 8-bit significands), so this equals the
// torch reference's single rounding of the fp32 result (optc.ops.quant.int4_weight_t_bf16).
#include <ATen/Parallel.h>

#include "bf16.h"

#include <cstdint>
#include <cstring>

namespace {

using optc_native::bf16_to_f32;
using optc_native::f32_to_bf16_rne;

void int4_blocks(const uint8_t* w, const uint16_t* sz, uint16_t* out, int64_t k, int64_t np,
                 int64_t group, int64_t ldo, int64_t first, int64_t b0, int64_t b1) {
    alignas(64) float s[64], z[64];
    for (int64_t b = b0; b < b1; ++b) {
        const uint8_t* wb = w + b * k * 32;
        for (int64_t g0 = 0; g0 < k; g0 += group) {
            const uint16_t* szg = sz + ((g0 / group) * np + b * 64) * 2;
            for (int c = 0; c < 64; ++c) {
                s[c] = bf16_to_f32(szg[2 * c]);
                z[c] = bf16_to_f32(szg[2 * c + 1]);
            }
            for (int64_t kk = g0; kk < g0 + group; ++kk) {
                const uint8_t* src = wb + kk * 32;
                uint16_t* dst = out + kk * ldo + (b - first) * 64;
                for (int j = 0; j < 32; ++j) {   // vectorized by the compiler (-O3 -march=native)
                    float lo = static_cast<float>(static_cast<int>(src[j] & 15u) - 8);
                    float hi = static_cast<float>(static_cast<int>(src[j] >> 4) - 8);
                    dst[j] = f32_to_bf16_rne(lo * s[j] + z[j]);
                    dst[j + 32] = f32_to_bf16_rne(hi * s[j + 32] + z[j + 32]);
                }
            }
        }
    }
}

}  // namespace

extern "C" {

int optc_native_abi_version() { return 9; }

// Returns 0 on success, a positive code for an argument the caller should have rejected.
int optc_int4_tile64_to_bf16_t(const uint8_t* w, const uint16_t* sz, uint16_t* out, int64_t k,
                               int64_t np, int64_t group, int64_t b0, int64_t b1, int64_t ldo) {
    if (np % 64 != 0 || group <= 0 || k % group != 0) return 1;
    if (b0 < 0 || b1 > np / 64 || b0 >= b1 || ldo < (b1 - b0) * 64) return 2;
    at::parallel_for(b0, b1, 1, [&](int64_t lo, int64_t hi) {
        int4_blocks(w, sz, out, k, np, group, ldo, b0, lo, hi);
    });
    return 0;
}

}  // extern "C"
