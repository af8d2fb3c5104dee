"""Structured pruning: coupled channel groups found on the ONNX graph and removed whole, so
that the smaller dense model runs faster in any runtime (work in progress, issue #18)."""

from .analysis import find_groups
from .groups import (
    AttributeEdit,
    ChannelGroup,
    DeclineCause,
    Declined,
    Member,
    MemberRole,
    ShapeEdit,
    StructureKind,
)
from .surgery import SurgeryError, check_shrunk, shrink, zeroed

__all__ = ["AttributeEdit", "ChannelGroup", "DeclineCause", "Declined", "Member", "MemberRole",
           "ShapeEdit", "StructureKind", "SurgeryError", "check_shrunk", "find_groups", "shrink",
           "zeroed"]
