"""Seldon's MLServer as a benchmark peer, serving the example models so perf_analyzer can drive it.

MLServer speaks the same V2 inference protocol as Triton and Marquee, and batches adaptively. This
writes a model repository for the models named (into a temporary folder, removed on exit), each
served by mlserver_runtime.OnnxRuntimeModel, then runs `mlserver start` on it.

perf_analyzer first asks for the model's Triton configuration, which MLServer does not offer, and
stops with "failed to get model config" without it. So this also adds Triton's
GET /v2/models/{m}[/versions/{v}]/config and the gRPC inference.GRPCInferenceService/ModelConfig,
answering from the same description of the model (the ONNX graph plus its config.pbtxt).
Inference itself is plain MLServer. Over HTTP run perf_analyzer with
--input-tensor-format json --output-tensor-format json: MLServer has no binary tensors.

    venv-mlserver/bin/python bench/peers/mlserver_server.py [MODEL ...]  (default: gbr iforest minilm)

Env: HTTP_PORT (8080), GRPC_PORT (8081), METRICS_PORT (8082), all bound to 127.0.0.1;
     BATCHING=0: no adaptive batching; MLSERVER_PARALLEL_WORKERS (1): inference processes, 0 runs
     inference in the server process. Stop it with SIGTERM or SIGINT.
"""
import json
import os
import pathlib
import sys
import tempfile

import grpc
import numpy as np
from fastapi.responses import JSONResponse
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from mlserver.cli.main import main as mlserver_main
from mlserver.grpc.server import GRPCServer
from mlserver.rest import server as rest_server

import peer_models

MAX_BATCH_TIME_S = 0.0005  # how long MLServer waits to fill a batch; Triton peer's queue delay: 500 µs
V2_TYPES = {np.float32: "FP32", np.int64: "INT64"}  # Triton's config names them "TYPE_" + this


def model_settings(spec, batching):
    def tensors(specs):
        return [{"name": t.name, "datatype": V2_TYPES[t.dtype], "shape": [-1, *t.dims]} for t in specs]

    settings = {
        "name": spec.name,
        "implementation": "mlserver_runtime.OnnxRuntimeModel",
        "inputs": tensors(spec.inputs),
        "outputs": tensors(spec.outputs),
        "parameters": {"uri": str(spec.path), "extra": {"intra_op_threads": spec.intra_op_threads}},
    }
    if batching:
        settings["max_batch_size"] = spec.max_batch_size
        settings["max_batch_time"] = MAX_BATCH_TIME_S
    return settings


def write_repository(repo, specs, batching):
    server = {
        "host": "127.0.0.1",
        "http_port": int(os.environ.get("HTTP_PORT", "8080")),
        "grpc_port": int(os.environ.get("GRPC_PORT", "8081")),
        "metrics_port": int(os.environ.get("METRICS_PORT", "8082")),
        "debug": False,  # True (MLServer's default) logs every gRPC call
        "metrics_dir": str(repo / ".metrics"),  # MLServer's defaults are under the working directory
        "environments_dir": str(repo / ".envs"),
    }
    (repo / "settings.json").write_text(json.dumps(server))
    for spec in specs:
        (repo / spec.name).mkdir()
        (repo / spec.name / "model-settings.json").write_text(json.dumps(model_settings(spec, batching)))


def triton_config(spec, batching):
    """The model as Triton's ModelConfig, in the JSON form Triton's HTTP endpoint returns."""
    def tensors(specs):
        return [{"name": t.name, "data_type": "TYPE_" + V2_TYPES[t.dtype], "dims": list(t.dims)} for t in specs]

    config = {
        "name": spec.name,
        "platform": "onnxruntime_onnx",
        "max_batch_size": spec.max_batch_size,
        "input": tensors(spec.inputs),
        "output": tensors(spec.outputs),
    }
    if batching:
        config["dynamic_batching"] = {}
    return config


