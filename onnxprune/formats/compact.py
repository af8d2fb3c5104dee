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
the bytes folded nodes write: about two page faults per 4 KiB written, measured):

- ``compact-gaps``: values + the gap before each value. Either *aligned*: gap + 1 as one
  uint8 or uint16 code, one Cast to unpack, codes too long stored as exceptions (index,
  value) that replace theirs; or *packed*: the gap in ``width`` bits, split into byte-packed
  planes of 8/4/2/1 bits unpacked by table lookups, gaps too long for ``width`` bits
  storing their high part as an exception. Positions are the cumulative sum of gap + 1.
- ``compact-bitmask``: values (after a leading zero) + one bit per weight. Weight i reads
  value number (set bits up to i) if its bit is set, else the leading zero.
- ``compact-nm``: for tensors with at most N non-zeros in every group of M along the
  reduction axis: N values per group + the index of the group's N-of-M combination,
  several indices packed base C(M, N) into 1, 2 or 4 bytes (2:4: 2.67 bits per group).
- ``compact-zeros``: an all-zero tensor (or chunk) is one ConstantOfShape.

A tensor whose dense size reaches onnxruntime's folding limit
(``optimization.constant_folding_max_output_size_in_bytes``, 1 GiB by default) stays
dense (see `storage.py`): its rebuild would otherwise run at every inference.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper

from .graphs import COMPACT_MARK, bits_of, make_tensor, zero_value

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)

MIN_OPSET = 11  # Range, CumSum, ScatterElements, GatherElements
FOLD_CAP_BYTES = 1 << 30  # onnxruntime's default constant-folding limit per node output
# Elements per rebuilt chunk: int32 intermediates of 256 MiB stay below onnxruntime's
# folding limit of 1 GiB per node output (see the module docstring).
CHUNK_ELEMENTS = 1 << 26
MAX_GAP_WIDTH = 24
MAX_NM_TABLE_ROWS = 1 << 14  # C(M, N) combinations, stored as a uint8 [rows, M] table
# Graph bytes each form adds besides its payload, per tensor and per chunk (nodes, small
# constants, names); measured on 2-D fp32 tensors and used only to choose between forms.
TENSOR_OVERHEAD = {"zeros": 300, "gaps": 1200, "bitmask": 900, "nm": 900}
CHUNK_OVERHEAD = {"zeros": 120, "gaps": 900, "bitmask": 500, "nm": 700}
_PART_WIDTHS = (8, 4, 2, 1)
_ALIGNED_WIDTHS = (8, 16)  # gap codes stored whole as uint8 / uint16
# A plan at most this much larger than the smallest is preferred when its rebuild writes
# fewer bytes at session start (aligned gap codes: ~5 % larger at 90 % sparsity, about
# 0.8x the bytes written, session creation 2.1x -> 1.8x dense on a 4096x2048 tensor).
LOAD_SLACK = 1 / 16


@dataclass(frozen=True)
class Plan:
    """How one tensor is stored: the form, its parameters and the bytes it will take."""

    kind: str  # zeros | gaps | bitmask | nm
    payload_bytes: int
    chunks: int = 1
    width: int = 0  # gaps: bits per gap code
    n: int = 0  # nm: kept per group
    m: int = 0  # nm: group size
    unit_bytes: int = 0  # nm: bytes per packed unit of combination indices
    per_unit: int = 0  # nm: combination indices per unit
    aligned: bool = False  # gaps: codes are whole uint8/uint16 (gap + 1), not packed planes
    load_bytes: int = 0  # estimated bytes the folded rebuild nodes write at session start

    @property
    def format(self) -> str:
        return f"compact-{self.kind}"

    @property
    def bytes(self) -> int:
        """Estimated bytes in the model: payload plus rebuild graph."""
        return (self.payload_bytes + TENSOR_OVERHEAD[self.kind]
                + CHUNK_OVERHEAD[self.kind] * self.chunks)


# ---------------------------------------------------------------------------------------
# Chunks and planning


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


