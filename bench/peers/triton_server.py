"""Triton Inference Server as a benchmark peer: the example models behind real Triton batching.

Marquee speaks Triton's protocol, so the fairest peer is Triton itself. A full tritonserver with its
onnxruntime backend does not install on this Debian 12 machine without containers; PyTriton does: it
bundles tritonserver and hands each batch that Triton's dynamic batcher forms to Python, which runs
it through onnxruntime. So requests, queueing and batching are Triton's own; only the model call
is Python. perf_analyzer can drive it like any Triton.

    venv-triton/bin/python bench/peers/triton_server.py [MODEL ...]     (default: gbr iforest minilm)

Env: HTTP_PORT (8000), GRPC_PORT (8001), METRICS_PORT (8002), all bound to 127.0.0.1;
     QUEUE_DELAY_US (500): the dynamic batcher's max queue delay;
     BATCHING=0: no dynamic batcher (requests still carry a batch dimension up to max_batch_size).
Stop it with SIGTERM or SIGINT.
"""
import os
import signal
import sys
import sysconfig

# Triton's Python-backend stub links libpython3.11.so. Unless it finds the one belonging to this
# interpreter first, it loads Debian's (another 3.11 patch release) against this interpreter's
# standard library, and models fail to load. The stub inherits this environment.
os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(
    p for p in (sysconfig.get_config_var("LIBDIR"), os.environ.get("LD_LIBRARY_PATH")) if p
)

from pytriton.decorators import batch  # noqa: E402  (needs the environment above)
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor  # noqa: E402
from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig  # noqa: E402

import peer_models  # noqa: E402


def make_infer_fn(spec):
    session = peer_models.open_session(spec.path, spec.intra_op_threads)
    output_names = [t.name for t in spec.outputs]

    @batch
    def infer(**inputs):  # one numpy array per input, the requests of a batch already stacked
        return dict(zip(output_names, session.run(output_names, inputs)))

    return infer


def bind(triton, spec, queue_delay_us, batching):
    batcher = DynamicBatcher(max_queue_delay_microseconds=queue_delay_us) if batching else None
    triton.bind(
        model_name=spec.name,
        infer_func=make_infer_fn(spec),
        inputs=[Tensor(name=t.name, dtype=t.dtype, shape=t.dims) for t in spec.inputs],
        outputs=[Tensor(name=t.name, dtype=t.dtype, shape=t.dims) for t in spec.outputs],
        config=ModelConfig(max_batch_size=spec.max_batch_size, batcher=batcher),
    )


def stop_on_signal(signum, frame):
    raise KeyboardInterrupt  # Triton.serve() shuts the server down on it


def main():
    names = sys.argv[1:] or peer_models.DEFAULT_MODELS
    specs = [peer_models.load_spec(name) for name in names]
    queue_delay_us = int(os.environ.get("QUEUE_DELAY_US", "500"))
    batching = os.environ.get("BATCHING", "1") != "0"
    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=int(os.environ.get("HTTP_PORT", "8000")),
        grpc_address="127.0.0.1",
        grpc_port=int(os.environ.get("GRPC_PORT", "8001")),
        metrics_address="127.0.0.1",
        metrics_port=int(os.environ.get("METRICS_PORT", "8002")),
        exit_on_error=True,
    )
    # PyTriton puts statistics, model repository and a few more endpoints behind a generated token.
    # perf_analyzer reads statistics and cannot send the token over gRPC; the server is loopback-only.
    security = TritonSecurityConfig(restricted_endpoints=[])
    # A background job ignores SIGINT unless told otherwise, and SIGTERM would skip the clean-up
    # that stops tritonserver and removes PyTriton's workspace.
    signal.signal(signal.SIGINT, stop_on_signal)
    signal.signal(signal.SIGTERM, stop_on_signal)
    with Triton(config=config, security_config=security) as triton:
        for spec in specs:
            bind(triton, spec, queue_delay_us, batching)
        triton.serve()


if __name__ == "__main__":
    main()
