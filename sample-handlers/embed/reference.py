"""Computes tests/fixtures/embed_reference.json: all-MiniLM-L6-v2 embeddings of a few sentences,
by a BERT forward pass written here in NumPy, independently of candle.

sentence-transformers needs torch, which this project's machines cannot install (PyPI's Linux
torch wheel pulls several GB of CUDA libraries), so this is the reference instead: the same
computation as transformers' BertModel followed by sentence-transformers' Pooling (mean) and
Normalize modules, in float64, one sentence at a time (no padding at all), reading the same
model.safetensors. Tokens come from the Hugging Face `tokenizers` Python package reading the
same tokenizer.json, which is what sentence-transformers' fast tokenizer does.

Run once, by hand, in a virtual environment with numpy, safetensors and tokenizers:
    python3 -m venv target/ref-venv && target/ref-venv/bin/pip install numpy safetensors tokenizers
    target/ref-venv/bin/python sample-handlers/embed/reference.py target/models/all-MiniLM-L6-v2
"""

import hashlib
import json
import math
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "Café au lait, s'il vous plaît — 3 croissants & a naïve smile!",
    "Worker-host loads the handler once, runs init before the first job, and serves RunPod's queue.",
]

erf = np.vectorize(math.erf)


def layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def embed(ids, w, config):
    heads = config["num_attention_heads"]
    eps = config["layer_norm_eps"]
    n = len(ids)
    x = (
        w["embeddings.word_embeddings.weight"][ids]
        + w["embeddings.position_embeddings.weight"][:n]
        + w["embeddings.token_type_embeddings.weight"][0]
    )
    x = layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
    size = x.shape[1] // heads
    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}."

        def dense(name, h):
            return h @ w[p + name + ".weight"].T + w[p + name + ".bias"]

        def split(h):  # (n, hidden) -> (heads, n, size)
            return h.reshape(n, heads, size).transpose(1, 0, 2)

        q = split(dense("attention.self.query", x))
        k = split(dense("attention.self.key", x))
        v = split(dense("attention.self.value", x))
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(size)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        probs = scores / scores.sum(-1, keepdims=True)
        context = (probs @ v).transpose(1, 0, 2).reshape(n, heads * size)
        x = layer_norm(
            x + dense("attention.output.dense", context),
            w[p + "attention.output.LayerNorm.weight"],
            w[p + "attention.output.LayerNorm.bias"],
            eps,
        )
        h = dense("intermediate.dense", x)
        h = 0.5 * h * (1.0 + erf(h / math.sqrt(2.0)))  # GELU, the exact (erf) form
        x = layer_norm(
            x + dense("output.dense", h),
            w[p + "output.LayerNorm.weight"],
            w[p + "output.LayerNorm.bias"],
            eps,
        )
    mean = x.mean(0)  # every token is real: the mask is all ones
    return mean / max(np.linalg.norm(mean), 1e-12)


def main():
    model_dir = Path(sys.argv[1])
    config = json.loads((model_dir / "config.json").read_text())
    assert config["hidden_act"] == "gelu" and config["model_type"] == "bert"
    weights_file = model_dir / "model.safetensors"
    w = {k: v.astype(np.float64) for k, v in load_file(str(weights_file)).items()}
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    tokens, embeddings = [], []
    for sentence in SENTENCES:
        ids = tokenizer.encode(sentence).ids
        tokens.append(ids)
        embeddings.append([round(float(x), 8) for x in embed(ids, w, config)])
    fixture = {
        "about": "all-MiniLM-L6-v2 embeddings (mean pooling, L2-normalised) computed by "
        "sample-handlers/embed/reference.py, an independent NumPy float64 BERT forward pass "
        "(sentence-transformers needs torch, which cannot be installed here)",
        "model_safetensors_sha256": hashlib.sha256(weights_file.read_bytes()).hexdigest(),
        "sentences": SENTENCES,
        "token_ids": tokens,
        "embeddings": embeddings,
    }
    Path("tests/fixtures/embed_reference.json").write_text(json.dumps(fixture, indent=1) + "\n")


main()
