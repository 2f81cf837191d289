"""Service endpoints against the shared dev-model server: /v1/models, health, readiness, version,
metrics, and /openapi.json against the requests the server really accepts."""

from __future__ import annotations

from tests.support import MODEL_NAME

HI = [{"role": "user", "content": "Tell me about the weather in London."}]


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME


def test_service_endpoints(http):
    assert http.get("/health").json() == {"status": "ok"}
    assert http.get("/ready").status_code == 200
    version = http.get("/version").json()
    assert version["vllm_version"].startswith("0.32")
    metrics = http.get("/metrics").text
    assert "vllm:num_requests_running" in metrics
    assert "vllm:generation_tokens_total" in metrics
    assert 'jamba_build_info{' in metrics


def test_openapi_matches_accepted_requests(http):
    from jamba_server.protocol import ChatCompletionRequest, CompletionRequest, TokenizeRequest

    spec = http.get("/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/health", "/ready", "/version"} <= set(spec["paths"])
    schemas = spec["components"]["schemas"]
    for model in (ChatCompletionRequest, CompletionRequest, TokenizeRequest):
        schema = schemas[model.__name__]
        assert set(schema["properties"]) == set(model.model_fields)
        assert schema.get("additionalProperties") is False
    chat_ref = spec["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert chat_ref["$ref"].endswith("/ChatCompletionRequest")
    # every documented field is really accepted
    body = {"model": MODEL_NAME, "messages": HI, "max_tokens": 1, "temperature": 0, "top_p": 1, "n": 1, "stop": ["zz"],
            "seed": 1, "presence_penalty": 0, "frequency_penalty": 0, "logprobs": True, "top_logprobs": 1,
            "logit_bias": {"5": 0}, "user": "u", "top_k": 1, "min_p": 0, "repetition_penalty": 1,
            "min_tokens": 0, "ignore_eos": False, "max_completion_tokens": 1, "stream": False,
            "return_token_ids": True, "parallel_tool_calls": True, "tool_choice": "auto", "citation_mode": "off",
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
            "documents": [{"text": "doc", "title": "t"}], "response_format": {"type": "text"},
            "stop_token_ids": [5], "include_stop_str_in_output": False, "bad_words": ["zz"],
            "allowed_token_ids": list(range(16, 600)), "skip_special_tokens": True, "priority": 0,
            "cache_salt": "tenant-a", "prompt_logprobs": 1,
            "echo": True, "add_generation_prompt": True, "continue_final_message": False,
            "truncate_prompt_tokens": 2000, "truncation_side": "left",
            "structured_outputs": {"regex": "[a-z ]+"}}  # fmt: skip
    missing = set(ChatCompletionRequest.model_fields) - set(body) - {"stream_options"}
    assert not missing
    resp = http.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["choices"][0]["token_ids"]) == 1
