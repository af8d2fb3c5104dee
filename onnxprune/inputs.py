"""Feeds for onnxruntime: the graph's real inputs, synthetic values, and `.npz` files.

An `.npz` holds arrays keyed by graph input name. An array with one more axis than its
input holds samples stacked on a new leading axis (sample i = `arr[i]`); an array of the
input's own rank is a single sample. A folder holds one such `.npz` per sample (a file may
also stack several); its files are read in name order.
"""

from __future__ import annotations

import logging
import os
import re
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper

from .errors import CalibrationError, ConfigError

log = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]
Dim = int | str | None

_FLOAT_TYPES = frozenset({
    TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16,
    TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E4M3FNUZ, TensorProto.FLOAT8E5M2,
    TensorProto.FLOAT8E5M2FNUZ,
})
_INT_TYPES = frozenset({
    TensorProto.INT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT64,
    TensorProto.UINT8, TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64,
})
# Ops whose first input's values reach their output unchanged (only moved, repeated or
# retyped), so a Gather behind them still bounds integer ids fed into them.
_ID_PRESERVING_OPS = frozenset({"Cast", "Identity", "Reshape", "Unsqueeze", "Squeeze",
                                "Flatten", "Transpose", "Slice", "Expand", "Tile", "Gather"})
# Ops whose output has the shape of their first input: a Gather table behind them (a
# quantized or cast embedding) still has the constant's row count.
_SHAPE_PRESERVING_OPS = frozenset({"Cast", "Identity", "DequantizeLinear"})
# The only silent dtype conversions for user data: lossless or what exporters routinely mean.
_ALLOWED_CASTS = {
    (np.dtype(np.int32), np.dtype(np.int64)),
    (np.dtype(np.float64), np.dtype(np.float32)),
}

DEFAULT_DIM = 16
DEFAULT_BATCH_DIM = 1
INT_HIGH = 100  # synthetic integers lie in [0, INT_HIGH) unless a lookup table bounds them
# A synthetic mask row is 1 up to a random length, then 0 (padding); at most this fraction
# of a row is padding, so no row is masked out entirely.
MASK_MAX_PADDING = 0.25
# Names exporters invent for dimensions they know nothing about: treat them as unnamed.
_AUTO_DIM_NAME = re.compile(r"^(unk__\d+|\?|)$")
# One NAME:[d0,d1,...] of --input-shapes; the name is the shortest run before ":[".
_INPUT_SHAPE = re.compile(r"\s*(\S+?):\[([^\[\]]*)\]")


@dataclass(frozen=True)
class InputSpec:
    """One graph input: name, numpy dtype, and shape (int static, str named, None unnamed:
    no name, an exporter's placeholder name such as `unk__3` or `?`, or -1).

    `shape` is None when the model does not state the rank.
    """

    name: str
    elem_type: int
    dtype: np.dtype
    shape: tuple[Dim, ...] | None

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    def shape_text(self) -> str:
        if self.shape is None:
            return "unknown shape"
        return "[" + ", ".join("?" if d is None else str(d) for d in self.shape) + "]"