def _part_widths(width: int) -> list[int]:
    """`width` bits as byte-packable planes of 8, 4, 2 and 1 bits."""
    parts = []
    for part in _PART_WIDTHS:
        while width >= part:
            parts.append(part)
            width -= part
    return parts


def _gap_code_bytes(nnz: int, width: int) -> int:
    return sum(-(-nnz // (8 // part)) for part in _part_widths(width))


@dataclass
class _ChunkStats:
    numel: int
    nnz: int
    length_counts: np.ndarray  # [L] = gaps of bit length L (the first gap excluded)
    too_long: dict[int, int]  # aligned width -> gaps whose gap + 1 needs more bits


def _chunk_stats(chunk: np.ndarray) -> _ChunkStats:
    positions = np.flatnonzero(bits_of(chunk))
    counts = np.zeros(MAX_GAP_WIDTH + 2, np.int64)
    too_long = dict.fromkeys(_ALIGNED_WIDTHS, 0)
    if positions.size > 1:
        gaps = np.diff(positions) - 1
        # frexp's exponent of a positive integer is its bit length (0 for 0), exactly
        lengths = np.frexp(gaps.astype(np.float64))[1]
        counts += np.bincount(lengths, minlength=MAX_GAP_WIDTH + 2)[:MAX_GAP_WIDTH + 2]
        too_long = {w: int(np.count_nonzero(gaps >= (1 << w) - 1)) for w in _ALIGNED_WIDTHS}
    return _ChunkStats(chunk.size, int(positions.size), counts, too_long)


def unstructured_plans(chunks: list[np.ndarray]) -> list[Plan]:
    """The zeros, best packed gaps, aligned gaps and bitmask plans for these chunks."""
    stats = [_chunk_stats(c) for c in chunks]
    itemsize = chunks[0].dtype.itemsize
    numel = sum(s.numel for s in stats)
    nnz = sum(s.nnz for s in stats)
    if nnz == 0:
        return [Plan("zeros", 0, len(chunks), load_bytes=numel * itemsize)]
    values = nnz * itemsize
    # every gaps rebuild writes zeros, the scattered values and their reshape (numel each)
    # and the int32 positions and their cumulative sum (nnz each)
    gaps_load = 3 * numel * itemsize + 8 * nnz
    plans = []
    best = None
    for width in range(1, MAX_GAP_WIDTH + 1):
        # exceptions: gaps longer than `width` bits, plus the first gap of every chunk
        exceptions = sum(int(s.length_counts[width + 1:].sum()) + (1 if s.nnz else 0)
                         for s in stats)
        codes = sum(_gap_code_bytes(s.nnz, width) for s in stats)
        # per plane: a table lookup, its reshape and slice, and a sum (int32, nnz each)
        load = gaps_load + 4 * nnz * (1 + 4 * len(_part_widths(width)))
        candidate = Plan("gaps", values + codes + 8 * exceptions, len(chunks), width=width,
                         load_bytes=load)
        if best is None or candidate.bytes < best.bytes:
            best = candidate
    plans.append(best)
    for width in _ALIGNED_WIDTHS:
        exceptions = sum(s.too_long[width] + (1 if s.nnz else 0) for s in stats)
        # the Cast of the codes and the exceptions written over them (int32, nnz each)
        plans.append(Plan("gaps", values + nnz * width // 8 + 8 * exceptions, len(chunks),
                          width=width, aligned=True, load_bytes=gaps_load + 8 * nnz))
    bitmask = values + sum(-(-s.numel // 8) + itemsize for s in stats)
    # unpacked bits, their reshape, cumulative sum and product (int32), gather and reshape
    plans.append(Plan("bitmask", bitmask, len(chunks),
                      load_bytes=16 * numel + 2 * numel * itemsize))
    return plans


def choose_plan(plans: list[Plan]) -> Plan:
    """The smallest plan, or one within LOAD_SLACK of it whose rebuild writes less."""
    smallest = min(plans, key=lambda p: p.bytes)
    close = [p for p in plans if p.bytes <= smallest.bytes * (1 + LOAD_SLACK)]
    return min(close, key=lambda p: (p.load_bytes, p.bytes))


def _combinations(n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Keys (bit sets) of the N-of-M combinations in lexicographic order, and the table
    table[c, j] = rank of position j among the kept positions of c, or n if not kept."""
    combos = list(itertools.combinations(range(m), n))
    keys = np.array([sum(1 << j for j in combo) for combo in combos], np.int64)
    table = np.full((len(combos), m), n, np.uint8)
    for index, combo in enumerate(combos):
        for rank, position in enumerate(combo):
            table[index, position] = rank
    return keys, table


def _units_for(combinations: int, groups: int) -> tuple[int, int]:
    """(bytes per unit, combination indices per unit) that store `groups` indices smallest."""
    best = None
    for unit_bytes in (1, 2, 4):
        per_unit = 0
        while combinations ** (per_unit + 1) <= 2 ** (8 * unit_bytes):
            per_unit += 1
        if per_unit == 0:
            continue
        size = -(-groups // per_unit) * unit_bytes
        if best is None or size < best[0]:
            best = (size, unit_bytes, per_unit)
    if best is None:
        raise ValueError(f"{combinations} combinations do not fit 4 bytes")
    return best[1], best[2]


def nm_plan(chunks: list[np.ndarray], reduction_axis: int, n: int, m: int) -> Plan | None:
    """The N:M plan, or None when a group holds more than n non-zeros or M is too large."""
    if m > 16 or math.comb(m, n) > MAX_NM_TABLE_ROWS:
        return None
    combinations = math.comb(m, n)
    unit_bytes, per_unit = _units_for(combinations, chunks[0].size // m)
    payload = combinations * m  # the table
    for chunk in chunks:
        if chunk.shape[reduction_axis] % m:
            return None
        mask = _group_mask(chunk, reduction_axis, m)
        if mask.sum(axis=1).max(initial=0) > n:
            return None
        groups = mask.shape[0]
        payload += groups * n * chunk.dtype.itemsize + -(-groups // per_unit) * unit_bytes
    numel = sum(c.size for c in chunks)
    # the spread digits and value-row indices (int32), then the gathered weights
    return Plan("nm", payload, len(chunks), n=n, m=m, unit_bytes=unit_bytes,
                per_unit=per_unit, load_bytes=8 * numel + numel * chunks[0].dtype.itemsize)


def _matrix(chunk: np.ndarray, reduction_axis: int) -> np.ndarray:
    """[rows, reduction] view with the reduction axis last (a copy when it is not)."""
    moved = np.moveaxis(chunk, reduction_axis, -1)
    return np.ascontiguousarray(moved).reshape(-1, chunk.shape[reduction_axis])


def _group_mask(chunk: np.ndarray, reduction_axis: int, m: int) -> np.ndarray:
    groups = _matrix(chunk, reduction_axis).reshape(-1, m)
    return bits_of(groups).reshape(groups.shape) != 0


# ---------------------------------------------------------------------------------------
# Encoding: one chunk -> payload arrays


@dataclass
class Payload:
    """The arrays one chunk is stored as, and what its rebuild needs to know."""

    kind: str
    shape: tuple[int, ...]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    params: dict = field(default_factory=dict)


def encode_chunk(chunk: np.ndarray, plan: Plan, reduction_axis: int | None) -> Payload:
    shape = tuple(int(d) for d in chunk.shape)
    bits = bits_of(chunk)
    if plan.kind == "zeros" or not bits.any():
        return Payload("zeros", shape, params={"nnz": 0})
    if plan.kind == "gaps" and plan.aligned:
        return _encode_aligned_gaps(chunk, bits, plan.width)
    if plan.kind == "gaps":
        return _encode_gaps(chunk, bits, plan.width)
    if plan.kind == "bitmask":
        return _encode_bitmask(chunk, bits)
    return _encode_nm(chunk, reduction_axis, plan)


def _encode_gaps(chunk: np.ndarray, bits: np.ndarray, width: int) -> Payload:
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
    for index, part in enumerate(_part_widths(width)):
        arrays[f"plane{index}"] = _pack((low >> shift) & ((1 << part) - 1), part)
        shift += part
    return Payload("gaps", tuple(chunk.shape), arrays, {"nnz": int(values.size)})


def _encode_aligned_gaps(chunk: np.ndarray, bits: np.ndarray, width: int) -> Payload:
    """Codes gap + 1 as uint8/uint16; the first code and those too long are exceptions,
    stored as (index, code) and written over a zero code by the rebuild."""
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


def _encode_bitmask(chunk: np.ndarray, bits: np.ndarray) -> Payload:
    mask = bits != 0
    values = np.concatenate([np.zeros(1, chunk.dtype), chunk.reshape(-1)[mask]])
    return Payload("bitmask", tuple(chunk.shape),
                   {"values": values, "bits": np.packbits(mask, bitorder="little")},
                   {"nnz": int(values.size - 1)})


def _encode_nm(chunk: np.ndarray, reduction_axis: int, plan: Plan) -> Payload:
    """N values and one combination index per group.

    With the reduction axis first (MatMul B [K, N]) the chunk is kept as [L, S] (L along
    the reduction axis, S the rest): values as rows (group, rank) x S plus a zero row, and
    indices [L/M, S] packed along S, so the rebuild writes the stored layout directly.
    Otherwise groups are rows of the [rest, L] matrix and the rebuild transposes back.
    """
    n, m = plan.n, plan.m
    groups = _matrix(chunk, reduction_axis).reshape(-1, m)
    mask = bits_of(groups).reshape(groups.shape) != 0
    counts = mask.sum(axis=1)
    if counts.max(initial=0) > n:
        raise ValueError(f"tensor is not {n}:{m} along axis {reduction_axis}")
    for column in range(m):  # complete short groups with their first zero positions
        add = (counts < n) & ~mask[:, column]
        mask[:, column] |= add
        counts += add
    keys, _ = _combinations(n, m)
    lookup = np.full(1 << m, -1, np.int64)
    lookup[keys] = np.arange(keys.size)
    digits = lookup[mask.astype(np.int64) @ (np.int64(1) << np.arange(m, dtype=np.int64))]
    values = groups[mask].reshape(-1, n)
    nnz = int(np.count_nonzero(bits_of(values)))
    if reduction_axis == 0:
        length = chunk.shape[0]
        rest = chunk.size // length
        # matrix groups run over (s, g); the rows layout wants (g, s)
        digits = digits.reshape(rest, length // m).T
        values = values.reshape(rest, length // m, n).transpose(1, 2, 0).reshape(-1, rest)
        values = np.concatenate([values, np.zeros((1, rest), chunk.dtype)])
        units = _pack_digits(digits, keys.size, plan)
        return Payload("nm", tuple(chunk.shape), {"values": np.ascontiguousarray(values),
                                                  "units": units},
                       {"nnz": nnz, "layout": "rows"})
    return Payload("nm", tuple(chunk.shape),
                   {"values": values, "units": _pack_digits(digits[None, :], keys.size,
                                                            plan).reshape(-1)},
                   {"nnz": nnz, "layout": "matrix", "groups": int(digits.size)})


def _pack_digits(digits: np.ndarray, combinations: int, plan: Plan) -> np.ndarray:
    """Rows of digits packed `per_unit` to a unit (base `combinations`) along each row."""
    per_unit = plan.per_unit
    rows, columns = digits.shape
    padded = np.zeros((rows, -(-columns // per_unit) * per_unit), np.int64)
    padded[:, :columns] = digits
    powers = np.int64(combinations) ** np.arange(per_unit, dtype=np.int64)
    units = (padded.reshape(rows, -1, per_unit) * powers).sum(axis=2)
    return units.astype({1: np.uint8, 2: np.uint16, 4: np.uint32}[plan.unit_bytes])


# ---------------------------------------------------------------------------------------
# The rebuild graph


class TensorBuilder:
    """The nodes and initializers that rebuild one tensor, all named under `prefix`.

    Small constants are shared by content and the byte tables built once, so a chunk
    costs little more than its payload and its own few nodes.
    """

    def __init__(self, prefix: str, plan: Plan, data_type: int, reduction_axis: int | None,
                 opset: int | None = None):
        self.prefix = prefix
        self.plan = plan
        self.data_type = data_type
        self.reduction_axis = reduction_axis
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._constants: dict[tuple, str] = {}
        self._tables: dict[tuple, str] = {}
        self._values = 0

    def payload(self, field_name: str, array: np.ndarray) -> str:
        name = f"{self.prefix}/{field_name}"
        self.initializers.append(make_tensor(name, array))
        return name

    def const(self, array) -> str:
        array = np.asarray(array)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            self._constants[key] = self.payload(f"k{len(self._constants)}", array)
        return self._constants[key]

    def op(self, op_type: str, inputs: list[str], output: str | None = None, **attrs) -> str:
        if output is None:
            output = f"{self.prefix}/v{self._values}"
            self._values += 1
        self.nodes.append(helper.make_node(op_type, inputs, [output], **attrs))
        return output

    def byte_table(self, part: int, shift: int, plus: int) -> str:
        """[256, 8/part] int32: code t of byte b is ((b >> part*t) & mask) << shift, + plus."""
        key = (part, shift, plus)
        if key in self._tables:
            return self._tables[key]
        per_byte = 8 // part
        table = self.op("Reshape", [self._byte_range(), self.const(np.array([-1, 1],
                                                                             np.int64))])
        if part < 8:
            table = self.op("Div", [table, self.const((1 << (part * np.arange(per_byte)))
                                                      .astype(np.int32))])
            table = self.op("Mod", [table, self.const(np.int32(1 << part))])
        if shift:
            table = self.op("Mul", [table, self.const(np.int32(1 << shift))])
        if plus:
            table = self.op("Add", [table, self.const(np.int32(plus))])
        self._tables[key] = table
        return table

    def zeros(self, shape: list[int], output: str | None = None) -> str:
        """A zero tensor of the weight's type. ConstantOfShape takes bfloat16 only from
        opset 20 on; before that, bfloat16 zeros are gathered from one stored zero."""
        if self.data_type != TensorProto.BFLOAT16 or (self.opset or 0) >= 20:
            return self.op("ConstantOfShape", [self.const(np.array(shape, np.int64))], output,
                           value=zero_value(self.data_type))
        if ("zero",) not in self._tables:
            self._tables[("zero",)] = self.payload("zero", np.zeros(1, BFLOAT16))
        # GatherElements wants every index dim but the axis within the data's dims
        index = self.op("ConstantOfShape", [self.const(np.array([math.prod(shape)], np.int64))],
                        value=zero_value(TensorProto.INT32))
        if len(shape) == 1:
            return self.op("GatherElements", [self._tables[("zero",)], index], output, axis=0)
        flat = self.op("GatherElements", [self._tables[("zero",)], index], axis=0)
        return self.op("Reshape", [flat, self.const(np.array(shape, np.int64))], output)

    def _byte_range(self) -> str:
        if ("range",) not in self._tables:
            self._tables[("range",)] = self.op("Range", [self.const(np.int32(0)),
                                                         self.const(np.int32(256)),
                                                         self.const(np.int32(1))])
        return self._tables[("range",)]

    def unpack(self, packed: str, table: str, count: int, stored: int) -> str:
        """Look every byte up in `table`, flatten, and cut the padding to `count` codes."""
        codes = self.op("Gather", [table, self.op("Cast", [packed], to=TensorProto.INT32)])
        flat = self.op("Reshape", [codes, self.const(np.array([-1], np.int64))])
        if stored == count:
            return flat
        return self.op("Slice", [flat, self.const(np.array([0], np.int64)),
                                 self.const(np.array([count], np.int64))])

    def chunk(self, number: int, payload: Payload, output: str) -> None:
        """Add the rebuild of one chunk, writing `output`."""
        names = {key: self.payload(f"c{number}/{key}", array)
                 for key, array in payload.arrays.items()}
        shape = self.const(np.array(payload.shape, np.int64))
        if payload.kind == "zeros":
            self.zeros(list(payload.shape), output)
        elif payload.kind == "gaps":
            self._gaps(payload, names, shape, output)
        elif payload.kind == "bitmask":
            self._bitmask(payload, names, shape, output)
        else:
            self._nm(payload, names, output)

    def _gaps(self, payload: Payload, names: dict, shape: str, output: str) -> None:
        nnz = payload.params["nnz"]
        if self.plan.aligned:
            steps = self.op("ScatterElements", [
                self.op("Cast", [names["codes"]], to=TensorProto.INT32),
                names["exception_index"], names["exception_value"]])
            self._scatter(steps, names["values"], payload, shape, output)
            return
        total = self.op("ScatterElements", [
            self.op("ConstantOfShape", [self.const(np.array([nnz], np.int64))],
                    value=zero_value(TensorProto.INT32)),
            names["exception_index"], names["exception_value"]])
        shift = 0
        for index, part in enumerate(_part_widths(self.plan.width)):
            table = self.byte_table(part, shift, 1 if index == 0 else 0)
            stored = payload.arrays[f"plane{index}"].size * (8 // part)
            total = self.op("Add", [total, self.unpack(names[f"plane{index}"], table, nnz,
                                                       stored)])
            shift += part
        self._scatter(total, names["values"], payload, shape, output)

    def _scatter(self, steps: str, values: str, payload: Payload, shape: str,
                 output: str) -> None:
        """Values into zeros at the cumulative sums of `steps` (gap + 1 each)."""
        positions = self.op("CumSum", [steps, self.const(np.int32(0))])
        numel = math.prod(payload.shape)
        flat = self.op("ScatterElements", [self.zeros([numel]), positions, values])
        self.op("Reshape", [flat, shape], output)

    def _bitmask(self, payload: Payload, names: dict, shape: str, output: str) -> None:
        numel = math.prod(payload.shape)
        mask = self.unpack(names["bits"], self.byte_table(1, 0, 0), numel,
                           payload.arrays["bits"].size * 8)
        rank = self.op("CumSum", [mask, self.const(np.int32(0))])
        index = self.op("Mul", [rank, mask])
        flat = self.op("GatherElements", [names["values"], index], axis=0)
        self.op("Reshape", [flat, shape], output)

    def _nm(self, payload: Payload, names: dict, output: str) -> None:
        units = payload.arrays["units"]
        digits = self._unit_digits(names["units"])  # [..., units, per_unit]
        shape = [-1] if units.ndim == 1 else [units.shape[0], -1]
        digits = self.op("Reshape", [digits, self.const(np.array(shape, np.int64))])
        if payload.params["layout"] == "rows":
            self._nm_rows(payload, names, digits, output)
        else:
            self._nm_matrix(payload, names, digits, output)

    def _unit_digits(self, units: str) -> str:
        """The base-C(M, N) digits of every packed unit: one row lookup per 1- or 2-byte
        unit in a table the graph builds once (broadcast Div/Mod is several times slower),
        Div/Mod for 4-byte units."""
        plan = self.plan
        combinations = math.comb(plan.m, plan.n)
        powers = np.int64(combinations) ** np.arange(plan.per_unit, dtype=np.int64)
        if plan.unit_bytes == 4:
            column = self.op("Reshape", [
                self.op("Cast", [units], to=TensorProto.INT64),
                self.const(np.array([-1, 1], np.int64))])
            return self.op("Mod", [self.op("Div", [column, self.const(powers)]),
                                   self.const(np.int64(combinations))])
        key = ("digits",)
        if key not in self._tables:
            size = 1 << (8 * plan.unit_bytes)
            every = self.op("Range", [self.const(np.int32(0)), self.const(np.int32(size)),
                                      self.const(np.int32(1))])
            every = self.op("Reshape", [every, self.const(np.array([-1, 1], np.int64))])
            self._tables[key] = self.op("Mod", [
                self.op("Div", [every, self.const(powers.astype(np.int32))]),
                self.const(np.int32(combinations))])
        return self.op("Gather", [self._tables[key],
                                  self.op("Cast", [units], to=TensorProto.INT32)])

    def _nm_rows(self, payload: Payload, names: dict, digits: str, output: str) -> None:
        """[L, S] chunk: out[l, s] = values[A[l, digit[l // M, s]], s]."""
        plan = self.plan
        length = payload.shape[0]
        rest = math.prod(payload.shape[1:])
        units = payload.arrays["units"]
        if units.shape[1] * plan.per_unit != rest:
            digits = self.op("Slice", [digits, self.const(np.array([0], np.int64)),
                                       self.const(np.array([rest], np.int64)),
                                       self.const(np.array([1], np.int64))])
        spread = self.op("Gather", [digits, self._group_of_row(length)], axis=0)
        rows = self.op("GatherElements", [self._row_table(length), spread], axis=1)
        if len(payload.shape) == 2:
            self.op("GatherElements", [names["values"], rows], output, axis=0)
            return
        flat = self.op("GatherElements", [names["values"], rows], axis=0)
        self.op("Reshape", [flat, self.const(np.array(payload.shape, np.int64))], output)

    def _group_of_row(self, length: int) -> str:
        """[length] int32: l // M."""
        key = ("group_of_row", length)
        if key not in self._tables:
            rows = self.op("Range", [self.const(np.int32(0)), self.const(np.int32(length)),
                                     self.const(np.int32(1))])
            self._tables[key] = self.op("Div", [rows, self.const(np.int32(self.plan.m))])
        return self._tables[key]

    def _row_table(self, length: int) -> str:
        """[length, C(M, N)] int32: the value row that row l reads for each combination:
        (l // M) * N + rank of l % M in the combination, or the zero row if not kept."""
        key = ("row_table", length)
        if key in self._tables:
            return self._tables[key]
        n, m = self.plan.n, self.plan.m
        by_position = self.op("Transpose", [self._nm_table()], perm=[1, 0])  # [M, C]
        ranks = self.op("Tile", [by_position, self.const(np.array([length // m, 1], np.int64))])
        base = self.op("Mul", [self._group_of_row(length), self.const(np.int32(n))])
        base = self.op("Reshape", [base, self.const(np.array([-1, 1], np.int64))])
        rows = self.op("Add", [ranks, base])
        kept = self.op("Less", [ranks, self.const(np.int32(n))])
        zero_row = self.const(np.int32(length // m * n))
        self._tables[key] = self.op("Where", [kept, rows, zero_row])
        return self._tables[key]

    def _nm_matrix(self, payload: Payload, names: dict, digits: str, output: str) -> None:
        """Groups are rows of the [rest, L] matrix; gather, then transpose back."""
        axis = self.reduction_axis
        groups = payload.params["groups"]
        if payload.arrays["units"].size * self.plan.per_unit != groups:
            digits = self.op("Slice", [digits, self.const(np.array([0], np.int64)),
                                       self.const(np.array([groups], np.int64))])
        index = self.op("Gather", [self._nm_table(), digits])
        values = self.op("Concat", [names["values"], self.zeros([groups, 1])], axis=1)
        grouped = self.op("GatherElements", [values, index], axis=1)
        shape = list(payload.shape)
        rank = len(shape)
        if axis == rank - 1:
            self.op("Reshape", [grouped, self.const(np.array(shape, np.int64))], output)
            return
        moved = [d for i, d in enumerate(shape) if i != axis] + [shape[axis]]
        matrix = self.op("Reshape", [grouped, self.const(np.array(moved, np.int64))])
        perm = [i if i < axis else (rank - 1 if i == axis else i - 1) for i in range(rank)]
        self.op("Transpose", [matrix], output, perm=perm)

    def _nm_table(self) -> str:
        if ("nm",) not in self._tables:
            _, table = _combinations(self.plan.n, self.plan.m)
            self._tables[("nm",)] = self.op("Cast", [self.payload("table", table)],
                                            to=TensorProto.INT32)
        return self._tables[("nm",)]


# ---------------------------------------------------------------------------------------
# numpy twin of the rebuild, for densify


def decode_chunk(meta: dict, number: int, chunk: dict, dtype: np.dtype,
                 read: Callable[[str], np.ndarray]) -> np.ndarray:
    """Rebuild chunk `number` of a compact tensor; `read(name)` gives payload arrays."""
    kind, (start, stop) = chunk["kind"], chunk["rows"]
    shape = (stop - start, *meta["shape"][1:])
    numel = math.prod(shape)
    out = np.zeros(numel, dtype)
    if kind == "zeros":
        return out.reshape(shape)

    def payload(key: str) -> np.ndarray:
        return read(f"{meta['prefix']}/c{number}/{key}")

    if kind == "gaps" and meta.get("codes") == "aligned":
        steps = payload("codes").astype(np.int64)
        steps[payload("exception_index").astype(np.int64)] = payload("exception_value")
        out[np.cumsum(steps)] = payload("values")
        return out.reshape(shape)
    if kind == "gaps":
        nnz = chunk["nnz"]
        total = np.zeros(nnz, np.int64)
        shift = 0
        for index, part in enumerate(_part_widths(meta["width"])):
            packed = payload(f"plane{index}").astype(np.int64)
            codes = (packed[:, None] >> (part * np.arange(8 // part))) & ((1 << part) - 1)
            total += codes.reshape(-1)[:nnz] << shift
            shift += part
        total += 1
        total[payload("exception_index").astype(np.int64)] += payload("exception_value")
        out[np.cumsum(total)] = payload("values")
        return out.reshape(shape)
    if kind == "bitmask":
        mask = np.unpackbits(payload("bits"), bitorder="little")[:numel].astype(bool)
        out[mask] = payload("values")[1:]
        return out.reshape(shape)
    n, m, per_unit, axis = meta["n"], meta["m"], meta["per_unit"], meta["axis"]
    _, table = _combinations(n, m)
    units = payload("units").astype(np.int64)
    powers = np.int64(table.shape[0]) ** np.arange(per_unit, dtype=np.int64)
    digits = (units[..., None] // powers) % table.shape[0]
    if chunk.get("layout", "matrix") == "rows":
        length, rest = shape[0], numel // shape[0]
        digits = digits.reshape(length // m, -1)[:, :rest]  # [L/M, S]
        ranks = table[digits]  # [L/M, S, M]: rank of each position, n if not kept
        rows = (np.arange(length // m)[:, None, None] * n + ranks).astype(np.int64)
        rows[ranks == n] = length // m * n  # the zero row
        values = payload("values")  # [(L/M) * n + 1, S]
        out = np.take_along_axis(values, rows.transpose(0, 2, 1).reshape(length, rest), axis=0)
        return out.reshape(shape)
    groups = numel // m
    digits = digits.reshape(-1)[:groups]
    values = np.concatenate([payload("values").reshape(groups, n),
                             np.zeros((groups, 1), dtype)], axis=1)
    grouped = np.take_along_axis(values, table[digits].astype(np.int64), axis=1)
    moved = [d for i, d in enumerate(shape) if i != axis] + [shape[axis]]
    return np.ascontiguousarray(np.moveaxis(grouped.reshape(moved), -1, axis))


def plan_meta(plan: Plan, reduction_axis: int | None) -> dict:
    """The plan parameters `decode_chunk` needs, for the tensor's JSON description."""
    if plan.kind == "gaps" and plan.aligned:
        return {"width": plan.width, "codes": "aligned"}
    if plan.kind == "gaps":
        return {"width": plan.width}
    if plan.kind == "nm":
        return {"n": plan.n, "m": plan.m, "per_unit": plan.per_unit, "axis": reduction_axis}
    return {}


def meta_doc(meta: dict) -> str:
    return f"{COMPACT_MARK} {json.dumps(meta, separators=(',', ':'))}"


def parse_meta(doc: str) -> dict | None:
    if not doc.startswith(COMPACT_MARK + " {"):
        return None
    try:
        return json.loads(doc[len(COMPACT_MARK) + 1:])
    except ValueError:
        return None
