"""Feeds for onnxruntime: the graph's real inputs, synthetic values, and `.npz` files.

An `.npz` holds arrays keyed by graph input name. An array with one more axis than its
input holds samples stacked on a new leading axis (sample i = `arr[i]`); an array of the
input's own rank is a single sample. A folder holds one such `.npz` per sample (a file may
also stack several); its files are read in name order.

An input whose rank the model does not state cannot tell a stack from one sample: its array
is read as one sample, with a warning that says so and how to give several (a folder of
`.npz` files, one sample per file). Guessing "stacked" would split a real batch axis into
samples of the wrong rank, which onnxruntime may still accept; one sample never changes
what the user wrote, and the warning makes the choice visible.

Synthetic values are always numpy arrays, 0-d for scalar inputs (onnxruntime refuses numpy
scalars such as `numpy.bool`).
"""

from __future__ import annotations

import logging
import os
import re
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper

from .errors import CalibrationError, ConfigError
from .graph import GraphIndex, Scope, attribute, is_onnx_domain

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
        except (KeyError, ValueError, TypeError) as exc:
            raise CalibrationError(f"input {value.name!r} has an unknown element type "
                                   f"{tensor_type.elem_type}") from exc
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
            except ValueError as exc:
                raise ConfigError(f"--dim {name}: size must be an integer, got {value!r}") from exc
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
    except ValueError as exc:
        raise ConfigError(f"--input-shapes {name}: sizes must be integers, "
                          f"got {text.strip()!r}") from exc
    if size < 0:
        raise ConfigError(f"--input-shapes {name}: sizes must not be negative, got {size}")
    return size


def synthetic_inputs(model: onnx.ModelProto, samples: int = 1, seed: int = 0,
                     dims: dict[str, int] | None = None,
                     input_shapes: Mapping[str, Sequence[int]] | None = None) -> list[Feed]:
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
    int_bounds = _gather_bounds(model)
    rng = np.random.default_rng(seed)
    return [{spec.name: _random_array(spec, shapes[spec.name], int_bounds.get(spec.name), rng)
             for spec in specs}
            for _ in range(samples)]


@dataclass(frozen=True)
class DefaultedDim:
    """A dynamic dimension of an input that synthetic inputs gave a default size."""

    input: str
    axis: int
    name: str | None  # the dimension's name; None: unnamed
    size: int
    batch_like: bool  # taken for a batch (size DEFAULT_BATCH_DIM), see `synthetic_inputs`


def defaulted_dims(model: onnx.ModelProto, dims: dict[str, int] | None = None,
                   input_shapes: Mapping[str, Sequence[int]] | None = None
                   ) -> list[DefaultedDim]:
    """The dynamic dimensions that `synthetic_inputs` with these `dims` and `input_shapes`
    leaves at a default size, in input order."""
    specs = graph_inputs(model)
    dims = dict(dims or {})
    _check_dim_names(specs, dims)
    defaulted: list[DefaultedDim] = []
    resolve_shapes(specs, dims, input_shapes, defaulted)
    return defaulted


def defaulted_dims_warning(defaulted: Sequence[DefaultedDim]) -> str | None:
    """One line naming every dimension of `defaulted` that is not batch-like (a batch of 1
    changes no sample's values; a length or image size of 16 may make them meaningless),
    and how to set them; None when there is none."""
    named: dict[str, list[str]] = {}
    unnamed: list[str] = []
    for dim in defaulted:
        if dim.batch_like:
            continue
        if dim.name is None:
            unnamed.append(f"{dim.input} axis {dim.axis}")
        else:
            named.setdefault(dim.name, []).append(f"{dim.input} axis {dim.axis}")
    if not named and not unnamed:
        return None
    listed = [f"{name!r} ({', '.join(places)})" for name, places in named.items()]
    listed += [f"{place} (unnamed)" for place in unnamed]
    ways = ["--dim NAME=VALUE"] if named else []
    ways.append("--input-shapes NAME:[d0,d1,...]")
    return (f"synthetic inputs: dynamic dimension{'s' if len(listed) > 1 else ''} "
            f"{', '.join(listed)} set to the default size {DEFAULT_DIM}; set "
            f"{'them' if len(listed) > 1 else 'it'} with {' or '.join(ways)}, or give real "
            "inputs with --data")