def graph_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs a caller must feed, in graph order (initializers listed as inputs excluded)."""
    initializer_names = {t.name for t in model.graph.initializer}
    initializer_names.update(t.values.name for t in model.graph.sparse_initializer)
    specs = []
    for value in model.graph.input:
        if value.name in initializer_names:
            continue
        if value.type.WhichOneof("value") != "tensor_type":
            kind = value.type.WhichOneof("value") or "undefined"
            raise CalibrationError(f"input {value.name!r} is a {kind.replace('_type', '')}, "
                                   "not a tensor; only tensor inputs are supported")
        tensor_type = value.type.tensor_type
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        except (KeyError, ValueError, TypeError):
            raise CalibrationError(f"input {value.name!r} has an unknown element type "
                                   f"{tensor_type.elem_type}") from None
        shape = None
        if tensor_type.HasField("shape"):
            shape = tuple(_dim(d) for d in tensor_type.shape.dim)
        specs.append(InputSpec(value.name, tensor_type.elem_type, dtype, shape))
    return specs


def _dim(dim: onnx.TensorShapeProto.Dimension) -> Dim:
    if dim.HasField("dim_value"):
        # Some exporters (PaddlePaddle) write -1 for a dynamic dimension.
        return int(dim.dim_value) if dim.dim_value >= 0 else None
    if dim.HasField("dim_param") and not _AUTO_DIM_NAME.match(dim.dim_param):
        return dim.dim_param
    return None


def parse_dim_overrides(items: Iterable[str]) -> dict[str, int]:
    """`["batch=2", "seq=32"]` (or `"batch=2,seq=32"` in one item) -> `{"batch": 2, "seq": 32}`."""
    dims: dict[str, int] = {}
    for item in items:
        for part in str(item).split(","):
            name, sep, value = part.partition("=")
            name, value = name.strip(), value.strip()
            if not sep or not name:
                raise ConfigError(f"--dim expects name=value such as batch=1, got {part!r}")
            try:
                size = int(value)
            except ValueError:
                raise ConfigError(f"--dim {name}: size must be an integer, got {value!r}") from None
            if size < 1:
                raise ConfigError(f"--dim {name}: size must be at least 1, got {size}")
            if dims.get(name, size) != size:
                raise ConfigError(f"--dim {name} given twice with different sizes "
                                  f"({dims[name]} and {size})")
            dims[name] = size
    return dims


def parse_input_shapes(items: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """`["x:[1,3,224,224]", "ids:[1,128] mask:[1,128]"]` -> `{"x": (1, 3, 224, 224), ...}`.

    The convention of Polygraphy and trtexec: NAME:[d0,d1,...], several per item separated
    by spaces; `NAME:[]` is a scalar. A name may itself contain ':' (`input:0:[1,4]`).
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for item in items:
        text = str(item)
        position = 0
        while text[position:].strip():
            match = _INPUT_SHAPE.match(text, position)
            if match is None:
                raise ConfigError("--input-shapes expects NAME:[d0,d1,...] such as "
                                  f"x:[1,3,224,224], got {text[position:].strip()!r}")
            name, listed = match.group(1), match.group(2).strip()
            shape = tuple(_shape_size(name, part) for part in listed.split(",")) \
                if listed else ()
            if shapes.get(name, shape) != shape:
                raise ConfigError(f"--input-shapes {name} given twice with different shapes "
                                  f"({list(shapes[name])} and {list(shape)})")
            shapes[name] = shape
            position = match.end()
    return shapes


def _shape_size(name: str, text: str) -> int:
    try:
        size = int(text.strip())
    except ValueError:
        raise ConfigError(f"--input-shapes {name}: sizes must be integers, "
                          f"got {text.strip()!r}") from None
    if size < 0:
        raise ConfigError(f"--input-shapes {name}: sizes must not be negative, got {size}")
    return size


def synthetic_inputs(model: onnx.ModelProto, samples: int = 1, seed: int = 0,
                     dims: dict[str, int] | None = None,
                     input_shapes: dict[str, Sequence[int]] | None = None) -> list[Feed]:
    """`samples` random feeds for the model's inputs, the same for the same seed.

    Shapes: an input named in `input_shapes` takes that full shape (it must fit the model's
    rank and static sizes; the named dimensions it fixes apply to every input that shares
    them). Otherwise a dynamic dimension comes from `dims` (keyed by the dimension's name),
    else it is 1 when it looks like a batch (a batch-like name, a name used only on the first
    axis of inputs of rank 2 or more, or an unnamed first axis) and 16 otherwise.

    Values: floats are standard normal, booleans fair coin flips, integers lie in [0, 100)
    or, where the input indexes a Gather table (token ids), in [0, table rows). An integer
    or boolean input whose name contains "mask" (attention_mask) is a padding mask: each
    row is 1 up to a random length of at least 3/4 of the row, then 0.
    """
    if samples < 1:
        raise ConfigError(f"samples must be at least 1, got {samples}")
    specs = graph_inputs(model)
    dims = dict(dims or {})
    _check_dim_names(specs, dims)
    shapes = resolve_shapes(specs, dims, input_shapes)
    int_bounds = _gather_bounds(model.graph)
    rng = np.random.default_rng(seed)
    return [{spec.name: _random_array(spec, shapes[spec.name], int_bounds.get(spec.name), rng)
             for spec in specs}
            for _ in range(samples)]


