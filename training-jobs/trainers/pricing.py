"""Fits the pricing demand model and exports it as ONNX; `marquee train pricing` runs it.

The model predicts the share of a show's seats sold by its start (occupancy) from its price
multiplier and what the show is like when the price is quoted (hours to the show, weekday, hour,
popularity, recent sales). LightGBM fits it with the cross-entropy objective on the logit scale,
with two constraints that carry what is known about demand: occupancy never rises with price
(monotone), and the price's effect is one curve shared by every show (the multiplier interacts
with no other input), which lets a few thousand shows pin it down. onnxmltools exports the trees'
raw score and a Sigmoid node turns it into occupancy, checked against LightGBM's own predictions:

    X [n, 6] -> trees -> logit [n, 1] -> Sigmoid -> occupancy [n, 1]

The job gives the training set (Parquet), the input columns in order (the multiplier first) and
the label column; it evaluates the exported graph itself, through the server's pipeline. Prints
one JSON line on stdout: what it fitted.

    python pricing.py --train train.parquet --columns m,a,b --label occupancy --seed 42 --out model.onnx
"""

import argparse
import json

import lightgbm
import numpy as np
import onnx
import onnxruntime
import pyarrow.parquet as pq
from onnx import TensorProto, helper
from onnxmltools import convert_lightgbm
from onnxmltools.convert.common.data_types import FloatTensorType

# onnxmltools converts LightGBM up to opset 15.
OPSET = 15

PARAMETERS = {
    "objective": "cross_entropy",
    "n_estimators": 500,
    "learning_rate": 0.03,
    "num_leaves": 5,
    "min_child_samples": 100,
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--train", required=True)
    parser.add_argument("--columns", required=True)
    parser.add_argument("--label", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    columns = args.columns.split(",")
    table = pq.read_table(args.train, columns=columns + [args.label])
    x = np.column_stack([table.column(c).to_numpy().astype(np.float32) for c in columns])
    y = table.column(args.label).to_numpy().astype(np.float64)
    width = len(columns)

    model = lightgbm.LGBMRegressor(
        **PARAMETERS,
        monotone_constraints=[-1] + [0] * (width - 1),
        interaction_constraints=[[0], list(range(1, width))],
        random_state=args.seed,
        n_jobs=1,
        verbose=-1,
    )
    model.fit(x, y)

    # The converter knows regression objectives only: the same trees read as regression give
    # the raw (logit) score, which the Sigmoid node turns into the objective's prediction.
    trees = model.booster_.model_to_string()
    raw = lightgbm.Booster(
        model_str=trees.replace("objective=cross_entropy", "objective=regression").replace(
            "[objective: cross_entropy]", "[objective: regression]"
        )
    )
    exported = convert_lightgbm(raw, initial_types=[("X", FloatTensorType([None, width]))],
                                target_opset=OPSET)
    graph = exported.graph
    logit = graph.output[0].name
    graph.node.append(helper.make_node("Sigmoid", [logit], ["occupancy"], name="occupancy"))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("occupancy", TensorProto.FLOAT, [None, 1]))
    onnx.checker.check_model(exported)
    serialized = exported.SerializeToString()
    with open(args.out, "wb") as f:
        f.write(serialized)

    session = onnxruntime.InferenceSession(serialized)
    sample = x[: min(len(x), 20000)]
    served = session.run(["occupancy"], {"X": sample})[0].ravel()
    error = float(np.abs(served - model.predict(sample)).max())
    print(json.dumps({
        "library": f"lightgbm {lightgbm.__version__}",
        "model": "LGBMRegressor",
        "parameters": PARAMETERS,
        "constraints": "occupancy falls with the multiplier, which interacts with no other input",
        "rows": int(len(x)),
        "export_max_abs_error": error,
    }))


if __name__ == "__main__":
    main()
