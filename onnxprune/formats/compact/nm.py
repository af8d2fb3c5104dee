"""``compact-nm``: for tensors with at most N non-zeros in every group of M along the
reduction axis: N values per group + the index of the group's N-of-M combination, several
indices packed base C(M, N) into 1, 2 or 4 bytes (2:4: 2.67 bits per group)."""

from __future__ import annotations

import itertools
import math

import numpy as np
from onnx import TensorProto

from ..graphs import bits_of
from .base import Chunked, CompactForm, EncodingPlan, Payload, PayloadReader, register
from .builder import TensorBuilder

MAX_M = 16
MAX_NM_TABLE_ROWS = 1 << 14  # C(M, N) combinations, stored as a uint8 [rows, M] table


def combinations(n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Keys (bit sets) of the N-of-M combinations in lexicographic order, and the table
    table[c, j] = rank of position j among the kept positions of c, or n if not kept."""
    combos = list(itertools.combinations(range(m), n))
    keys = np.array([sum(1 << j for j in combo) for combo in combos], np.int64)
    table = np.full((len(combos), m), n, np.uint8)
    for index, combo in enumerate(combos):
        for rank, position in enumerate(combo):
            table[index, position] = rank
    return keys, table


def _units_for(count: int, groups: int) -> tuple[int, int]:
    """(bytes per unit, combination indices per unit) that store `groups` indices of
    `count` possible values in the fewest bytes."""
    best = None
    for unit_bytes in (1, 2, 4):
        per_unit = 0
        while count ** (per_unit + 1) <= 2 ** (8 * unit_bytes):
            per_unit += 1
        if per_unit == 0:
            continue
        size = -(-groups // per_unit) * unit_bytes
        if best is None or size < best[0]:
            best = (size, unit_bytes, per_unit)
    if best is None:
        raise ValueError(f"{count} combinations do not fit 4 bytes")
    return best[1], best[2]


def _matrix(chunk: np.ndarray, reduction_axis: int) -> np.ndarray:
    """[rows, reduction] view with the reduction axis last (a copy when it is not)."""
    moved = np.moveaxis(chunk, reduction_axis, -1)
    return np.ascontiguousarray(moved).reshape(-1, chunk.shape[reduction_axis])


def _nm_axis(reduction_axis: int | None) -> int:
    """The axis the groups run along: N:M is only ever asked for along a reduction axis."""
    if reduction_axis is None:
        raise ValueError("the N:M form needs the tensor's reduction axis")
    return reduction_axis


def _group_mask(chunk: np.ndarray, reduction_axis: int, m: int) -> np.ndarray:
    groups = _matrix(chunk, reduction_axis).reshape(-1, m)
    return bits_of(groups).reshape(groups.shape) != 0


def _pack_digits(digits: np.ndarray, count: int, plan: EncodingPlan) -> np.ndarray:
    """Rows of digits packed `per_unit` to a unit (base `count`) along each row."""
    per_unit = plan.per_unit
    rows, columns = digits.shape
    padded = np.zeros((rows, -(-columns // per_unit) * per_unit), np.int64)
    padded[:, :columns] = digits
    powers = np.int64(count) ** np.arange(per_unit, dtype=np.int64)
    units = (padded.reshape(rows, -1, per_unit) * powers).sum(axis=2)
    return units.astype({1: np.uint8, 2: np.uint16, 4: np.uint32}[plan.unit_bytes])


@register
class NMForm(CompactForm):
    name = kind = "nm"
    tensor_overhead = 900
    chunk_overhead = 700

    def plans(self, tensor: Chunked) -> list[EncodingPlan]:
        """The N:M plan; none when the pattern is not N:M, a group holds more than N
        non-zeros, or M is too large."""
        if tensor.nm is None:
            return []
        n, m = tensor.nm
        chunks, reduction_axis = tensor.chunks, tensor.reduction_axis
        if m > MAX_M or math.comb(m, n) > MAX_NM_TABLE_ROWS:
            return []
        count = math.comb(m, n)
        unit_bytes, per_unit = _units_for(count, chunks[0].size // m)
        payload = count * m  # the table
        reduction_axis = _nm_axis(reduction_axis)
        for chunk in chunks:
            if chunk.shape[reduction_axis] % m:
                return []
            mask = _group_mask(chunk, reduction_axis, m)
            if mask.sum(axis=1).max(initial=0) > n:
                return []
            groups = mask.shape[0]
            payload += tensor.value_bytes(groups * n) + -(-groups // per_unit) * unit_bytes
        numel = tensor.numel
        # the spread digits and value-row indices (int32), then the gathered weights
        return [EncodingPlan("nm", payload, len(chunks), n=n, m=m, unit_bytes=unit_bytes,
                             per_unit=per_unit, load_bytes=8 * numel + numel * tensor.itemsize)]

    def meta(self, plan: EncodingPlan, reduction_axis: int | None) -> dict:
        return {"n": plan.n, "m": plan.m, "per_unit": plan.per_unit, "axis": reduction_axis}

    # ------------------------------------------------------------------------ encode

    def encode(self, chunk: np.ndarray, bits: np.ndarray, plan: EncodingPlan,
               reduction_axis: int | None) -> Payload:
        """N values and one combination index per group.

        With the reduction axis first (MatMul B [K, N]) the chunk is kept as [L, S] (L along
        the reduction axis, S the rest): values as rows (group, rank) x S plus a zero row,
        and indices [L/M, S] packed along S, so the rebuild writes the stored layout
        directly. Otherwise groups are rows of the [rest, L] matrix and the rebuild
        transposes back.
        """
        n, m = plan.n, plan.m
        reduction_axis = _nm_axis(reduction_axis)
        groups = _matrix(chunk, reduction_axis).reshape(-1, m)
        mask = bits_of(groups).reshape(groups.shape) != 0
        counts = mask.sum(axis=1)
        if counts.max(initial=0) > n:
            raise ValueError(f"tensor is not {n}:{m} along axis {reduction_axis}")
        for column in range(m):  # complete short groups with their first zero positions
            add = (counts < n) & ~mask[:, column]
            mask[:, column] |= add
            counts += add
        keys, _ = combinations(n, m)
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

    # ------------------------------------------------------------------------ rebuild

    def build(self, builder: TensorBuilder, payload: Payload, names: dict[str, str],
              shape: str, output: str) -> None:
        units = payload.arrays["units"]
        digits = self._unit_digits(builder, names["units"])  # [..., units, per_unit]
        digits_shape = [-1] if units.ndim == 1 else [units.shape[0], -1]
        digits = builder.op("Reshape", [digits, builder.const(np.array(digits_shape,
                                                                       np.int64))])
        if payload.params["layout"] == "rows":
            self._rows(builder, payload, names, digits, output)
        else:
            self._matrix(builder, payload, names, digits, output)

    @staticmethod
    def _unit_digits(builder: TensorBuilder, units: str) -> str:
        """The base-C(M, N) digits of every packed unit: one row lookup per 1- or 2-byte
        unit in a table the graph builds once (broadcast Div/Mod is several times slower),
        Div/Mod for 4-byte units."""
        plan = builder.plan
        count = math.comb(plan.m, plan.n)
        powers = np.int64(count) ** np.arange(plan.per_unit, dtype=np.int64)
        if plan.unit_bytes == 4:
            column = builder.op("Reshape", [
                builder.op("Cast", [units], to=TensorProto.INT64),
                builder.const(np.array([-1, 1], np.int64))])
            return builder.op("Mod", [builder.op("Div", [column, builder.const(powers)]),
                                      builder.const(np.int64(count))])

        def digit_table() -> str:
            size = 1 << (8 * plan.unit_bytes)
            every = builder.op("Range", [builder.const(np.int32(0)),
                                         builder.const(np.int32(size)),
                                         builder.const(np.int32(1))])
            every = builder.op("Reshape", [every, builder.const(np.array([-1, 1], np.int64))])
            return builder.op("Mod", [
                builder.op("Div", [every, builder.const(powers.astype(np.int32))]),
                builder.const(np.int32(count))])

        table = builder.table(("digits",), digit_table)
        return builder.op("Gather", [table, builder.op("Cast", [units], to=TensorProto.INT32)])

    def _rows(self, builder: TensorBuilder, payload: Payload, names: dict[str, str],
              digits: str, output: str) -> None:
        """[L, S] chunk: out[l, s] = values[A[l, digit[l // M, s]], s]."""
        plan = builder.plan
        length = payload.shape[0]
        rest = math.prod(payload.shape[1:])
        units = payload.arrays["units"]
        if units.shape[1] * plan.per_unit != rest:
            digits = builder.op("Slice", [digits, builder.const(np.array([0], np.int64)),
                                          builder.const(np.array([rest], np.int64)),
                                          builder.const(np.array([1], np.int64))])
        spread = builder.op("Gather", [digits, self._group_of_row(builder, length)], axis=0)
        rows = builder.op("GatherElements", [self._row_table(builder, length), spread], axis=1)
        if len(payload.shape) == 2:
            builder.op("GatherElements", [names["values"], rows], output, axis=0)
            return
        flat = builder.op("GatherElements", [names["values"], rows], axis=0)
        builder.op("Reshape", [flat, builder.const(np.array(payload.shape, np.int64))], output)

    @staticmethod
    def _group_of_row(builder: TensorBuilder, length: int) -> str:
        """[length] int32: l // M."""
        def make() -> str:
            rows = builder.op("Range", [builder.const(np.int32(0)),
                                        builder.const(np.int32(length)),
                                        builder.const(np.int32(1))])
            return builder.op("Div", [rows, builder.const(np.int32(builder.plan.m))])

        return builder.table(("group_of_row", length), make)

    def _row_table(self, builder: TensorBuilder, length: int) -> str:
        """[length, C(M, N)] int32: the value row that row l reads for each combination:
        (l // M) * N + rank of l % M in the combination, or the zero row if not kept."""
        def make() -> str:
            n, m = builder.plan.n, builder.plan.m
            by_position = builder.op("Transpose", [self._table(builder)], perm=[1, 0])  # [M, C]
            ranks = builder.op("Tile", [by_position,
                                        builder.const(np.array([length // m, 1], np.int64))])
            base = builder.op("Mul", [self._group_of_row(builder, length),
                                      builder.const(np.int32(n))])
            base = builder.op("Reshape", [base, builder.const(np.array([-1, 1], np.int64))])
            rows = builder.op("Add", [ranks, base])
            kept = builder.op("Less", [ranks, builder.const(np.int32(n))])
            zero_row = builder.const(np.int32(length // m * n))
            return builder.op("Where", [kept, rows, zero_row])

        return builder.table(("row_table", length), make)

    def _matrix(self, builder: TensorBuilder, payload: Payload, names: dict[str, str],
                digits: str, output: str) -> None:
        """Groups are rows of the [rest, L] matrix; gather, then transpose back."""
        axis = _nm_axis(builder.reduction_axis)
        groups = payload.params["groups"]
        if payload.arrays["units"].size * builder.plan.per_unit != groups:
            digits = builder.op("Slice", [digits, builder.const(np.array([0], np.int64)),
                                          builder.const(np.array([groups], np.int64))])
        index = builder.op("Gather", [self._table(builder), digits])
        values = builder.op("Concat", [names["values"], builder.zeros([groups, 1])], axis=1)
        grouped = builder.op("GatherElements", [values, index], axis=1)
        shape = list(payload.shape)
        rank = len(shape)
        if axis == rank - 1:
            builder.op("Reshape", [grouped, builder.const(np.array(shape, np.int64))], output)
            return
        moved = [d for i, d in enumerate(shape) if i != axis] + [shape[axis]]
        matrix = builder.op("Reshape", [grouped, builder.const(np.array(moved, np.int64))])
        perm = [i if i < axis else (rank - 1 if i == axis else i - 1) for i in range(rank)]
        builder.op("Transpose", [matrix], output, perm=perm)

    @staticmethod
    def _table(builder: TensorBuilder) -> str:
        """The combination table [C(M, N), M] as int32, stored once per tensor."""
        def make() -> str:
            _, table = combinations(builder.plan.n, builder.plan.m)
            return builder.op("Cast", [builder.payload("table", table)], to=TensorProto.INT32)

        return builder.table(("nm",), make)

    # ------------------------------------------------------------------------ decode

    def decode(self, meta: dict, chunk: dict, shape: tuple[int, ...], dtype: np.dtype,
               payload: PayloadReader) -> np.ndarray:
        numel = math.prod(shape)
        n, m, per_unit, axis = meta["n"], meta["m"], meta["per_unit"], meta["axis"]
        _, table = combinations(n, m)
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
            out = np.take_along_axis(values, rows.transpose(0, 2, 1).reshape(length, rest),
                                     axis=0)
            return out.reshape(shape)
        groups = numel // m
        digits = digits.reshape(-1)[:groups]
        values = np.concatenate([payload("values").reshape(groups, n),
                                 np.zeros((groups, 1), dtype)], axis=1)
        grouped = np.take_along_axis(values, table[digits].astype(np.int64), axis=1)
        moved = [d for i, d in enumerate(shape) if i != axis] + [shape[axis]]
        return np.ascontiguousarray(np.moveaxis(grouped.reshape(moved), -1, axis))
