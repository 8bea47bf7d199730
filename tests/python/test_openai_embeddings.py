"""OpenAI's own Python client, unchanged but for its base URL, against `/v1/embeddings` of the
real `marquee serve`: vectors for one text and for a list, base64 as the client decodes it, token
usage, and its typed errors for a bad request and an unknown model."""

import json

import numpy as np
import openai
import pytest

from conftest import FIXTURES


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://{server.http}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def references():
    return json.loads((FIXTURES / "embeddings.json").read_text())


def test_a_list_embeds_as_python_does(client, references):
    answer = client.embeddings.create(model="minilm", input=[r["text"] for r in references], encoding_format="float")
    assert [d.index for d in answer.data] == list(range(len(references)))
    for item, reference in zip(answer.data, references):
        got, want = np.array(item.embedding), np.array(reference["embedding"])
        assert got.shape == (384,)
        assert float(got @ want) > 0.99999
    assert answer.usage.prompt_tokens == sum(r["tokens"] for r in references)
    assert answer.usage.total_tokens == answer.usage.prompt_tokens


def test_the_client_default_base64_decodes_to_the_same_vector(client, references):
    # Without encoding_format the client asks for base64 and decodes it itself.
    answer = client.embeddings.create(model="minilm", input=references[0]["text"])
    got = np.array(answer.data[0].embedding)
    assert float(got @ np.array(references[0]["embedding"])) > 0.99999


def test_errors_come_as_the_client_types_them(client):
    with pytest.raises(openai.BadRequestError) as bad:
        client.embeddings.create(model="minilm", input=[])
    assert "empty" in bad.value.message
    assert bad.value.param == "input"
    with pytest.raises(openai.NotFoundError) as missing:
        client.embeddings.create(model="no-such-model", input="hi")
    assert missing.value.code == "model_not_found"
