"""Weight quantization formats: DeepSeek-V3 block FP8, compressed-tensors pack-quantized INT4,
and the parser that maps a checkpoint's `quantization_config` onto one of them."""

from moecluster.workers.quant.fp8 import (
    FP8_DTYPE,
    FP8_E4M3_MAX,
    dequantize_fp8_block,
    fp8_scale_shape,
    quantize_fp8_block,
)
from moecluster.workers.quant.int4 import (
    dequantize_int4_group,
    pack_int4,
    quantize_int4_group,
    unpack_int4,
)
from moecluster.workers.quant.scheme import (
    Fp8BlockScheme,
    Int4GroupScheme,
    QuantScheme,
    UnsupportedQuantization,
    is_router_gate,
    parse_quant_config,
)

__all__ = [
    "FP8_DTYPE",
    "FP8_E4M3_MAX",
    "Fp8BlockScheme",
    "Int4GroupScheme",
    "QuantScheme",
    "UnsupportedQuantization",
    "dequantize_fp8_block",
    "dequantize_int4_group",
    "fp8_scale_shape",
    "is_router_gate",
    "pack_int4",
    "parse_quant_config",
    "quantize_fp8_block",
    "quantize_int4_group",
    "unpack_int4",
]
