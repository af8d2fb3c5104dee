"""Every target's layer-input statistics gathered at once, on the dense model.

For what looks at all targets before any is pruned (OWL's outlier ratios, sensitivity
sweeps): one pass of the graph over the calibration feeds, as `--calib-mode one-pass` does.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from ..graph import GraphIndex
from ..inputs import Feed
from ..io import LoadedModel
from ..targets import WeightTarget
from .capture import ActivationCapture
from .layouts import TargetView, target_view
from .stats import ActivationStats

log = logging.getLogger(__name__)


def dense_statistics(loaded: LoadedModel, targets: Sequence[WeightTarget],
                     feeds: Sequence[Feed], hessian: bool = False
                     ) -> dict[str, tuple[TargetView, ActivationStats] | str]:
    """By target name: (view, statistics) of its layer input on the dense model, or the
    reason it has none (cannot be calibrated, or no calibration token reached it).

    Holds every target's sums at once: ‖X_j‖² (small), or with `hessian` XᵀX.
    """
    index = GraphIndex(loaded.proto)
    found: dict[str, tuple[TargetView, ActivationStats] | str] = {}
    views = []
    for target in targets:
        view = target_view(target, index)
        if isinstance(view, str):
            found[target.name] = view
        else:
            views.append(view)
    if not views:
        return found
    capture = ActivationCapture(loaded, index, views, feeds, sequential=False, hessian=hessian)
    for stage in capture.stages():
        for view in stage.views:
            stats = capture.stats_of(view)
            found[view.target.name] = ((view, stats) if stats.tokens
                                       else "no calibration tokens reached this layer")
    return found
