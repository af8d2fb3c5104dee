"""Build the small demo models shipped in ``models/``.

    python tools/make_models.py               # writes models/{mlp,cnn,transformer}.onnx
    python tools/make_models.py --out DIR     # writes them somewhere else

Only ``onnx.helper`` and ``onnx.numpy_helper`` are used (no torch), every model has its own
fixed seed, and the bytes written are identical from run to run: ``tests/test_models_fixture.py``
rebuilds the models and compares them with the committed files. The weights are random
(normal with std 1/sqrt(fan_in), as at initialisation), not trained; see ``models/README.md``
for what each model is meant to exercise.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
PRODUCER = "onnxprune tools/make_models.py"
# One seed per model, so that changing one model leaves the bytes of the others alone.
SEEDS = {"mlp": 1001, "cnn": 1002, "transformer": 1003}

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "models"


class GraphBuilder:
    """Collects nodes and initializers and names them the way PyTorch exports do.

    A node ``/fc1/MatMul`` gets the output ``/fc1/MatMul_output_0`` unless an explicit output
    name is given (graph outputs such as ``logits``).
    """

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def tensor(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def scalar(self, name: str, value: float) -> str:
        return self.tensor(name, np.array(value, dtype=np.float32))

    def ints(self, name: str, values: Sequence[int]) -> str:
        return self.tensor(name, np.array(values, dtype=np.int64))

    def constant(self, name: str, array: np.ndarray, node_name: str) -> str:
        """A tensor held by a Constant node instead of an initializer (as PaddlePaddle exports)."""
        value = numpy_helper.from_array(array, name)
        self.nodes.append(helper.make_node("Constant", [], [name], name=node_name, value=value))
        return name

    def op(
        self,
        op_type: str,
        inputs: Sequence[str],
        name: str,
        output: str | None = None,
        **attributes: object,
    ) -> str:
        output = output or f"{name}_output_0"
        node = helper.make_node(op_type, list(inputs), [output], name=name, **attributes)
        self.nodes.append(node)
        return output

    # Initialisers in the style of torch.nn defaults, so activations keep a sensible scale.

    def dense_weight(self, name: str, shape: Sequence[int], fan_in: int) -> str:
        array = self.rng.standard_normal(shape) / math.sqrt(fan_in)
        return self.tensor(name, array.astype(np.float32))

    def bias(self, name: str, size: int, fan_in: int) -> str:
        bound = 1.0 / math.sqrt(fan_in)
        return self.tensor(name, self.rng.uniform(-bound, bound, size).astype(np.float32))

    def norm_params(self, prefix: str, size: int) -> tuple[str, str]:
        # Not 1 and 0: a trained model's norm parameters are not, and the tests should see that.
        scale = 1.0 + 0.1 * self.rng.standard_normal(size)
        shift = 0.02 * self.rng.standard_normal(size)
        return (
            self.tensor(f"{prefix}.weight", scale.astype(np.float32)),
            self.tensor(f"{prefix}.bias", shift.astype(np.float32)),
        )


def _finish(
    builder: GraphBuilder,
    graph_name: str,
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    doc: str,
    seed: int,
) -> onnx.ModelProto:
    graph = helper.make_graph(
        builder.nodes, graph_name, inputs, outputs, builder.initializers, doc_string=doc
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name=PRODUCER,
        doc_string=doc,
    )
    helper.set_model_props(
        model,
        {
            "onnxprune.demo_model": graph_name,
            "onnxprune.made_by": "python tools/make_models.py",
            "onnxprune.seed": str(seed),
        },
    )
    return model


def make_mlp(seed: int = SEEDS["mlp"]) -> onnx.ModelProto:
    """256 -> 512 -> 256 -> 16 MLP: one MatMul(B=[K,N]) layer and two Gemm layers (transB 1, 0)."""
    g = GraphBuilder(np.random.default_rng(seed))
    x = "x"
    h = g.op("MatMul", [x, g.dense_weight("fc1.weight", [256, 512], 256)], "/fc1/MatMul")
    h = g.op("Add", [h, g.bias("fc1.bias", 512, 256)], "/fc1/Add")
    h = g.op("Relu", [h], "/act1/Relu")
    # Gemm with transB=1 holds the weight as [N, K] = [out, in], like torch.nn.Linear.
    fc2_w = g.dense_weight("fc2.weight", [256, 512], 512)
    h = g.op("Gemm", [h, fc2_w, g.bias("fc2.bias", 256, 512)], "/fc2/Gemm", transB=1)
    h = g.op("Relu", [h], "/act2/Relu")
    fc3_w = g.dense_weight("fc3.weight", [256, 16], 256)
    g.op("Gemm", [h, fc3_w, g.bias("fc3.bias", 16, 256)], "/fc3/Gemm", output="logits", transB=0)
    return _finish(
        g,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 256])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 16])],
        "onnxprune demo MLP: MatMul + Add, Gemm transB=1, Gemm transB=0 (random weights).",
        seed,
    )


def make_cnn(seed: int = SEEDS["cnn"]) -> onnx.ModelProto:
    """Small CNN: dense, grouped, depthwise and 1x1 convolutions, then a classifier head.

    conv4's weight sits in a Constant node and the classifier weight is stored [K, N] and
    transposed before the Gemm, so target discovery must look through both.
    """
    g = GraphBuilder(np.random.default_rng(seed))
    h = "image"
    # conv1 has no bias: BatchNormalization follows. 864 elements, below the default min-size.
    conv1_w = g.dense_weight("conv1.weight", [32, 3, 3, 3], 3 * 9)
    h = g.op("Conv", [h, conv1_w], "/conv1/Conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    scale, shift = g.norm_params("bn1", 32)
    mean = g.tensor("bn1.running_mean", (0.1 * g.rng.standard_normal(32)).astype(np.float32))
    var = g.tensor("bn1.running_var", g.rng.uniform(0.5, 1.5, 32).astype(np.float32))
    h = g.op("BatchNormalization", [h, scale, shift, mean, var], "/bn1/BatchNormalization")
    h = g.op("Relu", [h], "/act1/Relu")
    # group=2: each output channel sees 16 input channels, so the weight is [64, 16, 3, 3].
    conv2_w = g.dense_weight("conv2.weight", [64, 16, 3, 3], 16 * 9)
    conv2_b = g.bias("conv2.bias", 64, 16 * 9)
    h = g.op(
        "Conv",
        [h, conv2_w, conv2_b],
        "/conv2/Conv",
        kernel_shape=[3, 3],
        pads=[1, 1, 1, 1],
        strides=[2, 2],
        group=2,
    )
    h = g.op("Relu", [h], "/act2/Relu")
    # Depthwise: [64, 1, 3, 3], 576 elements and an input-channel axis of size 1.
    conv3_w = g.dense_weight("conv3.weight", [64, 1, 3, 3], 9)
    conv3_b = g.bias("conv3.bias", 64, 9)
    h = g.op(
        "Conv",
        [h, conv3_w, conv3_b],
        "/conv3/Conv",
        kernel_shape=[3, 3],
        pads=[1, 1, 1, 1],
        group=64,
    )
    h = g.op("Relu", [h], "/act3/Relu")
    conv4_array = (g.rng.standard_normal([128, 64, 1, 1]) / math.sqrt(64)).astype(np.float32)
    conv4_w = g.constant("conv4.weight", conv4_array, "/conv4/Constant")
    conv4_b = g.bias("conv4.bias", 128, 64)
    h = g.op("Conv", [h, conv4_w, conv4_b], "/conv4/Conv", kernel_shape=[1, 1])
    h = g.op("GlobalAveragePool", [h], "/pool/GlobalAveragePool")
    h = g.op("Flatten", [h], "/flatten/Flatten", axis=1)
    # Stored [K, N] = [128, 64]; the Transpose makes it the [N, K] that Gemm transB=1 expects.
    fc_stored = g.dense_weight("fc.weight_kn", [128, 64], 128)
    fc_w = g.op("Transpose", [fc_stored], "/fc/Transpose", perm=[1, 0])
    fc_b = g.bias("fc.bias", 64, 128)
    g.op("Gemm", [h, fc_w, fc_b], "/fc/Gemm", output="logits", transB=1)
    return _finish(
        g,
        "cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 64])],
        "onnxprune demo CNN: Conv+BN, grouped, depthwise and 1x1 Conv (weight in a Constant "
        "node), classifier weight behind a Transpose (random weights).",
        seed,
    )


def make_transformer(seed: int = SEEDS["transformer"]) -> onnx.ModelProto:
    """One pre-LN transformer encoder block with embeddings and an LM head.

    vocab 512, d_model 128, 4 heads of 32, FFN 512, at most 64 positions. Linear weights are
    initializers feeding MatMul as input B [K, N], biases are separate Adds (torch dynamo style).
    """
    vocab, d_model, heads, d_ffn, max_positions = 512, 128, 4, 512, 64
    head_dim = d_model // heads
    g = GraphBuilder(np.random.default_rng(seed))

    table = g.tensor(
        "embed_tokens.weight", g.rng.standard_normal([vocab, d_model]).astype(np.float32)
    )
    positions = g.tensor(
        "embed_positions.weight",
        (0.1 * g.rng.standard_normal([max_positions, d_model])).astype(np.float32),
    )
    tokens = g.op("Gather", [table, "input_ids"], "/embed_tokens/Gather", axis=0)
    seq_len = g.op("Shape", ["input_ids"], "/embed_positions/Shape", start=1, end=2)
    zero = g.ints("/embed_positions/starts", [0])
    pos = g.op("Slice", [positions, zero, seq_len, zero], "/embed_positions/Slice")
    hidden = g.op("Add", [tokens, pos], "/embed/Add")

    def layer_norm(x: str, prefix: str) -> str:
        scale, shift = g.norm_params(prefix, d_model)
        return g.op(
            "LayerNormalization", [x, scale, shift], f"/{prefix}/LayerNormalization", axis=-1
        )

    def linear(x: str, prefix: str, fan_in: int, fan_out: int, bias: bool = True) -> str:
        w = g.dense_weight(f"{prefix}.weight", [fan_in, fan_out], fan_in)
        y = g.op("MatMul", [x, w], f"/{prefix}/MatMul")
        if bias:
            y = g.op("Add", [y, g.bias(f"{prefix}.bias", fan_out, fan_in)], f"/{prefix}/Add")
        return y

    # Self-attention.
    normed = layer_norm(hidden, "attn_norm")
    split_heads = g.ints("/attn/split_heads_shape", [0, 0, heads, head_dim])
    merge_heads = g.ints("/attn/merge_heads_shape", [0, 0, d_model])

    def heads_of(prefix: str, perm: list[int]) -> str:
        y = linear(normed, f"attn.{prefix}", d_model, d_model)
        y = g.op("Reshape", [y, split_heads], f"/attn/{prefix}/Reshape")
        return g.op("Transpose", [y], f"/attn/{prefix}/Transpose", perm=perm)

    q = heads_of("q_proj", [0, 2, 1, 3])  # [b, h, s, d]
    k = heads_of("k_proj", [0, 2, 3, 1])  # [b, h, d, s]
    v = heads_of("v_proj", [0, 2, 1, 3])  # [b, h, s, d]
    scores = g.op("MatMul", [q, k], "/attn/MatMul")
    scores = g.op("Mul", [scores, g.scalar("/attn/scale", 1.0 / math.sqrt(head_dim))], "/attn/Mul")
    probs = g.op("Softmax", [scores], "/attn/Softmax", axis=-1)
    context = g.op("MatMul", [probs, v], "/attn/MatMul_1")
    context = g.op("Transpose", [context], "/attn/Transpose", perm=[0, 2, 1, 3])
    context = g.op("Reshape", [context, merge_heads], "/attn/Reshape")
    attn_out = linear(context, "attn.o_proj", d_model, d_model)
    hidden = g.op("Add", [hidden, attn_out], "/attn/residual/Add")

    # Feed-forward with the erf form of GELU (opset 17 has no Gelu op).
    normed = layer_norm(hidden, "ffn_norm")
    up = linear(normed, "ffn.fc1", d_model, d_ffn)
    erf_in = g.op("Div", [up, g.scalar("/ffn/act/sqrt2", math.sqrt(2.0))], "/ffn/act/Div")
    erf = g.op("Erf", [erf_in], "/ffn/act/Erf")
    erf = g.op("Add", [erf, g.scalar("/ffn/act/one", 1.0)], "/ffn/act/Add")
    gelu = g.op("Mul", [up, erf], "/ffn/act/Mul")
    gelu = g.op("Mul", [gelu, g.scalar("/ffn/act/half", 0.5)], "/ffn/act/Mul_1")
    down = linear(gelu, "ffn.fc2", d_ffn, d_model)
    hidden = g.op("Add", [hidden, down], "/ffn/residual/Add")

    normed = layer_norm(hidden, "final_norm")
    lm_w = g.dense_weight("lm_head.weight", [d_model, vocab], d_model)
    g.op("MatMul", [normed, lm_w], "/lm_head/MatMul", output="logits")
    return _finish(
        g,
        "transformer",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", vocab])],
        "onnxprune demo transformer: token + position embeddings, one pre-LN encoder block "
        "(4-head attention, erf-GELU FFN), LM head; vocab 512, at most 64 positions "
        "(random weights).",
        seed,
    )


MODELS: dict[str, Callable[[], onnx.ModelProto]] = {
    "mlp.onnx": make_mlp,
    "cnn.onnx": make_cnn,
    "transformer.onnx": make_transformer,
}


def write_models(out_dir: Path) -> list[Path]:
    """Build every demo model, check it, and write it to ``out_dir``; return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for file_name, make in MODELS.items():
        model = make()
        onnx.checker.check_model(model, full_check=True)
        path = out_dir / file_name
        path.write_bytes(model.SerializeToString())
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (models/)")
    args = parser.parse_args(argv)
    for path in write_models(args.out):
        print(f"wrote {path} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
