"""Acceptance suite: `turbine serve` driven by the official Python clients (`ollama`, `openai`)
and, through Node, the `ollama` npm package.

Starts the workspace's `target/release/turbine` (built with `cargo build --release -p
turbine-shell` when missing; `TURBINE_BIN` overrides the path) on a free loopback port with
OLLAMA_HOST, on the default model (`scripts/fetch-default-model.sh` installs it). `.ci/run`
runs it: `pytest tests/clients`. The npm test needs `TURBINE_NPM_PREFIX` (a folder where
`npm install --prefix DIR ollama` was run) and is skipped without it.
"""

import enum
import json
import os
import subprocess
from pathlib import Path
from typing import Optional

import ollama
import openai
import pydantic
import pytest

from turbine_server import serve

MODEL = "gemma3:270m"
MISSING = "no-such-model:latest"
# Short, deterministic generations keep the suite fast on CPU.
OPTS = {"temperature": 0, "num_predict": 8}


@pytest.fixture(scope="session")
def host():
    with serve() as url:
        yield url


@pytest.fixture(scope="session")
def client(host):
    return ollama.Client(host=host, timeout=600)


@pytest.fixture(scope="session")
def oai(host):
    # The key is required by the client and ignored by the server, as with Ollama.
    return openai.OpenAI(base_url=host + "/v1", api_key="ollama", timeout=600, max_retries=0)


def test_generate(client):
    r = client.generate(model=MODEL, prompt="The capital of France is", options=OPTS)
    assert r.done and r.done_reason == "length"
    assert isinstance(r.response, str) and r.response.strip()
    assert r.eval_count == 8 and r.prompt_eval_count > 0
    assert r.total_duration > 0 and r.eval_duration > 0
    assert r.context and all(isinstance(t, int) for t in r.context)


def test_generate_streamed(client):
    parts = list(client.generate(model=MODEL, prompt="Once upon a time", options=OPTS, stream=True))
    assert parts[-1].done and parts[-1].eval_count == 8
    assert all(not p.done for p in parts[:-1])
    assert "".join(p.response for p in parts).strip()


def test_chat(client):
    messages = [{"role": "user", "content": "Say hello."}]
    r = client.chat(model=MODEL, messages=messages, options=OPTS)
    assert r.done and r.message.role == "assistant"
    assert r.message.content.strip()
    assert r.eval_count == 8


def test_chat_streamed_matches_whole(client):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Why is the sky blue?"},
    ]
    whole = client.chat(model=MODEL, messages=messages, options=OPTS)
    parts = list(client.chat(model=MODEL, messages=messages, options=OPTS, stream=True))
    assert len(parts) > 1 and parts[-1].done
    assert parts[-1].done_reason == "length"
    assert "".join(p.message.content for p in parts) == whole.message.content


def test_list(client):
    models = client.list().models
    m = next(m for m in models if m.model == MODEL)
    assert m.size > 200_000_000 and len(m.digest) == 64
    assert m.details.family == "gemma3" and m.details.quantization_level == "Q4_K_M"
    assert m.modified_at is not None


def test_show(client):
    r = client.show(MODEL)
    assert r.details.family == "gemma3"
    assert r.modelinfo["general.architecture"] == "gemma3"
    assert "completion" in r.capabilities
    assert r.template


def test_ps(client):
    client.generate(model=MODEL, prompt="Hi", options=OPTS)
    loaded = client.ps().models
    m = next(m for m in loaded if m.model == MODEL)
    assert m.expires_at is not None and m.size > 0


def test_missing_model_is_404(client):
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model=MISSING, messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 404
    assert "not found" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.show(MISSING)
    assert e.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as e:
        list(client.generate(model=MISSING, prompt="hi", stream=True))
    assert e.value.status_code == 404


def test_bad_option_type_is_400(client):
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model=MODEL, prompt="hi", options={"temperature": "hot"})
    assert e.value.status_code == 400
    assert "temperature" in e.value.error


class Mood(str, enum.Enum):
    calm = "calm"
    stormy = "stormy"


class Verdict(pydantic.BaseModel):
    """A pydantic model as users pass it: its schema has an enum, a $ref into $defs and
    an optional field (anyOf with null). No free text: every field is bounded, so even the
    base model's answer ends well within num_predict."""

    ok: bool
    count: int
    mood: Mood
    score: Optional[int] = None


