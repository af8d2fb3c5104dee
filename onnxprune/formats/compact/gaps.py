"""``compact-gaps``: values + the gap before each value; positions are the cumulative sum of
gap + 1, and the rebuild scatters the values into zeros there.

- *aligned* codes (`AlignedGaps`): gap + 1 as one uint8 or uint16 code, one Cast to
  unpack; codes too long, and the first, are stored as exceptions (index, code) that
  replace theirs.
- *packed* codes (`PackedGaps`): the gap in ``width`` bits, split into byte-packed planes of
  8/4/2/1 bits unpacked by table lookups; gaps too long for ``width`` bits store their high
  part as an exception.
"""

from __future__ import annotations

import math

import numpy as np
from onnx import TensorProto

from ..graphs import zero_value
from .base import (
    ALIGNED_WIDTHS,
    MAX_GAP_WIDTH,
    Chunked,
    CompactForm,
    EncodingPlan,
    Payload,
    PayloadReader,
    register,
)
from .builder import TensorBuilder

_PART_WIDTHS = (8, 4, 2, 1)


def part_widths(width: int) -> list[int]:
    """`width` bits as byte-packable planes of 8, 4, 2 and 1 bits."""
    parts = []
    for part in _PART_WIDTHS:
        while width >= part:
            parts.append(part)
            width -= part
    return parts


