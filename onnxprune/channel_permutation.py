"""Channel permutation for N:M patterns: group input channels so that more score is kept,
without changing what the model computes.

An N:M mask keeps the N best of every M consecutive input channels of a weight, so which
channels share a group matters; RIA (Zhang et al., ICLR 2024) and NVIDIA's ASP permute the
input channels first. In ONNX the permutation must be made where those channels come from:
the weight B of y = x·B is permuted along its input axis, and x's channels at their source.

`find_channel_set` accepts a target whose input reaches back, through element-wise ops only
(activations, sums and products of such channels, scalars, per-channel constants), to
MatMul/Gemm nodes with constant weights of their own, and whose intermediate values feed
nothing else. Permuting those producers' output channels (with their biases and per-channel
constants) and the target's input axis together leaves every output as it was, up to the
order of float sums. A LLaMA MLP (down_proj after SiLU(gate)·up) and a BERT feed-forward
(output dense after GELU(dense + bias)) qualify; weights fed by a norm, a reshape or a graph
input do not.

`choose_permutation` maximises the kept score Σ_groups Σ_outputs (N largest): it starts from
the better of the identity and a snake deal of channels by total score, then re-deals one
position of every group at a time by an optimal assignment (scipy's linear_sum_assignment)
on each channel's exact gain in each group, while that improves. The result never keeps
less than the unpermuted weight.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from .config import PruneConfig
from .graph import GraphIndex, attribute, constant_tensor
from .inputs import Feed
from .io import FLOAT_TYPES, LoadedModel, read_array, write_array
from .kernels.permutation_gains import group_gains, group_thresholds, kept_per_group
from .methods import Job, Needs
from .methods.wanda import wanda_scores
from .plan import PrunePlan
from .registry import METHODS
from .targets import WeightTarget

log = logging.getLogger(__name__)

# Ops that map each channel on its own (one data input).
UNARY_OPS = frozenset({
    "Abs", "Cast", "Celu", "Cos", "Elu", "Erf", "Exp", "Gelu", "HardSigmoid", "HardSwish",
    "Identity", "LeakyRelu", "Mish", "Neg", "Reciprocal", "Relu", "Selu", "Sigmoid", "Sin",
    "Softplus", "Softsign", "Sqrt", "Tanh", "ThresholdedRelu"})
# Element-wise ops of two inputs: channels (of the chain), scalars or per-channel constants.
BINARY_OPS = frozenset({"Add", "Sub", "Mul", "Div"})
# Rounds of re-dealing every position at most, stopping at one that adds less than
# MIN_ROUND_GAIN (a SmolLM2 down_proj, 2:4: snake +2.8 %, round 1 +3.36 %, 2 +3.42 %, 3 +3.42 %)
MAX_ROUNDS = 3
MIN_ROUND_GAIN = 1e-3
# Groups per assignment problem: larger layers are searched in blocks of this many groups.
BLOCK_GROUPS = 256


@dataclass
class ChannelSet:
    """A target whose input channels can be permuted, and every tensor axis that must follow.

    `moves` lists (tensor, axis) pairs: the target's weight along its input axis first, then
    the producers' weights along their output axis and per-channel constants.
    """

    target: WeightTarget
    channels: int
    moves: list[tuple[onnx.TensorProto, int]]


def find_channel_set(index: GraphIndex, target: WeightTarget) -> ChannelSet | str:
    """The target's permutable channel set, or why its input channels cannot be permuted."""
    main, flow = index.main, index.dataflow
    name = target.tensor_name or target.stored_tensor.name
    if target.graph is not index.graph or _constant(index, name) is None:
        return "only weights of the main graph (initializers, Constant nodes) are permuted"
    uses = main.consumers.get(name, [])
    if len(uses) != 1 or uses[0].scope is not main or name in main.escaping:
        return "its weight is read by more than one node"
    node, slot = uses[0].node, uses[0].slot
    dims = list(target.stored_tensor.dims)
    if slot != 1 or len(dims) != 2 or node.op_type not in ("MatMul", "Gemm") or (
            node.op_type == "Gemm" and attribute(node, "transA", 0)):
        return "only the weight of a MatMul or Gemm with a 2-D weight is supported"
    axis = 1 if node.op_type == "Gemm" and attribute(node, "transB", 0) else 0
    channels = dims[axis]
    moves: list[tuple[onnx.TensorProto, int]] = [(target.stored_tensor, axis)]
    # (node, input slot) of every read that carries the permuted channels: the reads of
    # chain values must all be among these (a producer reading one as its own input, or
    # any other node, would see the channels reordered)
    edges = {(id(node), 0)}
    values: set[str] = set()
    pending = [node.input[0]]
    while pending:
        value = pending.pop()
        if value in values:
            continue
        values.add(value)
        if value in main.escaping:
            return "its input channels are also a graph output"
        position = flow.producer.get(value)
        if position is None:
            return "its input channels come from a graph input"
        producer = flow.nodes[position]
        op = producer.op_type
        if op in ("MatMul", "Gemm"):
            reason = _producer_moves(index, producer, channels, moves)
            if reason:
                return reason
        elif op in UNARY_OPS and len(producer.input) == 1:
            edges.add((id(producer), 0))
            pending.append(producer.input[0])
        elif op in BINARY_OPS and len(producer.input) == 2:
            for input_slot, input_name in enumerate(producer.input):
                constant = _constant(index, input_name)
                if constant is None:
                    edges.add((id(producer), input_slot))
                    pending.append(input_name)
                    continue
                reason = _constant_moves(index, input_name, constant, channels, moves)
                if reason:
                    return reason
        else:
            return f"a {op} lies between its input channels and where they are made"
    for value in sorted(values):
        for use in main.consumers.get(value, []):
            if use.scope is not main or (id(use.node), use.slot) not in edges:
                return f"{value!r}, on the way to its input, is also read elsewhere"
    for tensor, _ in moves:
        if tensor.data_type not in FLOAT_TYPES:
            return f"{tensor.name!r} is not a float tensor"
    return ChannelSet(target, channels, moves)


