"""Compact storage: non-zero values plus packed positions, rebuilt by standard ONNX ops.

The rebuilt tensor keeps its original name, so consumers do not change. Every op of the
rebuild has inputs that are initializers and outputs whose size shape inference knows,
so onnxruntime constant-folds the rebuild once at session start (graph optimization level
BASIC or higher) and inference then runs on a plain dense initializer.

Measured on onnxruntime 1.32, and what they decided here:

- Compress and NonZero are *not* folded ("output size could not be estimated before
  execution"): every op of the rebuild has a static output shape.
- onnxruntime keeps every folded intermediate alive until its folding pass ends, so peak
  memory at session creation is the model plus all rebuild intermediates (3-9x the dense
  tensor, see tools/bench_formats.py), and each byte a folded node writes is fresh memory:
  two page faults per 4 KiB (perf stat), ~1 ns per byte in a VM, whatever the op computes.
  Session creation follows that peak. Rebuilds therefore use as few full-size ops as
  possible, and int32 intermediates only where an index needs them. Splitting a tensor
  into chunks of 64-4096 rows joined by a Concat was measured too: no faster (the chunks'
  intermediates stay alive as well) and one more full copy, so tensors are split only
  where an intermediate would pass the folding limit.
- Gather of single elements costs ~35 ns each, ScatterElements ~17 ns, GatherElements
  ~2 ns, a row lookup in a 256-row table ~3 ns per produced element, CumSum ~7 ns. So
  values are moved by ScatterElements when few (gap codes, high sparsity) and by
  GatherElements when many (bitmask, N:M); packed codes are unpacked by row lookups in
  256-row tables that the graph builds once per tensor from a Range.
- Where has no float16/bfloat16 kernel and Expand none for bfloat16: Where is used on
  integer tables only, Expand not at all. ConstantOfShape accepts bfloat16 only from
  opset 20 on; below that, bfloat16 zeros are gathered from one stored zero.

Forms (one per tensor, the smallest that applies; a form within LOAD_SLACK of the
smallest wins if its rebuild writes fewer bytes, because session creation is dominated by
the bytes folded nodes write: about two page faults per 4 KiB written, measured). One class
per form, each with its size estimate, encoder, rebuild graph and numpy decoder:

- ``compact-gaps`` (`gaps.py`): values + the gap before each value, as aligned uint8/uint16
  codes (`AlignedGaps`) or packed bit planes (`PackedGaps`).
- ``compact-bitmask`` (`bitmask.py`): values + one bit per weight.
- ``compact-nm`` (`nm.py`): N values per group of M + packed combination indices.
- ``compact-zeros`` (`zeros.py`): an all-zero tensor (or chunk) is one ConstantOfShape.

int4/uint4 weights go through the same forms as their int8/uint8 integers, with each
chunk's values stored two to a byte and unpacked first (`TensorBuilder`), and one
conversion to the packed type at the end (`storage.py`); their plans count 4 bits a value
and the unpacking's graph bytes.

`base.py` holds the plan, the payload and the form interface, `builder.py` the graph
builder the forms share; this module plans a tensor, picks the form and dispatches
(importing it registers every form in `FORMS`).

A tensor whose dense size reaches onnxruntime's folding limit
(``optimization.constant_folding_max_output_size_in_bytes``, 1 GiB by default) stays
dense (see `storage.py`): its rebuild would otherwise run at every inference.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable

import numpy as np

from ...quantized import unpack_nibbles
from ..graphs import COMPACT_MARK, bits_of
from .base import FORMS, Chunked, CompactForm, EncodingPlan, Payload, form_of
from .bitmask import Bitmask
from .builder import TensorBuilder
from .gaps import AlignedGaps, PackedGaps
from .nm import NMForm
from .zeros import Zeros

__all__ = [
    "CHUNK_ELEMENTS",
    "FOLD_CAP_BYTES",
    "FORMS",
    "LOAD_SLACK",
    "MIN_OPSET",
    "NMForm",
    "AlignedGaps",
    "Bitmask",
    "CompactForm",
    "PackedGaps",
    "Payload",
    "EncodingPlan",
    "TensorBuilder",
    "Zeros",
    "choose_plan",
    "chunk_rows",
    "decode_chunk",
    "encode_chunk",
    "meta_doc",
    "nm_plan",
    "parse_meta",
    "plan_meta",
    "tensor_plans",
    "unstructured_plans",
]

MIN_OPSET = 11  # Range, CumSum, ScatterElements, GatherElements
FOLD_CAP_BYTES = 1 << 30  # onnxruntime's default constant-folding limit per node output
# Elements per rebuilt chunk: int32 intermediates of 256 MiB stay below onnxruntime's
# folding limit of 1 GiB per node output (see the module docstring).
CHUNK_ELEMENTS = 1 << 26
# A plan at most this much larger than the smallest is preferred when its rebuild writes
# fewer bytes at session start (aligned gap codes: ~5 % larger at 90 % sparsity, about
# 0.8x the bytes written, session creation 2.1x -> 1.8x dense on a 4096x2048 tensor).
LOAD_SLACK = 1 / 16
# Graph bytes that 4-bit values add to every form (measured on int4 [K, N] weights at opset
# 21 and 17): per tensor the byte and nibble tables and the conversion to int4, per chunk the
# lookups that unpack its values.
FOUR_BIT_TENSOR_OVERHEAD = 600
FOUR_BIT_CHUNK_OVERHEAD = 300
# The order forms offer their plans in; among plans of equal cost the earlier wins.
UNSTRUCTURED_FORMS = ("zeros", "gaps", "aligned-gaps", "bitmask")
PLANNING_ORDER = UNSTRUCTURED_FORMS + ("nm",)


def chunk_rows(shape: tuple[int, ...], reduction_axis: int | None, m: int = 0
               ) -> list[tuple[int, int]]:
    """Row ranges along axis 0 of at most CHUNK_ELEMENTS each (one row at least).

    When axis 0 is the N:M reduction axis a chunk holds whole groups (m rows at a time).
    """
    rows = shape[0]
    row_numel = math.prod(shape[1:])
    step = m if m and reduction_axis == 0 else 1
    per = max(step, CHUNK_ELEMENTS // max(1, row_numel) // step * step)
    return [(start, min(rows, start + per)) for start in range(0, rows, per)]


def tensor_plans(chunks: list[np.ndarray], reduction_axis: int | None = None,
                 nm: tuple[int, int] | None = None, value_bits: int = 0) -> list[EncodingPlan]:
    """Every form's candidate plans for a tensor split into `chunks` (N:M ones where
    `nm` = (N, M) is given and the tensor fits it); `value_bits` 4 sizes the values of
    int4/uint4 weights (given as int8/uint8 chunks) packed two to a byte."""
    tensor = Chunked(chunks, reduction_axis, nm, value_bits)
    return _with_unpacking([plan for name in PLANNING_ORDER for plan in FORMS[name].plans(tensor)],
                           value_bits)


def unstructured_plans(chunks: list[np.ndarray], value_bits: int = 0) -> list[EncodingPlan]:
    """The zeros, best packed gaps, aligned gaps and bitmask plans for these chunks."""
    tensor = Chunked(chunks, value_bits=value_bits)
    return _with_unpacking([plan for name in UNSTRUCTURED_FORMS
                            for plan in FORMS[name].plans(tensor)], value_bits)


def nm_plan(chunks: list[np.ndarray], reduction_axis: int, n: int, m: int,
            value_bits: int = 0) -> EncodingPlan | None:
    """The N:M plan, or None when a group holds more than n non-zeros or M is too large."""
    plans = FORMS["nm"].plans(Chunked(chunks, reduction_axis, (n, m), value_bits))
    return _with_unpacking(plans, value_bits)[0] if plans else None


def _with_unpacking(plans: list[EncodingPlan], value_bits: int) -> list[EncodingPlan]:
    """The plans with the graph bytes of unpacking 4-bit values counted."""
    if value_bits != 4:
        return plans
    return [dataclasses.replace(plan, extra_bytes=FOUR_BIT_TENSOR_OVERHEAD +
                                FOUR_BIT_CHUNK_OVERHEAD * plan.chunks) for plan in plans]


def choose_plan(plans: list[EncodingPlan]) -> EncodingPlan:
    """The smallest plan, or one within LOAD_SLACK of it whose rebuild writes less."""
    smallest = min(plans, key=lambda p: p.bytes)
    close = [p for p in plans if p.bytes <= smallest.bytes * (1 + LOAD_SLACK)]
    return min(close, key=lambda p: (p.load_bytes, p.bytes))


def encode_chunk(chunk: np.ndarray, plan: EncodingPlan, reduction_axis: int | None) -> Payload:
    """The payload of one chunk in the plan's form (zeros for a chunk without non-zeros)."""
    bits = bits_of(chunk)
    form = plan.form if plan.kind != "zeros" and bits.any() else form_of("zeros")
    return form.encode(chunk, bits, plan, reduction_axis)


