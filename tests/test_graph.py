"""The graph index: consumers and slots, scopes and subgraphs, outer-scope references,
look-through of layout-preserving ops and Transpose, and the main graph's dataflow."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.errors import OnnxPruneError
from onnxprune.graph import (
    GraphError,
    GraphIndex,
    axis_through_transposes,
    defined_names,
    node_reads,
    outer_names,
    topological_order,
    walk_graphs,
)


def _parse(text: str) -> onnx.ModelProto:
    return onnx.parser.parse_model(text)


def _weight(name: str, shape=(4, 4)) -> TensorProto:
    return numpy_helper.from_array(np.ones(shape, np.float32), name)


def _branch(name: str, nodes, outputs, initializers=()) -> onnx.GraphProto:
    return helper.make_graph(nodes, name, [], outputs, list(initializers))


def _value(name: str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, None)


def _nested_model() -> onnx.ModelProto:
    """Main: W (initializer) and C (Constant); If_0 whose then branch reads W from the main
    graph and whose else branch has its own V and a nested If reading V and W."""
    inner_if = helper.make_node(
        "If", ["cond"], ["inner_out"],
        then_branch=_branch("inner_then", [helper.make_node("MatMul", ["x", "V"], ["a"])],
                            [_value("a")]),
        else_branch=_branch("inner_else", [helper.make_node("MatMul", ["x", "W"], ["b"])],
                            [_value("b")]))
    then_branch = _branch("then", [helper.make_node("MatMul", ["x", "W"], ["t"])],
                          [_value("t")])
    else_branch = _branch("else", [inner_if], [_value("inner_out")], [_weight("V")])
    nodes = [
        helper.make_node("Constant", [], ["C"], value=_weight("c_value")),
        helper.make_node("Add", ["x", "C"], ["x2"], name="add"),
        helper.make_node("If", ["cond"], ["y"], then_branch=then_branch,
                         else_branch=else_branch),
    ]
    graph = helper.make_graph(
        nodes, "main",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [_value("y"), _value("x2")], [_weight("W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_consumers_list_every_slot_a_value_fills():
    model = _parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 4] x) => (float[2, 4] y, float[2, 4] z) <float[4, 4] w = {1.0}> {
            y = Mul(x, x)
            h = MatMul(x, w)
            z = Add(h, x)
        }""")
    index = GraphIndex(model)
    consumers = [(use.node.op_type, use.slot, use.position)
                 for use in index.main.consumers["x"]]
    assert consumers == [("Mul", 0, 0), ("Mul", 1, 0), ("MatMul", 0, 1), ("Add", 1, 2)]
    assert [(u.node.op_type, u.slot) for u in index.main.consumers["w"]] == [("MatMul", 1)]
    assert index.main.escaping == {"y", "z"}
    assert [(s.name, s.kind) for s in index.stored] == [("w", "initializer")]


def test_scopes_cover_subgraphs_at_any_depth_with_paths():
    # make_node sorts attributes by name: else_branch is walked before then_branch
    index = GraphIndex(_nested_model())
    paths = [(scope.label, scope.path) for scope in index.scopes]
    assert paths == [("", ""), ("If_2", "If_2.else_branch"),
                     ("If_0", "If_2.else_branch/If_0.else_branch"),
                     ("If_0", "If_2.else_branch/If_0.then_branch"),
                     ("If_2", "If_2.then_branch")]
    assert [scope.is_main for scope in index.scopes] == [True, False, False, False, False]
    assert index.scopes[3].parent is index.scopes[1]
    assert index.scopes[4].parent is index.main
    stored = [(s.name, s.kind, s.scope.path) for s in index.stored]
    assert stored == [("W", "initializer", ""), ("C", "constant", ""),
                      ("V", "initializer", "If_2.else_branch")]
    walked = [(graph.name, label) for graph, label in walk_graphs(index.graph)]
    assert walked == [("main", ""), ("else", "If_2"), ("inner_else", "If_0"),
                      ("inner_then", "If_0"), ("then", "If_2")]