@dataclass(frozen=True)
class FedInput:
    """One input as fed over all samples: its dtype and its shape, an axis whose size varies
    between samples given as (smallest, largest); `shape` None when the rank varies."""

    name: str
    dtype: str
    shape: tuple[int | tuple[int, int], ...] | None

    def text(self) -> str:
        """`x[1,3,16,16] float32`; a varying axis as `7..40`."""
        if self.shape is None:
            return f"{self.name}[rank varies] {self.dtype}"
        sizes = ",".join(f"{size[0]}..{size[1]}" if isinstance(size, tuple) else str(size)
                         for size in self.shape)
        return f"{self.name}[{sizes}] {self.dtype}"

    def to_dict(self) -> dict:
        shape = None if self.shape is None else [list(s) if isinstance(s, tuple) else s
                                                 for s in self.shape]
        return {"name": self.name, "dtype": self.dtype, "shape": shape}


def fed_inputs(feeds: Sequence[Feed]) -> list[FedInput]:
    """What `feeds` give each input, in the order of the first feed's names."""
    if not feeds:
        return []
    described = []
    for name in feeds[0]:
        arrays = [np.asarray(feed[name]) for feed in feeds if name in feed]
        shapes = {array.shape for array in arrays}
        dtype = str(arrays[0].dtype)
        if len({len(shape) for shape in shapes}) > 1:
            described.append(FedInput(name, dtype, None))
            continue
        shape = tuple(min(sizes) if min(sizes) == max(sizes) else (min(sizes), max(sizes))
                      for sizes in zip(*shapes, strict=True))
        described.append(FedInput(name, dtype, shape))
    return described


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
                   input_shapes: Mapping[str, Sequence[int]] | None = None,
                   defaulted: list[DefaultedDim] | None = None
                   ) -> dict[str, tuple[int, ...]]:
    """The concrete shape of every input: given in `input_shapes`, else from the model with
    dynamic dimensions from `dims` or the defaults (see `synthetic_inputs`). Each dynamic
    dimension that took a default size is appended to `defaulted` when given."""
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
            else _resolve_shape(spec, bound, batch_names, defaulted) for spec in specs}


def _first_axis_names(specs: list[InputSpec]) -> set[str]:
    """Dimension names used only as the first axis of inputs of rank 2 or more: batches."""
    first: set[str] = set()
    elsewhere: set[str] = set()
    for spec in specs:
        shape = spec.shape or ()
        for axis, dim in enumerate(shape):
            if isinstance(dim, str):
                (first if axis == 0 and len(shape) >= 2 else elsewhere).add(dim)
    return first - elsewhere


def _resolve_shape(spec: InputSpec, dims: dict[str, int], batch_names: set[str],
                   defaulted: list[DefaultedDim] | None = None) -> tuple[int, ...]:
    """The input's shape; each dynamic dimension that took a default size is appended to
    `defaulted` when given."""
    if spec.shape is None:
        raise CalibrationError(f"input {spec.name!r} has no shape in the model; "
                               "give its shape with --input-shapes or inputs with --data")
    shape = []
    for axis, dim in enumerate(spec.shape):
        if isinstance(dim, int):
            shape.append(dim)
            continue
        if isinstance(dim, str) and dim in dims:
            shape.append(int(dims[dim]))
            continue
        if isinstance(dim, str):
            batch_like = dim in batch_names or _batch_like_name(dim)
        else:
            batch_like = axis == 0
        size = DEFAULT_BATCH_DIM if batch_like else DEFAULT_DIM
        shape.append(size)
        if defaulted is not None:
            defaulted.append(DefaultedDim(spec.name, axis, dim, size, batch_like))
    return tuple(shape)


def _batch_like_name(name: str) -> bool:
    lowered = name.lower()
    return "batch" in lowered or lowered in {"n", "b", "bs"}


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
    # numpy's generators return a numpy scalar, not a 0-d array, for some shape-() draws
    return np.asarray(_random_values(spec, shape, int_bound, rng))


def _random_values(spec: InputSpec, shape: tuple[int, ...], int_bound: int | None,
                   rng: np.random.Generator) -> np.ndarray | np.generic:
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