def decode_chunk(meta: dict, number: int, chunk: dict, dtype: np.dtype,
                 read: Callable[[str], np.ndarray]) -> np.ndarray:
    """Rebuild chunk `number` of a compact tensor; `read(name)` gives payload arrays.

    `dtype` is the type the chunk is rebuilt in: int8/uint8 for int4/uint4 weights, whose
    values are stored packed (``"value_bits": 4``) and unpacked here.
    """
    start, stop = chunk["rows"]
    shape = (stop - start, *meta["shape"][1:])

    def payload(key: str) -> np.ndarray:
        array = read(f"{meta['prefix']}/c{number}/{key}")
        if key == "values" and meta.get("value_bits") == 4:
            if array.dtype != np.uint8:
                raise ValueError(f"its description says packed 4-bit values, its values are "
                                 f"{array.dtype}")
            values_shape = chunk["values_shape"]
            array = unpack_nibbles(array, math.prod(values_shape), dtype == np.int8)
            array = array.reshape(values_shape)
        if key == "values" and array.dtype != dtype:  # the description must fit the payload
            raise ValueError(f"its description says {np.dtype(dtype)}, its values are "
                             f"{array.dtype}")
        return array

    form = form_of(chunk["kind"], meta.get("codes") == "aligned")
    return form.decode(meta, chunk, shape, np.dtype(dtype), payload)


def plan_meta(plan: EncodingPlan, reduction_axis: int | None) -> dict:
    """The plan parameters `decode_chunk` needs, for the tensor's JSON description."""
    return plan.form.meta(plan, reduction_axis)


def meta_doc(meta: dict) -> str:
    return f"{COMPACT_MARK} {json.dumps(meta, separators=(',', ':'))}"


def parse_meta(doc: str) -> dict | None:
    if not doc.startswith(COMPACT_MARK + " {"):
        return None
    try:
        return json.loads(doc[len(COMPACT_MARK) + 1:])
    except ValueError:
        return None