def describe_feed(feed: Feed) -> str:
    """`x: float32[1, 3, 16, 16], sr: int64[]`, for messages about a feed."""
    return ", ".join(f"{name}: {array.dtype}{list(array.shape)}" for name, array in feed.items())


def _check_dim_names(specs: list[InputSpec], dims: dict[str, int]) -> None:
    known = {d for spec in specs for d in (spec.shape or ()) if isinstance(d, str)}
    unknown = sorted(set(dims) - known)
    if unknown:
        listed = ", ".join(sorted(known)) or "none"
        raise ConfigError(f"unknown dimension name(s) {', '.join(unknown)}; "
                          f"the model's named dimensions: {listed}; use --input-shapes "
                          "NAME:[d0,d1,...] to set the shape of any input")
    for name, size in dims.items():
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
            raise ConfigError(f"dimension {name} must be a positive integer, got {size!r}")


def resolve_shapes(specs: list[InputSpec], dims: dict[str, int],
                   input_shapes: dict[str, Sequence[int]] | None = None
                   ) -> dict[str, tuple[int, ...]]:
    """The concrete shape of every input: given in `input_shapes`, else from the model with
    dynamic dimensions from `dims` or the defaults (see `synthetic_inputs`)."""
    by_name = {spec.name: spec for spec in specs}
    given = {name: tuple(int(size) for size in shape)
             for name, shape in (input_shapes or {}).items()}
    unknown = sorted(set(given) - set(by_name))
    if unknown:
        raise ConfigError(f"--input-shapes: unknown input(s) {', '.join(unknown)}; the model's "
                          f"inputs: {', '.join(by_name) or 'none'}")
    bound = dict(dims)  # named dimension -> size, from --dim or from a given input shape
    origin = {name: f"--dim {name}={size}" for name, size in dims.items()}
    for name, shape in given.items():
        spec = by_name[name]
        if spec.shape is None:
            continue
        if len(shape) != len(spec.shape):
            raise ConfigError(f"--input-shapes {name}: {list(shape)} has rank {len(shape)}, "
                              f"the model's input is {spec.shape_text()}")
        for axis, (size, dim) in enumerate(zip(shape, spec.shape, strict=True)):
            if isinstance(dim, int) and size != dim:
                raise ConfigError(f"--input-shapes {name}: axis {axis} is {dim} in the model "
                                  f"({spec.shape_text()}), got {size}")
            if isinstance(dim, str):
                if bound.get(dim, size) != size:
                    raise ConfigError(f"--input-shapes {name}: dimension {dim!r} (axis {axis}) "
                                      f"is {bound[dim]} by {origin[dim]}, got {size}")
                bound[dim] = size
                origin[dim] = f"--input-shapes {name}"
    batch_names = _first_axis_names(specs)
    return {spec.name: given[spec.name] if spec.name in given
            else _resolve_shape(spec, bound, batch_names) for spec in specs}


def _first_axis_names(specs: list[InputSpec]) -> set[str]:
    """Dimension names used only as the first axis of inputs of rank 2 or more: batches."""
    first, elsewhere = set(), set()
    for spec in specs:
        for axis, dim in enumerate(spec.shape or ()):
            if isinstance(dim, str):
                (first if axis == 0 and len(spec.shape) >= 2 else elsewhere).add(dim)
    return first - elsewhere


def _resolve_shape(spec: InputSpec, dims: dict[str, int],
                   batch_names: set[str]) -> tuple[int, ...]:
    if spec.shape is None:
        raise CalibrationError(f"input {spec.name!r} has no shape in the model; "
                               "give its shape with --input-shapes or inputs with --data")
    shape = []
    for axis, dim in enumerate(spec.shape):
        if isinstance(dim, int):
            shape.append(dim)
        elif isinstance(dim, str):
            shape.append(int(dims[dim]) if dim in dims
                         else DEFAULT_BATCH_DIM if dim in batch_names
                         else _default_named(dim))
        else:
            shape.append(DEFAULT_BATCH_DIM if axis == 0 else DEFAULT_DIM)
    return tuple(shape)


