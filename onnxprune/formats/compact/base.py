"""What every compact form shares: the plan, the payload, the chunk statistics, and the
`CompactForm` interface with its registry (form name -> form)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from ..graphs import bits_of

if TYPE_CHECKING:
    from .builder import TensorBuilder

MAX_GAP_WIDTH = 24
ALIGNED_WIDTHS = (8, 16)  # gap codes stored whole as uint8 / uint16

# Reads one payload array of the chunk being decoded, by its field name ("values", ...).
PayloadReader = Callable[[str], np.ndarray]


@dataclass(frozen=True)
class EncodingPlan:
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
    extra_bytes: int = 0  # graph bytes beyond the form's (4-bit values: their unpacking)

    @property
    def format(self) -> str:
        return f"compact-{self.kind}"

    @property
    def form(self) -> CompactForm:
        return form_of(self.kind, self.aligned)

    @property
    def bytes(self) -> int:
        """Estimated bytes in the model: payload plus rebuild graph."""
        form = self.form
        return self.payload_bytes + form.tensor_overhead + form.chunk_overhead * self.chunks + \
            self.extra_bytes


@dataclass
class Payload:
    """The arrays one chunk is stored as, and what its rebuild needs to know."""

    kind: str
    shape: tuple[int, ...]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    params: dict = field(default_factory=dict)


@dataclass
class ChunkStats:
    """What planning needs to know of one chunk: its size, non-zeros and gap lengths."""

    numel: int
    nnz: int
    length_counts: np.ndarray  # [L] = gaps of bit length L (the first gap excluded)
    too_long: dict[int, int]  # aligned width -> gaps whose gap + 1 needs more bits


def chunk_stats(chunk: np.ndarray) -> ChunkStats:
    """Non-zeros (any bit set) and the bit lengths of the gaps between them."""
    positions = np.flatnonzero(bits_of(chunk))
    counts = np.zeros(MAX_GAP_WIDTH + 2, np.int64)
    too_long = dict.fromkeys(ALIGNED_WIDTHS, 0)
    if positions.size > 1:
        gaps = np.diff(positions) - 1
        # frexp's exponent of a positive integer is its bit length (0 for 0), exactly
        lengths = np.frexp(gaps.astype(np.float64))[1]
        counts += np.bincount(lengths, minlength=MAX_GAP_WIDTH + 2)[:MAX_GAP_WIDTH + 2]
        too_long = {w: int(np.count_nonzero(gaps >= (1 << w) - 1)) for w in ALIGNED_WIDTHS}
    return ChunkStats(chunk.size, int(positions.size), counts, too_long)


@dataclass
class Chunked:
    """One tensor split into row chunks, as planning sees it."""

    chunks: list[np.ndarray]
    reduction_axis: int | None = None
    nm: tuple[int, int] | None = None  # (N, M) when the pattern is N:M
    value_bits: int = 0  # bits a stored value takes (4: packed int4/uint4); 0: the itemsize's

    @cached_property
    def stats(self) -> list[ChunkStats]:
        return [chunk_stats(chunk) for chunk in self.chunks]

    @property
    def itemsize(self) -> int:
        return self.chunks[0].dtype.itemsize

    @property
    def numel(self) -> int:
        return sum(chunk.size for chunk in self.chunks)

    def value_bytes(self, count: int) -> int:
        """Bytes `count` stored values take (4-bit values two to a byte)."""
        bits = self.value_bits or 8 * self.itemsize
        return -(-count * bits // 8)

    @property
    def nnz(self) -> int:
        return sum(s.nnz for s in self.stats)


class CompactForm:
    """One stored form: its size estimate, encoder, rebuild graph and numpy decoder.

    `kind` is what reports and `store(forms=...)` call it (``compact-<kind>``); `name`
    tells apart forms of one kind (packed and aligned gap codes).
    """

    name: ClassVar[str]
    kind: ClassVar[str]
    # Graph bytes the form adds besides its payload, per tensor and per chunk (nodes,
    # small constants, names); measured on 2-D fp32 tensors, used only to choose forms.
    tensor_overhead: ClassVar[int]
    chunk_overhead: ClassVar[int]

    def plans(self, tensor: Chunked) -> list[EncodingPlan]:
        """This form's candidate plans for `tensor` (none where the form does not apply)."""
        raise NotImplementedError

    def encode(self, chunk: np.ndarray, bits: np.ndarray, plan: EncodingPlan,
               reduction_axis: int | None) -> Payload:
        """The payload of one chunk that has non-zeros (`bits`: its flat bit view)."""
        raise NotImplementedError

    def build(self, builder: TensorBuilder, payload: Payload, names: dict[str, str],
              shape: str, output: str) -> None:
        """Add the nodes that rebuild one chunk into `output`; `names` are the payload
        initializers by field, `shape` the chunk's shape constant."""
        raise NotImplementedError

    def decode(self, meta: dict, chunk: dict, shape: tuple[int, ...], dtype: np.dtype,
               payload: PayloadReader) -> np.ndarray:
        """The numpy twin of `build`: the dense chunk from its payload."""
        raise NotImplementedError

    def meta(self, plan: EncodingPlan, reduction_axis: int | None) -> dict:
        """The plan parameters `decode` needs, for the tensor's JSON description."""
        return {}


FORMS: dict[str, CompactForm] = {}


def register(form_class: type[CompactForm]) -> type[CompactForm]:
    """Class decorator: make one instance of the form known by its name."""
    FORMS[form_class.name] = form_class()
    return form_class


def form_of(kind: str, aligned: bool = False) -> CompactForm:
    """The form that stores `kind` (aligned gap codes are a form of their own)."""
    return FORMS["aligned-gaps" if kind == "gaps" and aligned else kind]