def test_outer_scope_references_are_consumers_of_the_defining_scope():
    index = GraphIndex(_nested_model())
    scope = {scope.path: scope for scope in index.scopes}
    main, other = index.main, scope["If_2.else_branch"]
    inner_then = scope["If_2.else_branch/If_0.then_branch"]
    inner_else = scope["If_2.else_branch/If_0.else_branch"]
    uses_of_w = [(use.node.op_type, use.scope.path) for use in main.consumers["W"]]
    assert uses_of_w == [("MatMul", "If_2.else_branch/If_0.else_branch"),
                         ("MatMul", "If_2.then_branch")]
    assert [use.scope for use in other.consumers["V"]] == [inner_then]
    assert "V" not in main.consumers and inner_then.owner_of("V") is other
    assert inner_else.owner_of("W") is main and inner_else.owner_of("nothing") is None
    if_node = index.graph.node[2]
    assert node_reads(if_node) == ["cond", "W", "x"]
    assert outer_names(other.graph) == {"W", "cond", "x"}  # V is its own
    assert outer_names(scope["If_2.then_branch"].graph) == {"W", "x"}
    uses, escapes = index.uses("W")
    assert len(uses) == 2 and not escapes


def test_inner_definition_shadows_the_outer_name():
    body = _branch("then", [helper.make_node("MatMul", ["x", "W"], ["t"])], [_value("t")],
                   [_weight("W", (4, 2))])
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], then_branch=body, else_branch=body)], "main",
        [_value("x"), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [_value("y")], [_weight("W")])
    index = GraphIndex(helper.make_model(graph))
    assert "W" not in index.main.consumers
    assert [len(scope.consumers.get("W", [])) for scope in index.scopes[1:]] == [1, 1]
    assert index.uses("W") == ([], False)


def test_look_through_collects_transpose_permutations():
    model = _parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 3, 4] x) => (float[2, 3, 5] y, float[5, 4, 3] z) <float[4, 3, 5] w = {1.0}> {
            c = Cast<to = 1>(w)
            t = Transpose<perm = [2, 0, 1]>(c)
            i = Identity(t)
            r = Transpose(i)
            y = MatMul(x, r)
            z = Identity(t)
        }""")
    index = GraphIndex(model)
    uses, escapes = index.uses("w")
    assert escapes  # z = Identity(t) is a graph output
    assert [(u.node.op_type, u.slot, u.perms) for u in uses] == [
        ("MatMul", 1, ((2, 0, 1), ()))]
    # MatMul reduces axis 1 of r = reverse(transpose(w, [2, 0, 1])): w's axis 0
    assert axis_through_transposes(1, uses[0].perms, 3) == 0
    w = np.arange(60).reshape(4, 3, 5)
    r = np.transpose(np.transpose(w, (2, 0, 1)))
    assert all(np.array_equal(np.sort(r[:, j].ravel()), w[j].ravel()) for j in range(4))


def test_look_through_only_on_the_data_slot_of_dequantize():
    model = _parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 4] x) => (float[2, 4] y) <int8[4, 4] q = {1}, float s = {0.5}> {
            w = DequantizeLinear(q, s)
            y = MatMul(x, w)
        }""")
    index = GraphIndex(model)
    assert [(u.node.op_type, u.slot) for u in index.uses("q")[0]] == [("MatMul", 1)]
    assert [(u.node.op_type, u.slot) for u in index.uses("s")[0]] == [("DequantizeLinear", 1)]


def test_dataflow_orders_nodes_and_finds_static_values():
    model = _parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 4] x) => (float[2, 4] y) <float[4, 4] w = {1.0}> {
            y = Add(h, n)
            h = MatMul(x, s)
            s = Mul(w, k)
            k = Constant<value = float {2.0}>()
            n = RandomNormalLike(w)
        }""")
    index = GraphIndex(model)
    # each sweep takes the nodes whose inputs are ready, in stored order
    assert topological_order(index.graph) == [3, 4, 2, 1, 0]
    flow = index.dataflow
    produced = [node.output[0] for node in flow.nodes]
    assert produced == ["k", "n", "s", "h", "y"]
    assert flow.static == {"w", "k", "s"}
    assert {flow.nodes[i].output[0] for i in flow.static_nodes} == {"k", "s"}
    (use,) = index.uses("s")[0]
    assert flow.nodes[flow.index_of(use)].output[0] == "h"
    assert flow.reads[produced.index("y")] == ["h", "n"]


def test_dataflow_keeps_an_ordered_graph_as_it_is():
    index = GraphIndex(_nested_model())
    assert index.dataflow.nodes == list(index.graph.node)
    # the If reads x through its branches only: it is not static, the Constant is
    assert index.dataflow.static == {"W", "C"}


def test_cycle_or_undefined_input_is_a_graph_error():
    model = _parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2] x) => (float[2] y) {
            y = Add(x, missing)
        }""")
    index = GraphIndex(model)  # structure is fine without an order
    assert index.uses("x")[0][0].node.op_type == "Add"
    with pytest.raises(GraphError, match="cycle or undefined inputs \\(missing\\)"):
        _ = index.dataflow
    assert issubclass(GraphError, OnnxPruneError)  # one line and exit 2 in the CLI


