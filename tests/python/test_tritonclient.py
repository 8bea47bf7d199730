"""Conformance: Triton's own Python client (tritonclient 2.73, HTTP and gRPC) against
`marquee serve`, unchanged. Answers for real models must equal Python onnxruntime's."""

import pathlib

import ml_dtypes
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODELS = ROOT / ".marquee" / "fixtures" / "models"

DTYPES = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64, "BYTES": np.object_,
    "BF16": ml_dtypes.bfloat16,
}

# (client module, use binary tensors); gRPC always carries raw bytes.
TRANSPORTS = [("http", True), ("http", False), ("grpc", True)]


def client_for(server, protocol):
    if protocol == "http":
        return httpclient, httpclient.InferenceServerClient(server.http)
    return grpcclient, grpcclient.InferenceServerClient(server.grpc)


def make_input(module, name, array, datatype, binary):
    tensor = module.InferInput(name, list(array.shape), datatype)
    if module is httpclient:
        tensor.set_data_from_numpy(array, binary_data=binary)
    else:
        tensor.set_data_from_numpy(array)
    return tensor


def make_output(module, name, binary):
    if module is httpclient:
        return module.InferRequestedOutput(name, binary_data=binary)
    return module.InferRequestedOutput(name)


def sample(datatype, rng, shape=(2, 3)):
    if datatype == "BYTES":
        return np.array([["", "marquee", "é"], ["a b", "x" * 300, "\u2603"]], dtype=np.object_)
    if datatype == "BOOL":
        return rng.integers(0, 2, shape).astype(bool)
    if datatype == "BF16":
        return (rng.integers(-64, 64, shape) / 4).astype(ml_dtypes.bfloat16)
    info = np.iinfo(DTYPES[datatype]) if np.issubdtype(DTYPES[datatype], np.integer) else None
    if info is not None:
        return rng.integers(info.min, info.max, shape, dtype=DTYPES[datatype], endpoint=True)
    return (rng.standard_normal(shape) * 100).astype(DTYPES[datatype])


def ort_run(model, inputs):
    session = ort.InferenceSession(str(MODELS / model / "1" / "model.onnx"))
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, inputs)))


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_health_and_metadata(server, protocol):
    module, client = client_for(server, protocol)
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("gbr")
    assert client.is_model_ready("gbr", "1")
    assert not client.is_model_ready("gbr", "7")
    assert not client.is_model_ready("no_such_model")
    meta = client.get_server_metadata(as_json=True) if module is grpcclient else client.get_server_metadata()
    assert meta["name"] == "marquee"
    assert "binary_tensor_data" in meta["extensions"]
    model = client.get_model_metadata("gbr", as_json=True) if module is grpcclient else client.get_model_metadata("gbr")
    assert model["platform"] == "onnxruntime_onnx"
    assert model["inputs"][0]["name"] == "X"
    assert [int(d) for d in model["inputs"][0]["shape"]] == [-1, 10]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_model_config(server, protocol):
    module, client = client_for(server, protocol)
    if module is grpcclient:
        config = client.get_model_config("iforest", as_json=True)["config"]
    else:
        config = client.get_model_config("iforest")
    assert config["name"] == "iforest"
    assert int(config["max_batch_size"]) == 256
    assert config["input"][0]["data_type"] == "TYPE_FP32"
    assert [int(d) for d in config["input"][0]["dims"]] == [9]
    assert "dynamic_batching" in config


@pytest.mark.parametrize("protocol,binary", TRANSPORTS)
def test_every_datatype_round_trips(server, protocol, binary):
    module, client = client_for(server, protocol)
    rng = np.random.default_rng(3)
    arrays = {dt: sample(dt, rng) for dt in DTYPES}
    # tritonclient sends BF16 only as binary data, so it stays binary in the JSON run.
    as_binary = {dt: binary or dt == "BF16" for dt in DTYPES}
    inputs = [make_input(module, f"IN_{dt}", a, dt, as_binary[dt]) for dt, a in arrays.items()]
    outputs = [make_output(module, f"OUT_{dt}", as_binary[dt]) for dt in DTYPES]
    result = client.infer("identity_all", inputs, outputs=outputs)
    for dt, sent in arrays.items():
        got = result.as_numpy(f"OUT_{dt}")
        assert got.shape == sent.shape, dt
        if dt == "BYTES":
            # Binary BYTES come back as bytes; JSON ones as text (tritonclient's own behaviour).
            decoded = [g.decode() if isinstance(g, bytes) else g for g in got.ravel()]
            assert decoded == list(sent.ravel()), dt
        else:
            assert got.dtype == sent.dtype, dt
            np.testing.assert_array_equal(got, sent, err_msg=dt)