def _constant(index: GraphIndex, name: str) -> onnx.TensorProto | None:
    flow = index.dataflow
    if name in flow.initializers:
        return flow.initializers[name]
    position = flow.producer.get(name)
    if position is not None and flow.nodes[position].op_type == "Constant":
        return constant_tensor(flow.nodes[position])
    return None


def _single_use(index: GraphIndex, name: str) -> bool:
    uses = index.main.consumers.get(name, [])
    return len(uses) == 1 and uses[0].scope is index.main and name not in index.main.escaping


def _producer_moves(index: GraphIndex, node: onnx.NodeProto, channels: int,
                    moves: list) -> str:
    weight = _constant(index, node.input[1]) if len(node.input) > 1 else None
    if weight is None or len(weight.dims) != 2 or not _single_use(index, node.input[1]):
        return f"{node.op_type} {node.name or node.output[0]!r} has no weight of its own"
    axis = 0 if node.op_type == "Gemm" and attribute(node, "transB", 0) else 1
    if weight.dims[axis] != channels:
        return f"{node.op_type} {node.name or node.output[0]!r} makes other channels"
    moves.append((weight, axis))
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        bias = _constant(index, node.input[2])
        if bias is None:
            return f"Gemm {node.name or node.output[0]!r} has a computed bias"
        return _constant_moves(index, node.input[2], bias, channels, moves)
    return ""


def _constant_moves(index: GraphIndex, name: str, tensor: onnx.TensorProto, channels: int,
                    moves: list) -> str:
    dims = list(tensor.dims)
    if int(np.prod(dims, dtype=np.int64)) == 1:
        return ""  # a scalar treats every channel alike
    if dims and dims[-1] == channels and all(d == 1 for d in dims[:-1]):
        if not _single_use(index, name):
            return f"the per-channel constant {name!r} is shared"
        moves.append((tensor, len(dims) - 1))
        return ""
    return f"the constant {name!r} does not broadcast per channel"


def kept_score(scores: np.ndarray, order: np.ndarray, n: int, m: int) -> float:
    """Σ over groups and outputs of the n largest of each group of m channels in `order`."""
    return float(kept_per_group(scores, np.asarray(order).reshape(-1, m), n).sum())


def choose_permutation(scores: np.ndarray, n: int, m: int) -> np.ndarray:
    """An order of the input channels (rows of `scores` [channels, outputs]) for N:M."""
    scores = np.ascontiguousarray(scores, dtype=np.float32)
    channels = scores.shape[0]
    groups = channels // m
    identity = np.arange(channels)
    snake = _snake_deal(scores, groups, m)
    order = max((identity, snake), key=lambda o: kept_score(scores, o, n, m)).copy()
    best, best_order = kept_score(scores, order, n, m), order.copy()
    for _ in range(MAX_ROUNDS):
        best_before_round = best
        for start in range(0, groups, BLOCK_GROUPS):
            # a view: the re-deal rewrites `order` in place
            block = order[start * m:min(groups, start + BLOCK_GROUPS) * m].reshape(-1, m)
            for position in range(m):
                _redeal(scores, block, position, n, m)
        now = kept_score(scores, order, n, m)
        if now > best:
            best, best_order = now, order.copy()
        if now <= best_before_round * (1 + MIN_ROUND_GAIN):
            break
    return best_order


def _snake_deal(scores: np.ndarray, groups: int, m: int) -> np.ndarray:
    """Channels by total score dealt to groups 0..G-1, then G-1..0, ...: strong channels
    spread over the groups instead of competing in one."""
    ranked = np.argsort(-scores.sum(axis=1, dtype=np.float64), kind="stable")
    table = np.empty((groups, m), dtype=np.int64)
    for position in range(m):
        row = ranked[position * groups:(position + 1) * groups]
        table[:, position] = row if position % 2 == 0 else row[::-1]
    return table.reshape(-1)


