"""Writes perf_analyzer input files (--input-data) for the example models.

perf_analyzer's own random data does not suit every model: MiniLM needs token ids inside its
vocabulary and an attention mask of ones. This writes, for each model, a JSON file of request
rows that perf_analyzer cycles through, the same files for Marquee and its peers.

    python bench/peers/make_inputs.py OUT_DIR [--rows N] [--seq-len L] [MODEL ...]

Writes OUT_DIR/<model>.json. Dynamic dimensions get the length L (default 16); run perf_analyzer
with a matching --shape for each such input (e.g. --shape input_ids:16).
"""
import argparse
import json
import math
import pathlib
import random

import numpy as np

import peer_models

VOCAB_SIZE = 30000  # MiniLM's vocabulary has 30,522 entries
CLS, SEP = 101, 102


def tensor_values(tensor, seq_len, rng):
    shape = [seq_len if d == -1 else d for d in tensor.dims]
    count = math.prod(shape)
    if tensor.name == "input_ids":  # one sentence: [CLS] words [SEP]
        return [CLS] + [rng.randrange(1000, VOCAB_SIZE) for _ in range(count - 2)] + [SEP]
    if tensor.name == "attention_mask":
        return [1] * count
    if tensor.name == "token_type_ids":
        return [0] * count
    if tensor.dtype is np.float32:
        return [round(rng.gauss(0.0, 1.0), 6) for _ in range(count)]
    raise ValueError(f"no rule for input {tensor.name}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=pathlib.Path)
    parser.add_argument("models", nargs="*", default=peer_models.DEFAULT_MODELS)
    parser.add_argument("--rows", type=int, default=256, help="requests per file")
    parser.add_argument("--seq-len", type=int, default=16, help="length of dynamic dimensions")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for name in args.models:
        spec = peer_models.load_spec(name)
        rows = [{t.name: tensor_values(t, args.seq_len, rng) for t in spec.inputs} for _ in range(args.rows)]
        path = args.out_dir / f"{name}.json"
        path.write_text(json.dumps({"data": rows}))
        print(path)


if __name__ == "__main__":
    main()