def _default_named(name: str) -> int:
    lowered = name.lower()
    if "batch" in lowered or lowered in {"n", "b", "bs"}:
        return DEFAULT_BATCH_DIM
    return DEFAULT_DIM


def _is_mask(spec: InputSpec) -> bool:
    """An integer or boolean input named like a mask (attention_mask, pixel_mask, mask)."""
    return ((spec.elem_type in _INT_TYPES or spec.elem_type == TensorProto.BOOL)
            and "mask" in spec.name.lower())


def _padding_mask(shape: tuple[int, ...], dtype: np.dtype,
                  rng: np.random.Generator) -> np.ndarray:
    if not shape:
        return np.ones((), dtype)
    row = shape[-1]
    lengths = rng.integers(row - int(row * MASK_MAX_PADDING), row + 1, size=shape[:-1])
    return (np.arange(row) < lengths[..., np.newaxis]).astype(dtype)


def _random_array(spec: InputSpec, shape: tuple[int, ...], int_bound: int | None,
                  rng: np.random.Generator) -> np.ndarray:
    if _is_mask(spec):
        return _padding_mask(shape, spec.dtype, rng)
    if spec.elem_type in _FLOAT_TYPES:
        return rng.standard_normal(shape, dtype=np.float32).astype(spec.dtype)
    if spec.elem_type == TensorProto.BOOL:
        return rng.random(shape) < 0.5
    if spec.elem_type in _INT_TYPES:
        high = min(INT_HIGH if int_bound is None else int_bound,
                   int(ml_dtypes.iinfo(spec.dtype).max) + 1)
        return rng.integers(0, max(high, 1), size=shape, dtype=np.int64).astype(spec.dtype)
    type_name = TensorProto.DataType.Name(spec.elem_type)
    raise CalibrationError(f"input {spec.name!r} has type {type_name}, for which no synthetic "
                           "values can be made; give inputs with --data")


def _gather_bounds(graph: onnx.GraphProto) -> dict[str, int]:
    """Graph input name -> rows of the smallest constant Gather table it indexes (token ids)."""
    constant_dims: dict[str, list[int]] = {t.name: list(t.dims) for t in graph.initializer}
    constant_dims.update({t.values.name: list(t.dims) for t in graph.sparse_initializer})
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    constant_dims[node.output[0]] = list(attr.t.dims)
        elif node.op_type in _SHAPE_PRESERVING_OPS and node.domain in ("", "ai.onnx") \
                and node.input and node.input[0] in constant_dims:
            constant_dims[node.output[0]] = constant_dims[node.input[0]]
        for name in set(node.input):
            consumers.setdefault(name, []).append(node)

    bounds = {}
    for value in graph.input:
        if value.name in constant_dims:
            continue
        found = []
        pending, seen = [value.name], set()
        while pending:
            name = pending.pop()
            if name in seen:
                continue
            seen.add(name)
            for node in consumers.get(name, ()):
                if node.domain not in ("", "ai.onnx"):
                    continue
                if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == name:
                    table = constant_dims.get(node.input[0])
                    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                    if table and -len(table) <= axis < len(table) and table[axis] > 0:
                        found.append(table[axis])
                elif node.op_type in _ID_PRESERVING_OPS and node.input[0] == name:
                    pending.extend(node.output)
        if found:
            bounds[value.name] = min(found)
    return bounds


def load_npz_inputs(path: str | os.PathLike, model: onnx.ModelProto,
                    samples: int | None = None) -> list[Feed]:
    """Feeds from an `.npz` (or a folder of them) keyed by graph input name.

    int32 data for int64 inputs and float64 data for float32 inputs are cast (with a logged
    warning); any other dtype difference, a missing or unknown key, or a shape that disagrees
    with the model's static dimensions is a `CalibrationError`. At most `samples` feeds.
    """
    if samples is not None and samples < 1:
        raise ConfigError(f"samples must be at least 1, got {samples}")
    path = Path(path)
    if not path.exists():
        raise CalibrationError(f"{path}: no such file or folder")
    specs = graph_inputs(model)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".npz" and p.is_file())
        if not files:
            raise CalibrationError(f"{path}: folder holds no .npz files")
    else:
        files = [path]
    feeds: list[Feed] = []
    casts: set[tuple[str, str, str]] = set()
    for file in files:
        limit = None if samples is None else samples - len(feeds)
        feeds.extend(_read_npz(file, specs, limit, casts))
        if samples is not None and len(feeds) >= samples:
            break
    for name, source, target in sorted(casts):
        log.warning("calibration input %r: cast from %s to %s", name, source, target)
    return feeds


