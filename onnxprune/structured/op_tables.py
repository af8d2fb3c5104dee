"""Which ONNX ops the structured analysis knows, by how the channel axis passes them."""

from __future__ import annotations

# Ops whose output 0 has the layout of input 0, element by element (other inputs, where an
# op has them, are scalars or attributes-as-inputs).
UNARY_OPS = frozenset({
    "Relu", "Sigmoid", "Tanh", "LeakyRelu", "HardSigmoid", "HardSwish", "Elu", "Selu",
    "Celu", "Gelu", "Softplus", "Softsign", "Erf", "Mish", "ThresholdedRelu", "Shrink",
    "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign",
    "Sin", "Cos", "Tan", "Asin", "Acos", "Atan", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh",
    "Not", "IsNaN", "IsInf", "Cast", "CastLike", "Clip", "Dropout", "Identity",
    "QuickGelu", "FastGelu", "BiasGelu",
})
# Element-wise ops of several inputs, with numpy broadcasting.
ELEMENTWISE_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "PRelu", "Max", "Min", "Sum", "Mean", "Where",
    "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Mod",
})
# Element-wise ops where two activations meeting make a residual stream.
ADDING_OPS = frozenset({"Add", "Sub", "Sum"})
POOL_OPS = frozenset({"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool",
                      "GlobalMaxPool", "GlobalLpPool"})
REDUCE_OPS = frozenset({"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd",
                        "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp",
                        "ReduceSumSquare"})
# Reductions over the channel axis that compute a norm's statistics.
NORM_REDUCE_OPS = frozenset({"ReduceMean", "ReduceL2", "ReduceSumSquare"})
# Normalizations over the last axes (LayerNorm family): where they cover the channel axis
# and two activations were added before, the channels are a transformer's hidden size.
LAYER_NORM_OPS = frozenset({"LayerNormalization", "SimplifiedLayerNormalization",
                            "RMSNormalization", "SkipLayerNormalization",
                            "SkipSimplifiedLayerNormalization"})
SKIP_NORM_OPS = frozenset({"SkipLayerNormalization", "SkipSimplifiedLayerNormalization"})
SOFTMAX_OPS = frozenset({"Softmax", "LogSoftmax", "Hardmax"})
RESHAPE_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})
ATTENTION_OPS = frozenset({"Attention", "MultiHeadAttention", "GroupQueryAttention",
                           "PackedAttention", "PackedMultiHeadAttention", "RotaryEmbedding",
                           "DecoderMaskedMultiHeadAttention", "SparseAttention"})
PRODUCER_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose"})
