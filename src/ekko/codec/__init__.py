"""Wire encodings: row codecs (fp32, fp16, int8 row-wise), varint key/int columns, zstd frames
with integrity checks, and :class:`RowBlock`, a whole chunk of rows on the wire."""

from ekko.codec.block import RowBlock, decode_block, decode_dead, encode_block
from ekko.codec.errors import CodecError
from ekko.codec.frames import compress, decompress
from ekko.codec.keys import decode_ints, decode_keys, encode_ints, encode_keys, sort_rows_by_key
from ekko.codec.rows import CODECS, EncodedRows, decode_rows, encode_rows, max_abs_error

__all__ = [
    "CODECS",
    "CodecError",
    "EncodedRows",
    "RowBlock",
    "compress",
    "decode_block",
    "decode_dead",
    "decode_ints",
    "decode_keys",
    "decode_rows",
    "decompress",
    "encode_block",
    "encode_ints",
    "encode_keys",
    "encode_rows",
    "max_abs_error",
    "sort_rows_by_key",
]
