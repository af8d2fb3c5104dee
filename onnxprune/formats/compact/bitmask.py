"""``compact-bitmask``: values (after a leading zero) + one bit per weight. Weight i reads
value number (set bits up to i) if its bit is set, else the leading zero."""

from __future__ import annotations

import math

import numpy as np

from .base import Chunked, CompactForm, EncodingPlan, Payload, PayloadReader, register
from .builder import TensorBuilder


@register
class Bitmask(CompactForm):
    name = kind = "bitmask"
    tensor_overhead = 900
    chunk_overhead = 500

    def plans(self, tensor: Chunked) -> list[EncodingPlan]:
        if not tensor.nnz:
            return []
        itemsize, numel = tensor.itemsize, tensor.numel
        # per chunk: its values after a leading zero, and one bit per weight
        size = sum(tensor.value_bytes(s.nnz + 1) + -(-s.numel // 8) for s in tensor.stats)
        # unpacked bits, their reshape, cumulative sum and product (int32), gather and reshape
        return [EncodingPlan("bitmask", size, len(tensor.chunks),
                     load_bytes=16 * numel + 2 * numel * itemsize)]

    def encode(self, chunk: np.ndarray, bits: np.ndarray, plan: EncodingPlan,
               reduction_axis: int | None) -> Payload:
        mask = bits != 0
        values = np.concatenate([np.zeros(1, chunk.dtype), chunk.reshape(-1)[mask]])
        return Payload("bitmask", tuple(chunk.shape),
                       {"values": values, "bits": np.packbits(mask, bitorder="little")},
                       {"nnz": int(values.size - 1)})

    def build(self, builder: TensorBuilder, payload: Payload, names: dict[str, str],
              shape: str, output: str) -> None:
        numel = math.prod(payload.shape)
        mask = builder.unpack(names["bits"], builder.byte_table(1, 0, 0), numel,
                              payload.arrays["bits"].size * 8)
        rank = builder.op("CumSum", [mask, builder.const(np.int32(0))])
        index = builder.op("Mul", [rank, mask])
        flat = builder.op("GatherElements", [names["values"], index], axis=0)
        builder.op("Reshape", [flat, shape], output)

    def decode(self, meta: dict, chunk: dict, shape: tuple[int, ...], dtype: np.dtype,
               payload: PayloadReader) -> np.ndarray:
        numel = math.prod(shape)
        out = np.zeros(numel, dtype)
        mask = np.unpackbits(payload("bits"), bitorder="little")[:numel].astype(bool)
        out[mask] = payload("values")[1:]
        return out.reshape(shape)
