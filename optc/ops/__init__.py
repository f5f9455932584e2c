"""optc's own operators, ``torch.ops.optc.*``; importing this package registers them.

``OPS`` maps an op name to its :class:`OpDef` (fake / CPU / Triton implementations);
``get_op_def`` maps an FX node target to it. See ``registry`` for the contract.
"""

from optc.ops import norms  # noqa: F401  (registers optc::rms_norm, add_rms_norm, add_layer_norm)
from optc.ops import attention  # noqa: F401  (registers optc::attention)
from optc.ops import quant  # noqa: F401  (registers optc::linear_int8, _int4, _w8a8, _bfp)
from optc.ops import rope  # noqa: F401  (registers optc::rope)
from optc.ops import quant_group  # noqa: F401  (registers optc::qlinear_group, qswiglu)
from optc.ops.registry import OPS, OpDef, get_op_def

__all__ = ["OPS", "OpDef", "get_op_def"]
