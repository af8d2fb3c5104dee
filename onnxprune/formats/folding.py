"""Check in onnxruntime that every compact rebuild is folded away at session start."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx

from ..graph import walk_graphs
from .graphs import REBUILD_PREFIX


def unfolded_rebuild_nodes(model: str | os.PathLike | onnx.ModelProto,
                           session_options=None) -> list[str]:
    """Names of compact-rebuild nodes that onnxruntime did NOT constant-fold.

    Builds a CPU session at graph optimization level BASIC (or with `session_options`),
    saves the optimized graph and lists the rebuild nodes still in it, subgraphs included.
    An empty list means inference runs on plain dense initializers.
    """
    import onnxruntime as ort

    from ..runtime import create_session

    options = session_options or ort.SessionOptions()
    if session_options is None:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    with tempfile.TemporaryDirectory(prefix="onnxprune-fold-") as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        options.optimized_model_filepath = str(optimized)
        # keep big folded tensors out of the protobuf (2 GiB limit)
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", "optimized.data")
        create_session(source, options)
        folded = onnx.load(str(optimized), load_external_data=False)
    return [node.name or node.output[0] for graph, _ in walk_graphs(folded.graph)
            for node in graph.node
            if node.name.startswith(REBUILD_PREFIX)
            or any(o.startswith(REBUILD_PREFIX) for o in node.output)]

