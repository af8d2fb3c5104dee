"""``compact-zeros``: an all-zero tensor (or chunk) is one ConstantOfShape."""

from __future__ import annotations

import math

import numpy as np

from .base import Chunked, CompactForm, EncodingPlan, Payload, PayloadReader, register
from .builder import TensorBuilder


@register
class Zeros(CompactForm):
    name = kind = "zeros"
    tensor_overhead = 300
    chunk_overhead = 120

    def plans(self, tensor: Chunked) -> list[EncodingPlan]:
        if tensor.nnz:
            return []
        return [EncodingPlan("zeros", 0, len(tensor.chunks),
                             load_bytes=tensor.numel * tensor.itemsize)]

    def encode(self, chunk: np.ndarray, bits: np.ndarray, plan: EncodingPlan,
               reduction_axis: int | None) -> Payload:
        return Payload("zeros", tuple(int(d) for d in chunk.shape), params={"nnz": 0})

    def build(self, builder: TensorBuilder, payload: Payload, names: dict[str, str],
              shape: str, output: str) -> None:
        builder.zeros(list(payload.shape), output)

    def decode(self, meta: dict, chunk: dict, shape: tuple[int, ...], dtype: np.dtype,
               payload: PayloadReader) -> np.ndarray:
        return np.zeros(math.prod(shape), dtype).reshape(shape)
