"""Triton's own clients against TorchScript models served by libtorch (the torch backend):
the answers must equal what torch computed for the same inputs (torch_reference.json, written by
make_torch_fixtures.py). Runs where the server is built with the torch backend and the fixtures
exist (tests/run.sh sets MARQUEE_TEST_TORCH=1); elsewhere the torch_* models are not served."""

import json
import os
import pathlib

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

ROOT = pathlib.Path(__file__).resolve().parents[2]
REFERENCE = ROOT / ".marquee" / "fixtures" / "torch_reference.json"

pytestmark = pytest.mark.skipif(
    os.environ.get("MARQUEE_TEST_TORCH") != "1",
    reason="the server under test is built without the torch backend (MARQUEE_TEST_TORCH=1 enables these)",
)

NUMPY = {"FP32": np.float32, "INT64": np.int64}
TRANSPORTS = [("http", True), ("http", False), ("grpc", True)]


def reference():
    return json.loads(REFERENCE.read_text())


def as_array(tensor):
    return np.array(tensor["data"], dtype=NUMPY[tensor["datatype"]]).reshape(tensor["shape"])


@pytest.mark.parametrize("protocol,binary", TRANSPORTS)
@pytest.mark.parametrize("model", ["torch_mlp", "torch_two_inputs"])
def test_torchscript_answers_equal_torch(server, protocol, binary, model):
    module = httpclient if protocol == "http" else grpcclient
    client = module.InferenceServerClient(server.http if protocol == "http" else server.grpc)
    case = reference()[model]
    inputs = []
    for name, tensor in case["inputs"].items():
        array = as_array(tensor)
        infer_input = module.InferInput(name, list(array.shape), tensor["datatype"])
        if module is httpclient:
            infer_input.set_data_from_numpy(array, binary_data=binary)
        else:
            infer_input.set_data_from_numpy(array)
        inputs.append(infer_input)
    outputs = [
        module.InferRequestedOutput(name, binary_data=binary) if module is httpclient
        else module.InferRequestedOutput(name)
        for name in case["outputs"]
    ]
    result = client.infer(model, inputs, outputs=outputs)
    for name, tensor in case["outputs"].items():
        got = result.as_numpy(name)
        want = as_array(tensor)
        assert got.dtype == want.dtype, name
        assert got.shape == want.shape, name
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=f"{model}/{name}")


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_torchscript_metadata_and_config_as_triton_reports_them(server, protocol):
    module = httpclient if protocol == "http" else grpcclient
    client = module.InferenceServerClient(server.http if protocol == "http" else server.grpc)
    if module is grpcclient:
        metadata = client.get_model_metadata("torch_two_inputs", as_json=True)
        config = client.get_model_config("torch_two_inputs", as_json=True)["config"]
    else:
        metadata = client.get_model_metadata("torch_two_inputs")
        config = client.get_model_config("torch_two_inputs")
    assert metadata["platform"] == "pytorch_libtorch"
    assert [(i["name"], i["datatype"]) for i in metadata["inputs"]] == [("x", "FP32"), ("y", "INT64")]
    assert [(o["name"], o["datatype"]) for o in metadata["outputs"]] == [("OUTPUT__0", "FP32"), ("OUTPUT__1", "INT64")]
    assert config["backend"] == "pytorch"
    assert int(config["max_batch_size"]) == 4
