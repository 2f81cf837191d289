"""The Responses API's store on the production server (room for STORED_RESPONSES): the least
recently used response is evicted, and is then a 404 for retrieve and for previous_response_id."""

from __future__ import annotations

import openai
import pytest

from tests.e2e.production.config import KEY, STORED_RESPONSES
from tests.support import MODEL_NAME


def test_least_recently_used_response_is_evicted(server):
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    ids = [client.responses.create(model=MODEL_NAME, input=f"turn {i}", max_output_tokens=2).id for i in range(STORED_RESPONSES)]
    client.responses.retrieve(ids[0])  # now the most recently used: ids[1] goes next
    newest = client.responses.create(model=MODEL_NAME, input="one more", max_output_tokens=2).id
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(ids[1])
    with pytest.raises(openai.NotFoundError) as missing:
        client.responses.create(model=MODEL_NAME, input="go on", previous_response_id=ids[1], max_output_tokens=2)
    assert missing.value.body["param"] == "previous_response_id"
    assert client.responses.retrieve(ids[0]).id == ids[0] and client.responses.retrieve(newest).id == newest


def test_a_wrong_key_is_a_401(server):
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="wrong-key-0123456789abcdef", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError):
        client.responses.create(model=MODEL_NAME, input="hi", max_output_tokens=2)
