"""What the peer servers need to know about the example models in deploy/models.

Triton (triton_server.py) and MLServer (mlserver_server.py) must serve exactly what Marquee serves, or
the benchmark compares different work. Both take every model's tensors from its ONNX graph, its
largest batch and its onnxruntime thread count from its Triton config.pbtxt, and open sessions the
same way, all through this module.
"""
import dataclasses
import pathlib
import re

import numpy as np
import onnxruntime as ort

MODELS_DIR = pathlib.Path(__file__).resolve().parents[2] / "deploy" / "models"
DEFAULT_MODELS = ("gbr", "iforest", "minilm")

# The ONNX element types the example models use.
NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64}


@dataclasses.dataclass
class TensorSpec:
    name: str
    dtype: type  # numpy scalar type
    dims: tuple  # without the batch dimension; -1 where the graph leaves a size open


@dataclasses.dataclass
class ModelSpec:
    name: str
    path: pathlib.Path  # the model.onnx
    max_batch_size: int
    intra_op_threads: int  # 0: onnxruntime's default, as in Triton's onnxruntime backend
    inputs: list
    outputs: list


def open_session(path, intra_op_threads):
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _tensor_spec(node_arg):
    # The first dimension is the batch; any named or missing size is dynamic.
    dims = tuple(d if isinstance(d, int) else -1 for d in node_arg.shape[1:])
    return TensorSpec(node_arg.name, NUMPY_TYPES[node_arg.type], dims)


def load_spec(name):
    config = (MODELS_DIR / name / "config.pbtxt").read_text()
    batch = re.search(r"^\s*max_batch_size:\s*(\d+)", config, re.MULTILINE)
    if batch is None:
        raise ValueError(f"{name}: config.pbtxt has no max_batch_size")
    threads = re.search(r'key:\s*"intra_op_thread_count"\s*value:\s*\{\s*string_value:\s*"(\d+)"', config)
    path = MODELS_DIR / name / "1" / "model.onnx"
    session = open_session(path, 1)
    return ModelSpec(
        name=name,
        path=path,
        max_batch_size=int(batch.group(1)),
        intra_op_threads=int(threads.group(1)) if threads else 0,
        inputs=[_tensor_spec(i) for i in session.get_inputs()],
        outputs=[_tensor_spec(o) for o in session.get_outputs()],
    )

