"""Weight quantization: formats (``formats``), and the pieces the ``quantize_weights`` pass uses.

The ``optc::linear_*`` ops that compute with these formats live in ``optc.ops.quant``.
"""

from optc.quant.formats import (
    QuantFormatError, QuantizedWeight, QuantScheme, dequantize, fake_quantize, linear_call,
    quantize, sqnr_db, unsupported_reason,
)

__all__ = ["QuantFormatError", "QuantizedWeight", "QuantScheme", "dequantize", "fake_quantize",
           "linear_call", "quantize", "sqnr_db", "unsupported_reason"]