def _gap_code_bytes(nnz: int, width: int) -> int:
    return sum(-(-nnz // (8 // part)) for part in part_widths(width))


def _gaps_load(tensor: Chunked) -> int:
    """Bytes every gaps rebuild writes: zeros, the scattered values and their reshape
    (numel each), and the int32 positions and their cumulative sum (nnz each)."""
    return 3 * tensor.numel * tensor.itemsize + 8 * tensor.nnz


def _first_always(exception_index: np.ndarray) -> np.ndarray:
    """Exception indices with 0 among them: the first code always starts the positions."""
    if exception_index.size == 0 or exception_index[0] != 0:
        return np.concatenate([[0], exception_index])
    return exception_index


def _pack(codes: np.ndarray, part: int) -> np.ndarray:
    """`part`-bit codes packed 8/part per byte, first code in the lowest bits."""
    per_byte = 8 // part
    if part == 8:
        return codes.astype(np.uint8)
    if part == 1:
        return np.packbits(codes.astype(bool), bitorder="little")
    padded = np.zeros(-(-codes.size // per_byte) * per_byte, np.uint8)
    padded[:codes.size] = codes
    shifts = (part * np.arange(per_byte)).astype(np.uint8)
    return np.bitwise_or.reduce(padded.reshape(-1, per_byte) << shifts, axis=1).astype(np.uint8)


class _Gaps(CompactForm):
    kind = "gaps"
    tensor_overhead = 1200
    chunk_overhead = 900

    def meta(self, plan: EncodingPlan, reduction_axis: int | None) -> dict:
        return {"width": plan.width}

    @staticmethod
    def _scatter(builder: TensorBuilder, steps: str, values: str, payload: Payload,
                 shape: str, output: str) -> None:
        """Values into zeros at the cumulative sums of `steps` (gap + 1 each)."""
        positions = builder.op("CumSum", [steps, builder.const(np.int32(0))])
        numel = math.prod(payload.shape)
        flat = builder.op("ScatterElements", [builder.zeros([numel]), positions, values])
        builder.op("Reshape", [flat, shape], output)


@register
class PackedGaps(_Gaps):
    name = "gaps"

    def plans(self, tensor: Chunked) -> list[EncodingPlan]:
        """The packed width with the fewest bytes."""
        nnz, stats = tensor.nnz, tensor.stats
        if not nnz:
            return []
        values = sum(tensor.value_bytes(s.nnz) for s in stats)
        gaps_load = _gaps_load(tensor)
        best = None
        for width in range(1, MAX_GAP_WIDTH + 1):
            # exceptions: gaps longer than `width` bits, plus the first gap of every chunk
            exceptions = sum(int(s.length_counts[width + 1:].sum()) + (1 if s.nnz else 0)
                             for s in stats)
            codes = sum(_gap_code_bytes(s.nnz, width) for s in stats)
            # per plane: a table lookup, its reshape and slice, and a sum (int32, nnz each)
            load = gaps_load + 4 * nnz * (1 + 4 * len(part_widths(width)))
            candidate = EncodingPlan("gaps", values + codes + 8 * exceptions, len(stats),
                                     width=width, load_bytes=load)
            if best is None or candidate.bytes < best.bytes:
                best = candidate
        if best is None:  # MAX_GAP_WIDTH >= 1: the loop made one
            raise RuntimeError("no gap width was tried")
        return [best]

    def encode(self, chunk: np.ndarray, bits: np.ndarray, plan: EncodingPlan,
               reduction_axis: int | None) -> Payload:
        width = plan.width
        positions = np.flatnonzero(bits)
        values = chunk.reshape(-1)[positions]
        gaps = np.diff(positions, prepend=-1) - 1
        del positions
        low = gaps & ((1 << width) - 1)
        high = gaps - low
        exception_index = _first_always(np.flatnonzero(high))
        exception_value = high[exception_index].astype(np.int32)
        exception_value[0] -= 1  # the cumulative sum of (gap + 1) is one past each position
        arrays = {"values": values, "exception_index": exception_index.astype(np.int32),
                  "exception_value": exception_value}
        shift = 0
        for index, part in enumerate(part_widths(width)):
            arrays[f"plane{index}"] = _pack((low >> shift) & ((1 << part) - 1), part)
            shift += part
        return Payload("gaps", tuple(chunk.shape), arrays, {"nnz": int(values.size)})

    def build(self, builder: TensorBuilder, payload: Payload, names: dict[str, str],
              shape: str, output: str) -> None:
        nnz = payload.params["nnz"]
        total = builder.op("ScatterElements", [
            builder.op("ConstantOfShape", [builder.const(np.array([nnz], np.int64))],
                       value=zero_value(TensorProto.INT32)),
            names["exception_index"], names["exception_value"]])
        shift = 0
        for index, part in enumerate(part_widths(builder.plan.width)):
            table = builder.byte_table(part, shift, 1 if index == 0 else 0)
            stored = payload.arrays[f"plane{index}"].size * (8 // part)
            total = builder.op("Add", [total, builder.unpack(names[f"plane{index}"], table,
                                                             nnz, stored)])
            shift += part
        self._scatter(builder, total, names["values"], payload, shape, output)

    def decode(self, meta: dict, chunk: dict, shape: tuple[int, ...], dtype: np.dtype,
               payload: PayloadReader) -> np.ndarray:
        out = np.zeros(math.prod(shape), dtype)
        nnz = chunk["nnz"]
        total = np.zeros(nnz, np.int64)
        shift = 0
        for index, part in enumerate(part_widths(meta["width"])):
            packed = payload(f"plane{index}").astype(np.int64)
            codes = (packed[:, None] >> (part * np.arange(8 // part))) & ((1 << part) - 1)
            total += codes.reshape(-1)[:nnz] << shift
            shift += part
        total += 1
        total[payload("exception_index").astype(np.int64)] += payload("exception_value")
        out[np.cumsum(total)] = payload("values")
        return out.reshape(shape)


@register
class AlignedGaps(_Gaps):
    name = "aligned-gaps"

    def plans(self, tensor: Chunked) -> list[EncodingPlan]:
        """One plan per code width (uint8, uint16)."""
        nnz, stats = tensor.nnz, tensor.stats
        if not nnz:
            return []
        values = sum(tensor.value_bytes(s.nnz) for s in stats)
        gaps_load = _gaps_load(tensor)
        plans = []
        for width in ALIGNED_WIDTHS:
            exceptions = sum(s.too_long[width] + (1 if s.nnz else 0) for s in stats)
            # the Cast of the codes and the exceptions written over them (int32, nnz each)
            plans.append(EncodingPlan("gaps", values + nnz * width // 8 + 8 * exceptions,
                                      len(stats), width=width, aligned=True,
                                      load_bytes=gaps_load + 8 * nnz))
        return plans

    def encode(self, chunk: np.ndarray, bits: np.ndarray, plan: EncodingPlan,
               reduction_axis: int | None) -> Payload:
        """Codes gap + 1 as uint8/uint16; the first code and those too long are exceptions,
        stored as (index, code) and written over a zero code by the rebuild."""
        width = plan.width
        positions = np.flatnonzero(bits)
        values = chunk.reshape(-1)[positions]
        steps = np.diff(positions, prepend=-1)  # gap + 1
        steps[0] = positions[0]  # the cumulative sum then lands on the positions themselves
        exception_index = _first_always(np.flatnonzero(steps >= (1 << width)))
        exception_value = steps[exception_index].astype(np.int32)
        codes = steps.astype(np.uint8 if width == 8 else np.uint16)
        codes[exception_index] = 0
        arrays = {"values": values, "codes": codes,
                  "exception_index": exception_index.astype(np.int32),
                  "exception_value": exception_value}
        return Payload("gaps", tuple(chunk.shape), arrays, {"nnz": int(values.size)})

    def build(self, builder: TensorBuilder, payload: Payload, names: dict[str, str],
              shape: str, output: str) -> None:
        steps = builder.op("ScatterElements", [
            builder.op("Cast", [names["codes"]], to=TensorProto.INT32),
            names["exception_index"], names["exception_value"]])
        self._scatter(builder, steps, names["values"], payload, shape, output)

    def decode(self, meta: dict, chunk: dict, shape: tuple[int, ...], dtype: np.dtype,
               payload: PayloadReader) -> np.ndarray:
        out = np.zeros(math.prod(shape), dtype)
        steps = payload("codes").astype(np.int64)
        steps[payload("exception_index").astype(np.int64)] = payload("exception_value")
        out[np.cumsum(steps)] = payload("values")
        return out.reshape(shape)

    def meta(self, plan: EncodingPlan, reduction_axis: int | None) -> dict:
        return {"width": plan.width, "codes": "aligned"}
