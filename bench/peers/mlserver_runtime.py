"""A generic onnxruntime runtime for MLServer, so MLServer can serve any of the example ONNX models.

MLServer 1.7.1 ships no ONNX runtime of its own. This one runs whatever graph the model settings
point at: the tensors named in a request go to onnxruntime (cast to the graph's types), and every
graph output comes back. With adaptive batching on, MLServer has already stacked the waiting
requests along the first dimension and splits the answer again.

Model settings: parameters.uri is the model.onnx; parameters.extra.intra_op_threads (default 0,
onnxruntime's own choice) sizes its thread pool. mlserver_server.py writes them.
"""
import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse

import peer_models


class OnnxRuntimeModel(MLModel):
    async def load(self):
        parameters = self.settings.parameters
        threads = int(parameters.extra.get("intra_op_threads", 0))
        self._session = peer_models.open_session(parameters.uri, threads)
        self._input_types = {i.name: peer_models.NUMPY_TYPES[i.type] for i in self._session.get_inputs()}
        self._output_names = [o.name for o in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {
            tensor.name: np.asarray(NumpyCodec.decode_input(tensor), dtype=self._input_types[tensor.name])
            for tensor in payload.inputs
        }
        results = self._session.run(self._output_names, feeds)
        outputs = []
        for name, value in zip(self._output_names, results):
            output = NumpyCodec.encode_output(name, value)
            # perf_analyzer's HTTP client reads any "parameters" on an output as binary-tensor
            # metadata and fails when binary_data_size is missing; JSON outputs need none.
            output.parameters = None
            outputs.append(output)
        return InferenceResponse(model_name=self.name, model_version=self.version, outputs=outputs)