def _redeal(scores: np.ndarray, block: np.ndarray, position: int, n: int, m: int) -> None:
    """Reassign the channels at `position` of the block's groups optimally (in place)."""
    from scipy.optimize import linear_sum_assignment

    others = np.delete(block, position, axis=1)  # [groups, m - 1]
    thresholds = group_thresholds(scores, others, n)  # the n-th largest of the others
    candidates = block[:, position].copy()
    gains = group_gains(scores[candidates], thresholds)
    rows, columns = linear_sum_assignment(gains, maximize=True)
    block[columns, position] = candidates[rows]


def permute_channels(loaded: LoadedModel, targets: Sequence[WeightTarget], plan: PrunePlan,
                     config: PruneConfig, feeds: Sequence[Feed] | None,
                     masks: Mapping[str, np.ndarray]) -> tuple[list[dict], Sequence | None]:
    """Permute the input channels of every N:M target that allows it, in `loaded.proto`.

    Scores come from the target's method (Wanda's |W|·‖X_j‖ for methods that rebuild the
    weights or need XᵀX), with calibration statistics of the unpruned model. Returns one
    entry per permuted target for the report, and the calibration samples (loaded here when
    needed, for the pipeline to reuse).
    """
    index = GraphIndex(loaded.proto)
    # given masks are in the stored order: no tensor they cover may move
    masked = {id(t.tensor) for t in targets if t.name in masks}
    chosen: list[ChannelSet] = []
    candidates = 0
    for target in targets:
        pattern = plan[target.name].pattern
        if not pattern.is_nm or target.name in masks:
            continue
        candidates += 1
        found = ("its weights are quantized (their grid may run along the channels)"
                 if target.quant is not None else find_channel_set(index, target))
        if isinstance(found, str):
            log.info("%s: input channels not permuted: %s", target.name, found)
        elif any(id(tensor) in masked for tensor, _ in found.moves):
            log.info("%s: input channels not permuted: a tensor that would move has a "
                     "given mask", target.name)
        elif found.channels % pattern.m == 0:
            chosen.append(found)
    if not chosen and candidates:
        log.warning("--permute-channels: no N:M target has input channels that can be "
                    "permuted (they must come from MatMul/Gemm outputs through element-wise "
                    "ops only)")
        return [], feeds
    stats, feeds = _dense_statistics(loaded, index, chosen, plan, config, feeds)
    entries = []
    for found in chosen:
        target = found.target
        weights = read_array(target.stored_tensor, loaded.base_dir)
        pattern = plan[target.name].pattern
        scores = _channel_scores(found, weights, plan, config, stats.get(target.name))
        if not np.isfinite(scores).all():
            log.warning("%s: input channels not permuted: its scores are not all finite",
                        target.name)
            continue
        order = choose_permutation(scores, pattern.n, pattern.m)
        before = kept_score(scores, np.arange(found.channels), pattern.n, pattern.m)
        after = kept_score(scores, order, pattern.n, pattern.m)
        if after <= before:
            continue
        for tensor, axis in found.moves:
            values = read_array(tensor, loaded.base_dir)
            write_array(tensor, np.ascontiguousarray(np.take(values, order, axis=axis)))
        entries.append({"target": target.name, "channels": found.channels,
                        "tensors_moved": len(found.moves),
                        "kept_score_gain": after / before - 1 if before > 0 else 0.0})
        log.info("%s: input channels permuted, kept score +%.2f%%", target.name,
                 100 * (after / before - 1) if before > 0 else 0.0)
    return entries, feeds


def _dense_statistics(loaded, index, chosen, plan, config, feeds):
    """‖X_j‖² of the chosen targets' inputs in the unpruned model (one pass), by name."""
    from .calib import ActivationCapture, calibration_feeds, target_view

    views = []
    for found in chosen:
        if METHODS.get(plan[found.target.name].method).needs > Needs.NOTHING:
            view = target_view(found.target, index)
            if not isinstance(view, str):
                views.append(view)
    if not views:
        return {}, feeds
    feeds = feeds if feeds is not None else calibration_feeds(config, loaded.proto)
    capture = ActivationCapture(loaded, index, views, feeds, sequential=False, hessian=False,
                                weights={})
    stats = {}
    for stage in capture.stages():
        for view in stage.views:
            stats[view.target.name] = (view, capture.stats_of(view))
    return stats, feeds


def _channel_scores(found: ChannelSet, weights: np.ndarray, plan: PrunePlan,
                    config: PruneConfig, calibration) -> np.ndarray:
    """Scores as [input channels, outputs] (float32) for the permutation search."""
    target = found.target
    target_plan = plan[target.name]
    method = METHODS.build(target_plan.method, config.options)
    if calibration is None:
        scores = np.abs(np.asarray(weights, dtype=np.float32))
    elif method.reconstructs or method.needs >= Needs.HESSIAN:
        view, stats = calibration
        scores = view.from_obs(wanda_scores(view.to_obs(weights),
                                            stats.sq_norms[:, np.newaxis, :]))
    else:
        view, stats = calibration
        scores = method.scores(Job(target, weights, target_plan, config.seed, view, stats,
                                   config=config))
    axis = found.moves[0][1]
    return np.asarray(scores, dtype=np.float32) if axis == 0 else np.asarray(scores.T)
