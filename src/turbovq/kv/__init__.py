"""KV-cache compression with TurboQuant for Hugging Face transformers (needs the ``kv`` extra: transformers>=5).

``TurboQuantCache`` is a drop-in ``transformers`` cache; ``codes_attention(model)`` makes the model attend directly
on the codes (otherwise the cache hands dequantized keys/values to the model's own attention).
"""

from turbovq.kv.attention import attend_codes, codes_attention, register, turboquant_attention_forward
from turbovq.kv.cache import ATTN_NAME, PackedRows, RowCodec, TurboQuantCache, TurboQuantLayer

__all__ = [
    "ATTN_NAME",
    "PackedRows",
    "RowCodec",
    "TurboQuantCache",
    "TurboQuantLayer",
    "attend_codes",
    "codes_attention",
    "register",
    "turboquant_attention_forward",
]
