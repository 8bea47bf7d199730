"""Fits the fraud model and exports it as one ONNX graph; `marquee train fraud` runs it.

An isolation forest scores how unusual each booking is without labels; a gradient-boosted
classifier (scikit-learn's histogram GBDT) then learns from the labels, with the forest's score as
one more input. Both are exported with skl2onnx and joined into a single graph, so serving runs
one model:

    X [n, d] -> IsolationForest -> anomaly [n, 1]
    concat(X, anomaly) -> classifier -> probabilities [n, 2] -> fraud_probability [n, 1]

The job gives the training set (Parquet), the input columns in order and the label column; it
evaluates the exported graph itself, through the serving backend. This script prints one JSON line
on stdout: what it fitted.

    python fraud.py --train train.parquet --columns a,b,c --label is_fraud --seed 42 --out model.onnx
"""

import argparse
import json
import sys

import numpy as np
import onnx
import onnxruntime
import pyarrow.parquet as pq
from onnx import TensorProto, compose, helper
from skl2onnx import to_onnx
from sklearn.ensemble import HistGradientBoostingClassifier, IsolationForest

OPSET = {"": 17, "ai.onnx.ml": 3}


def load(path, columns, label):
    table = pq.read_table(path, columns=columns + [label])
    x = np.column_stack([table.column(c).to_numpy().astype(np.float32) for c in columns])
    y = table.column(label).to_numpy().astype(bool)
    return x, y


def exported_anomaly(forest, x):
    """The forest's anomaly score [n, 1], computed by its ONNX export in ONNX Runtime."""
    model = to_onnx(forest, x[:1], target_opset=OPSET)
    session = onnxruntime.InferenceSession(model.SerializeToString())
    scores = next(o.name for o in session.get_outputs() if o.name != "label")
    return -session.run([scores], {session.get_inputs()[0].name: x})[0].reshape(-1, 1)


def renamed(names, old, new):
    return [new if n == old else n for n in names]


def export(forest, classifier, width):
    """Both fitted models as one graph with input X and output fraud_probability."""
    forest_model = compose.add_prefix(to_onnx(forest, np.zeros((1, width), np.float32), target_opset=OPSET),
                                      "forest_")
    classifier_model = compose.add_prefix(
        to_onnx(classifier, np.zeros((1, width + 1), np.float32),
                options={id(classifier): {"zipmap": False}}, target_opset=OPSET),
        "classifier_")
    forest_in = forest_model.graph.input[0].name
    forest_scores = next(o.name for o in forest_model.graph.output if not o.name.endswith("label"))
    classifier_in = classifier_model.graph.input[0].name
    probabilities = next(o.name for o in classifier_model.graph.output if o.name.endswith("probabilities"))
    nodes = []
    for node in forest_model.graph.node:
        node.input[:] = renamed(node.input, forest_in, "X")
        nodes.append(node)
    # The forest's decision function is higher for normal rows: negated, higher is stranger.
    nodes.append(helper.make_node("Neg", [forest_scores], ["anomaly"], name="anomaly"))
    nodes.append(helper.make_node("Concat", ["X", "anomaly"], [classifier_in], axis=1, name="append_anomaly"))
    nodes.extend(classifier_model.graph.node)
    nodes.append(helper.make_node("Slice", [probabilities, "positive_start", "positive_end", "class_axis"],
                                  ["fraud_probability"], name="positive_class"))
    constants = [helper.make_tensor(name, TensorProto.INT64, [1], [value])
                 for name, value in [("positive_start", 1), ("positive_end", 2), ("class_axis", 1)]]
    graph = helper.make_graph(
        nodes, "fraud",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, width])],
        [helper.make_tensor_value_info("fraud_probability", TensorProto.FLOAT, [None, 1])],
        initializer=list(forest_model.graph.initializer) + list(classifier_model.graph.initializer) + constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in OPSET.items()],
                              producer_name="marquee train fraud")
    model.ir_version = forest_model.ir_version
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", required=True)
    parser.add_argument("--columns", required=True, help="input columns, in the model's order")
    parser.add_argument("--label", required=True)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    columns = args.columns.split(",")
    x, y = load(args.train, columns, args.label)
    if y.sum() == 0 or y.sum() == len(y):
        sys.exit(f"the training set needs both classes; {args.label} has {int(y.sum())} of {len(y)} positive")
    forest = IsolationForest(n_estimators=100, max_samples=256, random_state=args.seed).fit(x)
    # The classifier learns from the anomaly as the exported forest computes it (in float32), so
    # rows near a split go the same way in training and in serving.
    anomaly = exported_anomaly(forest, x)
    classifier = HistGradientBoostingClassifier(max_iter=200, learning_rate=0.1, l2_regularization=1.0,
                                                random_state=args.seed)
    classifier.fit(np.hstack([x, anomaly]), y)
    model = export(forest, classifier, x.shape[1])
    onnx.checker.check_model(model)
    onnx.save(model, args.out)
    # The export must compute what was fitted: compare on the first rows.
    sample = x[:2000]
    exported = onnxruntime.InferenceSession(args.out).run(None, {"X": sample})[0].ravel()
    fitted = classifier.predict_proba(np.hstack([sample, anomaly[:2000]]))[:, 1]
    export_error = float(np.abs(exported - fitted).max())
    print(json.dumps({
        "rows": int(len(y)), "positives": int(y.sum()), "columns": columns,
        "forest": {"n_estimators": 100, "max_samples": 256},
        "classifier": {"max_iter": 200, "learning_rate": 0.1, "l2_regularization": 1.0,
                       "iterations_run": int(classifier.n_iter_)},
        "export_max_abs_error": export_error,
        "library": {"scikit-learn": __import__("sklearn").__version__, "onnx": onnx.__version__},
    }))


if __name__ == "__main__":
    main()
