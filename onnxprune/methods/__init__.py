"""Pruning methods: one file each, registered by name in `registry.METHODS`.

A method tells the pipeline what it needs gathered (`needs`: nothing, the squared input
norms ‖X_j‖², or XᵀX) and then either scores the weights (`scores`, higher = keep; the
pattern turns the scores into a mask and the kept values stay bit-identical) or, when it
`reconstructs`, returns new weights for a mask it chooses or is given (`reconstruct`).
Methods whose scores need only the weights may also stream them (`score_chunks`), which lets
the pipeline mask a target chunk by chunk and lets the global allocation rank all targets.

To add one: subclass `Method` in a new module (settings in an `Options` dataclass, see
`onnxprune.parts`) and register it,
from a plug-in package through the ``onnxprune.methods`` entry point group (see README,
"Extending").
"""

from .base import Job, MaskRefinement, Method, Needs, WeightUpdate

__all__ = ["Job", "MaskRefinement", "Method", "Needs", "WeightUpdate"]