def test_defined_names_are_one_graph_only():
    index = GraphIndex(_nested_model())
    names = defined_names(index.graph)
    assert {"x", "cond", "W", "C", "x2", "y", "add"} <= names
    assert "V" not in names and "t" not in names


# --- nodes with fewer inputs or outputs than their schema (issue #17) --------------------------

def _mlp_with(node: onnx.NodeProto, position: int = 0) -> onnx.ModelProto:
    """A two-node model with `node` inserted at `position` of the main graph."""
    model = _parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 4] x) => (float[2, 4] y) {
            h = MatMul(x, W)
            y = Relu(h)
        }""")
    model.graph.initializer.append(_weight("W"))
    model.graph.node.insert(position, node)
    return model


def test_constant_without_output_is_a_clean_refusal():
    model = _mlp_with(helper.make_node("Constant", [], [], name="c0", value=_weight("v")))
    with pytest.raises(GraphError, match="^node 'c0' \\(Constant\\) has no output$"):
        GraphIndex(model)


def test_constant_without_output_inside_a_subgraph_is_refused():
    then_branch = _branch("then", [helper.make_node("Constant", [], [], value=_weight("v")),
                                   helper.make_node("Identity", ["x"], ["t"])], [_value("t")])
    else_branch = _branch("else", [helper.make_node("Identity", ["x"], ["e"])], [_value("e")])
    model = _mlp_with(helper.make_node("If", ["cond"], ["z"], name="branch",
                                       then_branch=then_branch, else_branch=else_branch))
    model.graph.input.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
    with pytest.raises(GraphError, match="node 'Constant_0' \\(Constant\\) has no output"):
        GraphIndex(model)


@pytest.mark.parametrize("edit, message", [
    (lambda node: node.input.pop(), "node 'MatMul_0' \\(MatMul\\) has 1 input; "
                                    "MatMul needs at least 2"),
    (lambda node: node.ClearField("input"), "node 'MatMul_0' \\(MatMul\\) has no input; "
                                            "MatMul needs at least 2"),
    (lambda node: node.ClearField("output"), "node 'MatMul_0' \\(MatMul\\) has no output"),
    (lambda node: node.input.__setitem__(1, ""), "node 'MatMul_0' \\(MatMul\\) leaves its "
                                                 "required input 'B' empty"),
])
def test_node_with_fewer_inputs_or_outputs_than_its_schema_is_refused(edit, message):
    model = _mlp_with(helper.make_node("Identity", ["x"], ["unused"]), position=2)
    edit(model.graph.node[0])
    with pytest.raises(GraphError, match=message):
        GraphIndex(model)


def test_omitted_optional_inputs_and_unknown_ops_are_fine():
    model = _mlp_with(helper.make_node("Gemm", ["x", "W"], ["g"]), position=2)  # no C
    model.graph.node.append(helper.make_node("Clip", ["x", "", "h"], ["clipped"]))  # no min
    model.graph.node.append(helper.make_node("Mystery", [], [], domain="custom"))
    model.graph.node.append(helper.make_node("Dropout", ["x"], ["dropped", ""]))  # no mask
    index = GraphIndex(model)
    assert [u.node.op_type for u in index.uses("W")[0]] == ["MatMul", "Gemm"]


def test_cli_refuses_a_constant_without_output_in_one_line(tmp_path, capsys):
    from onnxprune.cli import main

    path = tmp_path / "model.onnx"
    model = _mlp_with(helper.make_node("Constant", [], [], name="c0",
                                       value=_weight("v", (64, 64))))
    path.write_bytes(model.SerializeToString())
    for argv in (["inspect", str(path)], ["prune", str(path), "-o", str(tmp_path / "o.onnx")]):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ["onnxprune: error: node 'c0' (Constant) has no output"], err
    assert not (tmp_path / "o.onnx").exists()
