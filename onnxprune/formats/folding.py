"""Check in onnxruntime that every compact rebuild is folded away at session start."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx

from ..graph import walk_graphs
from .graphs import REBUILD_PREFIX

# What is carried over from a caller's SessionOptions into the folding check's own options
# (onnxruntime cannot copy SessionOptions, nor list their config entries).
_OPTION_FIELDS = ("graph_optimization_level", "execution_mode", "execution_order",
                  "intra_op_num_threads", "inter_op_num_threads", "log_severity_level",
                  "log_verbosity_level", "enable_cpu_mem_arena", "enable_mem_pattern",
                  "enable_mem_reuse", "use_deterministic_compute", "use_per_session_threads")
_CONFIG_KEYS = ("session.intra_op.allow_spinning",
                "session.model_external_initializers_file_folder_path",
                "session.disable_prepacking")


def unfolded_rebuild_nodes(model: str | os.PathLike | onnx.ModelProto,
                           session_options=None) -> list[str]:
    """Names of compact-rebuild nodes that onnxruntime did NOT constant-fold.

    Builds a CPU session at graph optimization level BASIC (or with the level, threads and
    other plain settings of `session_options`, which is left as it is), saves the
    optimized graph and lists the rebuild nodes still in it, subgraphs included. An empty
    list means inference runs on plain dense initializers.
    """
    import onnxruntime as ort

    from ..runtime import create_session
    from ..runtime import session_options as quiet_options

    options = quiet_options()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    if session_options is not None:
        for name in _OPTION_FIELDS:
            setattr(options, name, getattr(session_options, name))
        for key in _CONFIG_KEYS:
            try:
                value = session_options.get_session_config_entry(key)
            except RuntimeError:  # not set
                continue
            options.add_session_config_entry(key, value)
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