def test_structured_output_follows_a_pydantic_schema(client):
    r = client.chat(
        model=MODEL,
        messages=[{"role": "user", "content": "Is the sky blue? Answer in JSON."}],
        format=Verdict.model_json_schema(),
        options={"temperature": 0, "num_predict": 64},
    )
    assert r.done_reason == "stop", r.message.content
    Verdict.model_validate_json(r.message.content)


def test_json_format_gives_an_object(client):
    r = client.generate(model=MODEL, prompt="A cat, as JSON:", format="json", options={"temperature": 0.7, "seed": 1, "num_predict": 48})
    if r.done_reason == "stop":
        assert isinstance(json.loads(r.response), dict)
    else:  # cut at num_predict: still the start of an object
        assert r.response.lstrip().startswith("{"), r.response


def test_bad_format_is_400(client):
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model=MODEL, prompt="hi", format={"type": "tuple"})
    assert e.value.status_code == 400 and "invalid format" in e.value.error


def test_openai_response_format(oai):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    r = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Is water wet?"}],
        response_format={"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema}},
        max_tokens=32,
        temperature=0,
    )
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content)["ok"], bool)


def test_openai_chat(oai):
    r = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=8,
        temperature=0,
    )
    assert r.object == "chat.completion" and r.model == MODEL
    c = r.choices[0]
    assert c.message.role == "assistant" and c.message.content.strip()
    assert c.finish_reason == "length"
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens > 0


def test_openai_chat_streamed(oai):
    kwargs = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=8,
        temperature=0,
    )
    whole = oai.chat.completions.create(**kwargs)
    chunks = list(oai.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert any(c.choices and c.choices[0].finish_reason == "length" for c in chunks)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8


def test_copy_and_delete(client):
    name = f"turbine-pytest:copy-{os.getpid()}"
    assert client.copy(MODEL, name).status == "success"
    assert client.show(name).details.family == "gemma3"
    assert any(m.model == name for m in client.list().models)
    assert client.delete(name).status == "success"
    with pytest.raises(ollama.ResponseError) as e:
        client.show(name)
    assert e.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as e:
        client.delete(name)
    assert e.value.status_code == 404
    assert any(m.model == MODEL for m in client.list().models)


def test_embed(client):
    r = client.embed(model=MODEL, input=["Why is the sky blue?", "The cat sat on the mat."])
    assert len(r.embeddings) == 2 and len(r.embeddings[0]) == 640
    for v in r.embeddings:
        assert abs(sum(x * x for x in v) - 1.0) < 1e-4
    assert r.embeddings[0] != r.embeddings[1]
    assert r.prompt_eval_count > 0
    one = client.embed(model=MODEL, input="Why is the sky blue?", dimensions=64)
    assert len(one.embeddings) == 1 and len(one.embeddings[0]) == 64
    legacy = client.embeddings(model=MODEL, prompt="Why is the sky blue?")
    assert max(abs(a - b) for a, b in zip(legacy.embedding, r.embeddings[0])) < 1e-6


def test_openai_embeddings(oai):
    r = oai.embeddings.create(model=MODEL, input=["first text", "second text"])
    assert [d.index for d in r.data] == [0, 1]
    assert len(r.data[0].embedding) == 640
    assert r.usage.prompt_tokens > 0
    short = oai.embeddings.create(model=MODEL, input="first text", dimensions=16)
    assert len(short.data[0].embedding) == 16


def test_openai_chat_logprobs(oai):
    r = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hi."}], max_tokens=5,
        temperature=0, logprobs=True, top_logprobs=2,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in content)
    assert "".join(t.token for t in content) == r.choices[0].message.content


def test_generate_logprobs(client):
    r = client.generate(model=MODEL, prompt="The sky is", options=OPTS, logprobs=True, top_logprobs=1)
    assert len(r.logprobs) == r.eval_count
    assert all(lp.logprob <= 0 for lp in r.logprobs)


def test_openai_models(oai):
    ids = [m.id for m in oai.models.list()]
    assert MODEL in ids
    m = oai.models.retrieve(MODEL)
    assert m.id == MODEL and m.object == "model"


def test_openai_missing_model(oai):
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model=MISSING, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve(MISSING)


def test_ollama_js(host):
    prefix = os.environ.get("TURBINE_NPM_PREFIX")
    if not prefix:
        pytest.skip("TURBINE_NPM_PREFIX not set (npm install --prefix DIR ollama)")
    script = Path(__file__).with_name("ollama_js.mjs")
    env = dict(os.environ, OLLAMA_HOST=host)
    r = subprocess.run(["node", str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