def _read_npz(file: Path, specs: list[InputSpec], limit: int | None,
              casts: set[tuple[str, str, str]]) -> list[Feed]:
    try:
        archive = np.load(file, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CalibrationError(f"{file}: not a readable .npz archive "
                               f"({_first_line(exc)})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise CalibrationError(f"{file}: a single .npy array, not an .npz archive of named inputs")
    with archive:
        wanted = [spec.name for spec in specs]
        missing = [name for name in wanted if name not in archive.files]
        unknown = [key for key in archive.files if key not in wanted]
        if missing or unknown:
            problems = []
            if missing:
                problems.append("missing input(s) " + ", ".join(map(repr, missing)))
            if unknown:
                problems.append("unknown key(s) " + ", ".join(map(repr, unknown)))
            raise CalibrationError(f"{file}: {'; '.join(problems)} "
                                   f"(graph inputs: {', '.join(wanted) or 'none'})")
        stacked: dict[str, np.ndarray] = {}
        counts: dict[str, int] = {}
        for spec in specs:
            try:
                array = archive[spec.name]
            except (OSError, ValueError, zipfile.BadZipFile) as exc:
                raise CalibrationError(f"{file}: cannot read {spec.name!r} "
                                       f"({_first_line(exc)})") from None
            array = _conform_dtype(array, spec, file, casts)
            stacked[spec.name], counts[spec.name] = _as_stack(array, spec, file)
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{name}: {count}" for name, count in counts.items())
        raise CalibrationError(f"{file}: inputs hold different numbers of samples ({listed})")
    count = next(iter(counts.values()), 0)
    if count == 0:
        raise CalibrationError(f"{file}: holds no samples")
    if limit is not None:
        count = min(count, limit)
    # stack[i, ...] stays an array for scalar inputs, where stack[i] is a numpy scalar that
    # onnxruntime refuses.
    return [{name: stack[i, ...] for name, stack in stacked.items()} for i in range(count)]


def _conform_dtype(array: np.ndarray, spec: InputSpec, file: Path,
                   casts: set[tuple[str, str, str]]) -> np.ndarray:
    if array.dtype == spec.dtype:
        return array
    # np.save writes ml_dtypes arrays (bfloat16, float8) as raw void bytes of the same width.
    if array.dtype.kind == "V" and spec.dtype.kind == "V" and \
            array.dtype.itemsize == spec.dtype.itemsize:
        return array.view(spec.dtype)
    if (array.dtype, spec.dtype) in _ALLOWED_CASTS:
        casts.add((spec.name, str(array.dtype), str(spec.dtype)))
        return array.astype(spec.dtype)
    raise CalibrationError(f"{file}: input {spec.name!r} has dtype {array.dtype}, "
                           f"the model expects {spec.dtype}")


def _as_stack(array: np.ndarray, spec: InputSpec, file: Path) -> tuple[np.ndarray, int]:
    """The array with samples on axis 0, and how many samples it holds."""
    if spec.rank is None or array.ndim == spec.rank:
        stack = array[np.newaxis]
    elif array.ndim == spec.rank + 1:
        stack = array
    else:
        raise CalibrationError(
            f"{file}: input {spec.name!r} has shape {list(array.shape)}; the model expects rank "
            f"{spec.rank} {spec.shape_text()} for one sample or rank {spec.rank + 1} for samples "
            "stacked on a new first axis")
    if spec.shape is not None:
        sample_shape = stack.shape[1:]
        if any(isinstance(want, int) and got != want
               for got, want in zip(sample_shape, spec.shape, strict=True)):
            raise CalibrationError(f"{file}: input {spec.name!r} sample shape "
                                   f"{list(sample_shape)} does not match the model's "
                                   f"{spec.shape_text()}")
    return stack, stack.shape[0]


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