@pytest.mark.parametrize("protocol,binary", TRANSPORTS)
def test_tree_models_match_onnxruntime(server, protocol, binary):
    module, client = client_for(server, protocol)
    rng = np.random.default_rng(5)
    for model, width in [("gbr", 10), ("iforest", 9)]:
        x = (rng.standard_normal((32, width)) * 2).astype(np.float32)
        expected = ort_run(model, {"X": x})
        result = client.infer(model, [make_input(module, "X", x, "FP32", binary)],
                              outputs=[make_output(module, name, binary) for name in expected])
        for name, want in expected.items():
            got = result.as_numpy(name)
            assert got.shape == want.shape
            # Same ONNX Runtime release on both sides: agreement to 1e-6.
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=f"{model}/{name}")


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_minilm_matches_onnxruntime(server, protocol):
    from tokenizers import Tokenizer

    module, client = client_for(server, protocol)
    tokenizer = Tokenizer.from_file(str(ROOT / ".marquee" / "minilm" / "tokenizer.json"))
    tokenizer.enable_padding(length=16)
    tokenizer.enable_truncation(16)
    encoded = tokenizer.encode_batch(["a quiet drama about chess", "loud space opera with lasers"])
    feeds = {
        "input_ids": np.array([e.ids for e in encoded], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encoded], dtype=np.int64),
    }
    feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
    expected = ort_run("minilm", feeds)["last_hidden_state"]
    inputs = [make_input(module, name, array, "INT64", True) for name, array in feeds.items()]
    got = client.infer("minilm", inputs).as_numpy("last_hidden_state")
    assert got.shape == (2, 16, 384)
    # int8 kernels may split work differently across threads: agreement to 1e-4.
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_errors_are_inference_server_exceptions(server, protocol):
    module, client = client_for(server, protocol)
    x = np.zeros((1, 10), dtype=np.float32)
    cases = [
        ("no_such_model", [make_input(module, "X", x, "FP32", True)], "not found"),
        ("gbr", [make_input(module, "X", x.astype(np.float64), "FP64", True)], "expects FP32"),
        ("gbr", [make_input(module, "X", np.zeros((1, 3), np.float32), "FP32", True)], "expects [-1, 10]"),
        ("gbr", [make_input(module, "Y", x, "FP32", True)], "has no input 'Y'"),
        ("add_sub", [make_input(module, "INPUT0", np.zeros(4, np.float32), "FP32", True)], "missing input 'INPUT1'"),
    ]
    for model, inputs, message in cases:
        with pytest.raises(InferenceServerException) as error:
            client.infer(model, inputs)
        assert message in str(error.value), str(error.value)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_schedule_policy_parameters(server, protocol):
    module, client = client_for(server, protocol)
    x = np.ones((1, 10), dtype=np.float32)
    result = client.infer("gbr", [make_input(module, "X", x, "FP32", True)], priority=1, timeout=5_000_000)
    assert result.as_numpy("variable").shape == (1, 1)


def test_http_async_requests_and_compression(server):
    client = httpclient.InferenceServerClient(server.http, concurrency=8)
    rng = np.random.default_rng(9)
    xs = [rng.standard_normal((1, 10)).astype(np.float32) for _ in range(40)]
    pending = [client.async_infer("gbr", [make_input(httpclient, "X", x, "FP32", True)]) for x in xs]
    got = np.vstack([p.get_result().as_numpy("variable") for p in pending])
    expected = ort_run("gbr", {"X": np.vstack(xs)})["variable"]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    result = client.infer("gbr", [make_input(httpclient, "X", xs[0], "FP32", False)],
                          request_compression_algorithm="gzip")
    np.testing.assert_allclose(result.as_numpy("variable"), expected[:1], atol=1e-5)


def test_grpc_streaming_and_compression(server):
    import queue

    client = grpcclient.InferenceServerClient(server.grpc)
    answers = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    for i in range(5):
        x = np.full((1, 10), i, dtype=np.float32)
        client.async_stream_infer("gbr", [make_input(grpcclient, "X", x, "FP32", True)], request_id=str(i))
    received = {}
    for _ in range(5):
        result, error = answers.get(timeout=30)
        assert error is None, error
        received[result.get_response().id] = result.as_numpy("variable")
    client.stop_stream()
    assert sorted(received) == ["0", "1", "2", "3", "4"]
    x = np.ones((1, 10), dtype=np.float32)
    result = client.infer("gbr", [make_input(grpcclient, "X", x, "FP32", True)], compression_algorithm="gzip")
    assert result.as_numpy("variable").shape == (1, 1)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_statistics_and_repository(server, protocol):
    module, client = client_for(server, protocol)
    x = np.ones((3, 9), dtype=np.float32)
    client.infer("iforest", [make_input(module, "X", x, "FP32", True)])
    stats = client.get_inference_statistics("iforest", as_json=True) if module is grpcclient else client.get_inference_statistics("iforest")
    model = stats["model_stats"][0]
    assert model["name"] == "iforest"
    assert int(model["inference_count"]) >= 3
    assert int(model["inference_stats"]["success"]["count"]) >= 1
    index = client.get_model_repository_index(as_json=True)["models"] if module is grpcclient else client.get_model_repository_index()
    names = {entry["name"] for entry in index}
    assert {"gbr", "iforest", "minilm", "identity_all", "add_sub"} <= names
    client.unload_model("add_sub")
    assert not client.is_model_ready("add_sub")
    client.load_model("add_sub")
    assert client.is_model_ready("add_sub")