def model_config_messages():
    """Triton's ModelConfigRequest and ModelConfigResponse classes, with only the fields used here.

    MLServer's own gRPC messages live in the protobuf package `inference`, as Triton's do, so
    tritonclient's generated modules clash with them in the default descriptor pool. These are
    declared at run time in a pool of their own; field numbers follow Triton's model_config.proto
    and grpc_service.proto.
    """
    F = descriptor_pb2.FieldDescriptorProto

    def field(name, number, kind, type_name="", repeated=False):
        label = F.LABEL_REPEATED if repeated else F.LABEL_OPTIONAL
        proto_field = F(name=name, number=number, type=kind, label=label)
        if type_name:  # only enum and message fields may name a type, even an empty one
            proto_field.type_name = type_name
        return proto_field

    proto = descriptor_pb2.FileDescriptorProto(
        name="bench_peers/triton_model_config.proto", package="inference", syntax="proto3"
    )
    data_type = proto.enum_type.add(name="DataType")
    for name, number in (("TYPE_INVALID", 0), ("TYPE_INT64", 9), ("TYPE_FP32", 11)):
        data_type.value.add(name=name, number=number)
    messages = {
        "ModelConfigRequest": [field("name", 1, F.TYPE_STRING), field("version", 2, F.TYPE_STRING)],
        "ModelInput": [
            field("name", 1, F.TYPE_STRING),
            field("data_type", 2, F.TYPE_ENUM, ".inference.DataType"),
            field("dims", 4, F.TYPE_INT64, repeated=True),
        ],
        "ModelOutput": [
            field("name", 1, F.TYPE_STRING),
            field("data_type", 2, F.TYPE_ENUM, ".inference.DataType"),
            field("dims", 3, F.TYPE_INT64, repeated=True),
        ],
        "ModelDynamicBatching": [],
        "ModelConfig": [
            field("name", 1, F.TYPE_STRING),
            field("platform", 2, F.TYPE_STRING),
            field("max_batch_size", 4, F.TYPE_INT32),
            field("input", 5, F.TYPE_MESSAGE, ".inference.ModelInput", repeated=True),
            field("output", 6, F.TYPE_MESSAGE, ".inference.ModelOutput", repeated=True),
            field("dynamic_batching", 11, F.TYPE_MESSAGE, ".inference.ModelDynamicBatching"),
        ],
        "ModelConfigResponse": [field("config", 1, F.TYPE_MESSAGE, ".inference.ModelConfig")],
    }
    for name, fields in messages.items():
        proto.message_type.add(name=name, field=fields)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)

    def message_class(name):
        return message_factory.GetMessageClass(pool.FindMessageTypeByName("inference." + name))

    return message_class("ModelConfigRequest"), message_class("ModelConfigResponse")


def add_model_config_endpoints(configs):
    """Wraps MLServer's REST app and gRPC server factories so both answer Triton's config requests."""
    create_app = rest_server.create_app

    async def config_route(model_name: str, model_version: str = ""):
        if model_name not in configs:
            return JSONResponse({"error": f"unknown model {model_name}"}, status_code=404)
        return configs[model_name]

    def create_app_with_config(*args, **kwargs):
        app = create_app(*args, **kwargs)
        app.add_api_route("/v2/models/{model_name}/config", config_route, methods=["GET"])
        app.add_api_route("/v2/models/{model_name}/versions/{model_version}/config", config_route, methods=["GET"])
        return app

    rest_server.create_app = create_app_with_config

    request_class, response_class = model_config_messages()
    responses = {name: json_format.ParseDict({"config": c}, response_class()) for name, c in configs.items()}

    async def config_rpc(request, context):
        if request.name not in responses:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {request.name}")
        return responses[request.name]

    handler = grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService",
        {
            "ModelConfig": grpc.unary_unary_rpc_method_handler(
                config_rpc,
                request_deserializer=request_class.FromString,
                response_serializer=response_class.SerializeToString,
            )
        },
    )
    create_server = GRPCServer._create_server

    def create_server_with_config(self):
        server = create_server(self)
        server.add_generic_rpc_handlers((handler,))
        return server

    GRPCServer._create_server = create_server_with_config


def main():
    names = sys.argv[1:] or peer_models.DEFAULT_MODELS
    specs = [peer_models.load_spec(name) for name in names]
    batching = os.environ.get("BATCHING", "1") != "0"
    add_model_config_endpoints({spec.name: triton_config(spec, batching) for spec in specs})
    with tempfile.TemporaryDirectory(prefix="mlserver-repo-") as repo:
        write_repository(pathlib.Path(repo), specs, batching)
        sys.argv = ["mlserver", "start", repo]
        mlserver_main()  # returns (by SystemExit) once MLServer has shut down


if __name__ == "__main__":
    main()
