// bf16 <-> fp32 bit conversions shared by optc's native kernels (dequant.cpp, gemv.cpp).
#pragma once

#include <cstdint>
#include <cstring>

namespace optc_native {

inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

inline uint16_t f32_to_bf16_rne(float f) {  // round to nearest even; inputs are finite
    uint32_t bits;
    std::memcpy(&bits, &f, 4);
    bits += 0x7FFFu + ((bits >> 16) & 1u);
    return static_cast<uint16_t>(bits >> 16);
}

}  // namespace optc_native
