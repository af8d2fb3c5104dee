"""Pruning as an onnx_ir pass: `PrunePass(**options)` runs in `onnx_ir.passes.PassManager`.

The pass serializes the `ir.Model` once (`onnx_ir.serde.serialize_model`), prunes that
proto with `onnxprune.prune` (so the weights are the ones `prune` gives for the same
options), and brings the result back:

- dense format, no structure (only weight values change): each target whose values changed
  gets a new tensor in its existing slot (`Value.const_value` of an initializer, the
  `value` attribute of a Constant node); graph, nodes and values stay the same objects.
- structured pruning, `format="compact"`, `permute_channels`, or a model that holds
  compact storage (densified first): the pruned proto is deserialized and, in place, its
  graph, functions and metadata replace the model's (the `Model` object stays the same).

onnx_ir is an optional dependency (`pip install onnx-ir`); `import onnxprune` never needs it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx

try:
    import onnx_ir as ir
except ImportError as exc:  # an optional dependency: say how to get it
    raise ImportError("onnxprune.passes needs onnx_ir: pip install onnx-ir") from exc

from .api import prune
from .config import PruneConfig
from .errors import ConfigError, NothingToPruneError
from .report import Report

log = logging.getLogger(__name__)


class PrunePass(ir.passes.PassBase):
    """Prune an `onnx_ir.Model` with the options of `onnxprune prune` (an onnx_ir pass).

    `PrunePass(sparsity=0.5, pattern="2:4", ...)`: the options are `PruneConfig`'s
    (`PruneConfig.from_settings`, part options included); a bad value raises `ConfigError`
    here, before any model is seen. `in_place=True` (onnx_ir's common passes are in place)
    changes and returns the given model; `in_place=False` returns a new model and leaves the
    given one as it was. `base_dir`: the folder of external data for tensors that do not
    name their own (`ExternalTensor.base_dir` empty, as after `onnx_ir.from_proto`).

    `requires`: an `ir.Model` whose external data lie in one folder and exist. A model with
    nothing to prune under these options raises `PreconditionError` from `call` (finding
    the targets needs the serialized model, which `call` builds once). `ensures`: every
    target meets its planned pattern (`PostconditionError` otherwise). The result's
    `modified` is true exactly when the model changed; the pruning report of the last call
    is `self.report`.
    """

    def __init__(self, *, in_place: bool = True, base_dir: str | os.PathLike | None = None,
                 **options) -> None:
        self.config = PruneConfig.from_settings(**options)
        if self.config.format == "sparse":
            raise ConfigError("format='sparse' writes ONNX sparse_initializers, which an "
                              "onnx_ir model cannot hold; use format='compact' or 'dense'")
        self._in_place = in_place
        self.base_dir = base_dir
        self.report: Report | None = None

    @property
    def in_place(self) -> bool:
        return self._in_place

    @property
    def changes_input(self) -> bool:
        return self._in_place

    def requires(self, model: ir.Model) -> None:
        """An `ir.Model` whose external data files exist, all in one folder."""
        if not isinstance(model, ir.Model):
            raise ir.passes.PreconditionError(
                f"PrunePass takes an onnx_ir.Model, not {type(model).__name__}")
        self._data_folder(model)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from .formats import stored_formats

        folder = self._data_folder(model)
        # one copy of the in-memory tensors; external ones stay references to their files
        proto = ir.serde.serialize_model(model)
        has_stored_forms = bool(stored_formats(proto, folder))
        try:
            pruned, self.report = prune(proto, config=self.config, base_dir=folder,
                                        inplace=True)
        except NothingToPruneError as exc:
            raise ir.passes.PreconditionError(f"PrunePass: {exc}") from exc
        config = self.config
        if (config.structure != "none" or config.format != "dense" or config.permute_channels
                or has_stored_forms):
            result, modified = self._rebuilt(model, pruned, self.report, has_stored_forms,
                                             folder)
        else:
            result, modified = self._written_back(model, pruned, folder)
        log.info("PrunePass: %s (%d targets)", "modified" if modified else "unchanged",
                 len(self.report.targets))
        return ir.passes.PassResult(result, modified)

    def ensures(self, model: ir.Model) -> None:
        """Every target of the last call meets its planned pattern (onnxprune checks each
        one on the pruned weights: an exact count, or at most N of every M)."""
        if self.report is None:
            raise ir.passes.PostconditionError("PrunePass: no report; call() has not run")
        failed = [t.name for t in self.report.targets if t.meets_plan is False]
        if failed:
            raise ir.passes.PostconditionError(
                f"PrunePass: {len(failed)} target(s) miss their planned pattern, e.g. "
                f"{failed[0]}")

    def _data_folder(self, model: ir.Model) -> str:
        """The one folder the model's external data lie in: the proto records only
        locations relative to it. A `PreconditionError` when there are several, or a file
        is missing."""
        default = os.fspath(self.base_dir) if self.base_dir is not None else "."
        external = [t for t in _tensors(model.graph) if isinstance(t, ir.ExternalTensor)]
        folders = {os.fspath(t.base_dir) or default for t in external}
        if len(folders) > 1:
            raise ir.passes.PreconditionError(
                "PrunePass: external data in several folders (" + ", ".join(sorted(folders))
                + "); save the model with its data in one folder first")
        folder = folders.pop() if folders else default
        for tensor in external:
            if not (Path(folder) / tensor.location).is_file():
                raise ir.passes.PreconditionError(
                    f"PrunePass: external data of {tensor.name!r} not found: "
                    f"{Path(folder) / tensor.location} (base_dir={folder!r})")
        return folder

    def _written_back(self, model: ir.Model, pruned: onnx.ModelProto, folder: str
                      ) -> tuple[ir.Model, bool]:
        """Dense pruning changes tensor values only: every target whose values changed gets
        its new tensor in its own slot of `model` (in place) or of a clone (whose unchanged
        tensors are shared with `model`, not copied)."""
        from .pipeline import selection_of
        from .targets import discover_targets

        result = model if self._in_place else model.clone()
        names = {t.tensor_name for t in discover_targets(pruned, selection_of(self.config))[0]}
        changed = 0
        for name, stored, current, replace in _slots(result.graph, pruned.graph):
            if name not in names:
                continue
            detached = onnx.TensorProto()
            detached.CopyFrom(stored)  # the pruned proto is dropped when the pass returns
            new = ir.serde.deserialize_tensor(detached)
            if not _same_values(_readable(current, folder), new):
                replace(new)
                changed += 1
        if changed:
            _set_metadata(result, pruned)
        return result, changed > 0

    def _rebuilt(self, model: ir.Model, pruned: onnx.ModelProto, report: Report,
                 has_stored_forms: bool, folder: str) -> tuple[ir.Model, bool]:
        """The graph itself changed: the pruned proto as a model, or (in place) its graph,
        functions and metadata put into `model`. A run that changed nothing leaves `model`
        as it was (a clone when not in place)."""
        new = ir.serde.deserialize_model(pruned)  # wraps the proto's tensors, no copy
        # tensors the prune did not rewrite still reference the input's external data
        ir.external_data.set_base_dir(new.graph, folder)
        if not self._changed(model, new, report, has_stored_forms):
            return (model if self._in_place else model.clone()), False
        if not self._in_place:
            return new, True
        model.graph = new.graph
        model.functions.clear()
        model.functions.update(new.functions)
        model.ir_version = new.ir_version
        model.metadata_props.clear()
        model.metadata_props.update(new.metadata_props)
        return model, True

    def _changed(self, model: ir.Model, new: ir.Model, report: Report,
                 has_stored_forms: bool) -> bool:
        """Whether `new` differs from `model` beyond onnxprune's metadata. The report
        answers most runs; otherwise (nothing removed, say, or an already-compact model
        stored compact again) both are serialized and compared, as onnx_ir writes them."""
        structured = report.structured or {}
        if structured.get("params_after", 0) < structured.get("params_before", 0):
            return True
        if any(t.zeros_before is not None and t.zeros != t.zeros_before
               for t in report.targets):
            return True
        if has_stored_forms and self.config.format == "dense":
            return True  # sparse/compact storage turned dense
        original, result = ir.serde.serialize_model(model), ir.serde.serialize_model(new)
        del original.metadata_props[:]
        original.metadata_props.extend(result.metadata_props)
        return original != result


def _graphs(graph: ir.Graph) -> Iterator[ir.Graph]:
    """`graph` and every subgraph in it, depth first."""
    yield graph
    for node in graph:
        for attr in node.attributes.values():
            if attr.is_ref():
                continue
            if attr.type == ir.AttributeType.GRAPH:
                yield from _graphs(attr.as_graph())
            elif attr.type == ir.AttributeType.GRAPHS:
                for subgraph in attr.as_graphs():
                    yield from _graphs(subgraph)


def _tensors(graph: ir.Graph) -> Iterator[ir.TensorProtocol]:
    """Every tensor stored in `graph` and its subgraphs: initializers and tensor
    attributes (Constant nodes)."""
    for each in _graphs(graph):
        for value in each.initializers.values():
            if value.const_value is not None:
                yield value.const_value
        for node in each:
            for attr in node.attributes.values():
                if attr.is_ref():
                    continue
                if attr.type == ir.AttributeType.TENSOR:
                    yield attr.as_tensor()
                elif attr.type == ir.AttributeType.TENSORS:
                    yield from attr.as_tensors()


Replace = Callable[[ir.TensorProtocol], None]


def _slots(graph: ir.Graph, proto: onnx.GraphProto
           ) -> Iterator[tuple[str, onnx.TensorProto, ir.TensorProtocol, Replace]]:
    """Each stored tensor of `proto` (serialized from `graph`, then pruned in place) under
    the name discovery gives it (an initializer's, a Constant's output), with the tensor
    `graph` holds in its place and how to replace it there. Nodes are paired by position:
    serialization keeps their order."""
    from .graph import constant_tensor

    for stored in proto.initializer:
        value = graph.initializers[stored.name]
        if value.const_value is not None:  # always: only initializers with values are written
            yield stored.name, stored, value.const_value, _initializer_setter(value)
    nodes = list(graph)
    if len(nodes) != len(proto.node):
        raise ir.passes.PassError(f"PrunePass: graph {graph.name!r} has {len(nodes)} nodes, "
                                  f"its pruned form {len(proto.node)}")
    for node, node_proto in zip(nodes, proto.node, strict=True):
        stored_value = constant_tensor(node_proto)
        if stored_value is not None:
            attr = node.attributes["value"]
            yield (node_proto.output[0], stored_value, attr.as_tensor(),
                   _constant_setter(node, attr))
        for attr_proto in node_proto.attribute:
            if attr_proto.type == onnx.AttributeProto.GRAPH:
                yield from _slots(node.attributes[attr_proto.name].as_graph(), attr_proto.g)
            elif attr_proto.type == onnx.AttributeProto.GRAPHS:
                subgraphs = node.attributes[attr_proto.name].as_graphs()
                for subgraph, subgraph_proto in zip(subgraphs, attr_proto.graphs, strict=True):
                    yield from _slots(subgraph, subgraph_proto)


def _initializer_setter(value: ir.Value) -> Replace:
    def replace(tensor: ir.TensorProtocol) -> None:
        value.const_value = tensor

    return replace


def _constant_setter(node: ir.Node, attr: ir.Attr) -> Replace:
    def replace(tensor: ir.TensorProtocol) -> None:
        node.attributes[attr.name] = ir.AttrTensor(attr.name, tensor, doc_string=attr.doc_string)
        # its output may carry the value too (onnx_ir's constant folding sets it)
        if node.outputs[0].const_value is not None:
            node.outputs[0].const_value = tensor

    return replace


def _readable(tensor: ir.TensorProtocol, folder: str) -> ir.TensorProtocol:
    """`tensor`, or for external data that names no folder (read from the working
    directory), the same data in `folder`; the model's own tensor is left as it is."""
    if not isinstance(tensor, ir.ExternalTensor) or os.fspath(tensor.base_dir):
        return tensor
    return ir.ExternalTensor(tensor.location, tensor.offset, tensor.length, tensor.dtype,
                             shape=tensor.shape, name=tensor.name, base_dir=folder)


def _same_values(a: ir.TensorProtocol, b: ir.TensorProtocol) -> bool:
    """Bit for bit (so -0.0 differs from 0.0 and a NaN equals itself)."""
    if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
        return False
    left, right = (np.ascontiguousarray(t.numpy()).reshape(-1).view(np.uint8) for t in (a, b))
    return bool(np.array_equal(left, right))


def _set_metadata(model: ir.Model, pruned: onnx.ModelProto) -> None:
    """The pruned model's metadata_props (onnxprune's provenance, others kept)."""
    model.metadata_props.clear()
    model.metadata_props.update({p.key: p.value for p in pruned.metadata_props})