def _gather_bounds(model: onnx.ModelProto) -> dict[str, int]:
    """Graph input name -> rows of the smallest constant Gather table it indexes (token ids).

    The ids are followed through the ops that keep their values (`_ID_PRESERVING_OPS`) into
    If/Loop/Scan bodies too, where a body reads the input (or a value made from it) from the
    outer scope; the table may be stored in any scope the Gather sees.
    """
    index = GraphIndex(model)
    tables = _constant_dims(index)

    def table_dims(scope: Scope, name: str) -> list[int] | None:
        owner = scope.owner_of(name)
        return None if owner is None else tables.get((id(owner), name))

    main = index.main
    bounds = {}
    for value in main.graph.input:
        if (id(main), value.name) in tables:
            continue
        found = []
        pending, seen = [(main, value.name)], set()
        while pending:
            scope, name = pending.pop()
            if (id(scope), name) in seen:
                continue
            seen.add((id(scope), name))
            for use in scope.consumers.get(name, ()):
                node = use.node
                if not is_onnx_domain(node):
                    continue
                if node.op_type == "Gather" and use.slot == 1:
                    table = table_dims(use.scope, node.input[0])
                    axis = attribute(node, "axis", 0)
                    if table and -len(table) <= axis < len(table) and table[axis] > 0:
                        found.append(table[axis])
                elif node.op_type in _ID_PRESERVING_OPS and use.slot == 0:
                    # a node's outputs are defined in the scope it lives in
                    pending.extend((use.scope, out) for out in node.output if out)
        if found:
            bounds[value.name] = min(found)
    return bounds


def _constant_dims(index: GraphIndex) -> dict[tuple[int, str], list[int]]:
    """(id of the defining scope, name) -> dims of every constant tensor: initializers,
    sparse initializers, Constant values, and what `_SHAPE_PRESERVING_OPS` make of them."""
    dims = {(id(stored.scope), stored.name): list(stored.tensor.dims)
            for stored in index.stored}
    for scope in index.scopes:
        dims.update(((id(scope), t.values.name), list(t.dims))
                    for t in scope.graph.sparse_initializer)
        for node in scope.graph.node:
            if node.op_type in _SHAPE_PRESERVING_OPS and is_onnx_domain(node) and node.input:
                owner = scope.owner_of(node.input[0])
                source = None if owner is None else dims.get((id(owner), node.input[0]))
                if source is not None:
                    dims[(id(scope), node.output[0])] = source
    return dims


def load_npz_inputs(path: str | os.PathLike, model: onnx.ModelProto,
                    samples: int | None = None) -> list[Feed]:
    """Feeds from an `.npz` (or a folder of them) keyed by graph input name.

    int32 data for int64 inputs and float64 data for float32 inputs are cast (with a logged
    warning); any other dtype difference, a missing or unknown key, or a shape that disagrees
    with the model's static dimensions is a `CalibrationError`. At most `samples` feeds.

    An input of unknown rank (no shape in the model) takes each file's array as one sample,
    whatever its shape: a warning names the input and the shape read, and says that several
    samples are given as a folder of `.npz` files, one per sample.
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
    unranked: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for file in files:
        limit = None if samples is None else samples - len(feeds)
        feeds.extend(_read_npz(file, specs, limit, casts, unranked))
        if samples is not None and len(feeds) >= samples:
            break
    for name, source, target in sorted(casts):
        log.warning("calibration input %r: cast from %s to %s", name, source, target)
    for name, (file, shape) in unranked.items():
        log.warning("input %r has no shape in the model: its array in each .npz file is read "
                    "as one sample (%s in %s); give several samples as a folder of .npz "
                    "files, one sample per file", name, list(shape), file.name)
    return feeds


def _read_npz(file: Path, specs: list[InputSpec], limit: int | None,
              casts: set[tuple[str, str, str]],
              unranked: dict[str, tuple[Path, tuple[int, ...]]]) -> list[Feed]:
    """The feeds of one file; each dtype cast made is added to `casts`, and the first
    array read for an input of unknown rank to `unranked` (name -> file, shape)."""
    try:
        archive = np.load(file, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CalibrationError(f"{file}: not a readable .npz archive "
                               f"({_first_line(exc)})") from exc
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
                                       f"({_first_line(exc)})") from exc
            array = _conform_dtype(array, spec, file, casts)
            stacked[spec.name], counts[spec.name] = _as_stack(array, spec, file)
            if spec.rank is None:
                unranked.setdefault(spec.name, (file, array.shape))
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
