"""Builds the movie search index and its keyword baseline; `marquee train movie-index` runs it.

The job embeds every movie description with the served `embedding` model and hands the vectors
here. This script:

- writes model.onnx, the exact index: one MatMul of a query vector [n, d] by the description
  vectors [d, movies], a cosine score per movie (the vectors are unit length). Exact search is
  the right index at a catalogue's size (5,000 movies are 2 million multiply-adds a query);
- measures the fallback the search must beat: keyword search, TF-IDF over the descriptions
  (scikit-learn, English stop words removed, sublinear term frequency), ranking the same queries;
- counts each query's tokens with the embedding version's tokenizer, for the drift baseline.

    python movie_index.py --catalog catalog.json --vectors vectors.f32 --tokenizer tokenizer.json \
        --max-tokens 256 --out dir

catalog.json: {"descriptions": [...], "queries": [...], "answers": [movie position per query]}.
Prints one JSON line on stdout: the index's shape, the rank keyword search gives each query's
movie, the token counts (the job measures both searches from the ranks, one way).
"""

import argparse
import json
import pathlib

import numpy as np
import onnx
from onnx import TensorProto, helper
from sklearn.feature_extraction.text import TfidfVectorizer
from tokenizers import Tokenizer

# The first opset and IR version every ONNX Runtime the server loads reads.
OPSET = 17
IR_VERSION = 9


def index_model(vectors):
    movies, dimension = vectors.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["query", "movies"], ["scores"])],
        "movie_index",
        [helper.make_tensor_value_info("query", TensorProto.FLOAT, [None, dimension])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [None, movies])],
        [onnx.numpy_helper.from_array(np.ascontiguousarray(vectors.T), "movies")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return model


def ranks(scores, answers):
    """The 1-based rank of each query's answer (ties broken by catalogue order, as serving does),
    or None where the answer scores 0: sharing no word with the query, keyword search did not
    find it, whatever place the tie leaves it in."""
    out = []
    for row, answer in zip(scores, answers):
        if row[answer] <= 0:
            out.append(None)
            continue
        order = np.argsort(-row, kind="stable")
        out.append(int(np.nonzero(order == answer)[0][0]) + 1)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--catalog", type=pathlib.Path, required=True)
    parser.add_argument("--vectors", type=pathlib.Path, required=True)
    parser.add_argument("--tokenizer", type=pathlib.Path, required=True)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--out", type=pathlib.Path, required=True)
    args = parser.parse_args()

    catalog = json.loads(args.catalog.read_text())
    descriptions, queries, answers = catalog["descriptions"], catalog["queries"], catalog["answers"]
    vectors = np.fromfile(args.vectors, dtype="<f4")
    if not descriptions or vectors.size % len(descriptions):
        raise SystemExit(f"{vectors.size} values do not split into {len(descriptions)} vectors")
    vectors = vectors.reshape(len(descriptions), -1)
    args.out.mkdir(parents=True, exist_ok=True)
    onnx.save(index_model(vectors), args.out / "model.onnx")

    keyword = TfidfVectorizer(stop_words="english", sublinear_tf=True)
    documents = keyword.fit_transform(descriptions)
    keyword_scores = (keyword.transform(queries) @ documents.T).toarray()

    # As the server's tokenize step: no padding, truncated where the embedding pipeline truncates.
    tokenizer = Tokenizer.from_file(str(args.tokenizer))
    tokenizer.no_padding()
    tokenizer.enable_truncation(args.max_tokens)
    tokens = [len(encoding.ids) for encoding in tokenizer.encode_batch(queries)]
    print(json.dumps({
        "movies": vectors.shape[0],
        "dimension": vectors.shape[1],
        "queries": len(queries),
        "keyword_ranks": ranks(keyword_scores, answers),
        "keyword_method": "TF-IDF over the descriptions (scikit-learn TfidfVectorizer, English stop words, sublinear tf)",
        "query_tokens": tokens,
    }))


if __name__ == "__main__":
    main()
