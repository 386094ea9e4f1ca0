"""Making models through the official `ollama` Python client: `create_blob` (HEAD/POST
/api/blobs) and `create` from an uploaded GGUF and from an installed model, with system,
template and parameters; on a store of its own (the real store's blobs linked in)."""

import hashlib
import os
from pathlib import Path

import ollama
import pytest

from turbine_server import serve

MODEL = "gemma3:270m"
MODEL_SHA = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    real = Path(os.environ.get("OLLAMA_MODELS", Path.home() / ".ollama" / "models"))
    store = tmp_path_factory.mktemp("store")
    (store / "blobs").mkdir()
    (store / "blobs" / f"sha256-{MODEL_SHA}").symlink_to(real / "blobs" / f"sha256-{MODEL_SHA}")
    manifests = store / "manifests" / "registry.ollama.ai" / "library" / "gemma3"
    manifests.mkdir(parents=True)
    text = (real / "manifests" / "registry.ollama.ai" / "library" / "gemma3" / "270m").read_text()
    (manifests / "270m").write_text(text)
    for line in __import__("json").loads(text)["layers"]:
        digest = line["digest"].replace(":", "-")
        if not (store / "blobs" / digest).exists():
            (store / "blobs" / digest).symlink_to(real / "blobs" / digest)
    with serve(env={"OLLAMA_MODELS": str(store)}) as url:
        yield ollama.Client(host=url, timeout=600), store


def test_create_blob_and_a_model_from_it(scratch, tmp_path):
    client, _ = scratch
    gguf = Path(tmp_path / "tiny.gguf")
    key = b"general.architecture"
    gguf.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little") + (1).to_bytes(8, "little")
                     + len(key).to_bytes(8, "little") + key + (8).to_bytes(4, "little") + (4).to_bytes(8, "little") + b"tiny")
    digest = client.create_blob(gguf)
    assert digest == "sha256:" + hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert client.create_blob(gguf) == digest  # already there: HEAD finds it
    parts = list(client.create(model="tiny", files={"tiny.gguf": digest}, stream=True))
    assert parts[-1].status == "success"
    assert any(m.model == "tiny:latest" and m.details.family == "tiny" for m in client.list().models)


def test_create_from_a_model_with_system_and_parameters(scratch):
    client, _ = scratch
    r = client.create(model="pirate", from_=MODEL, system="You are a pirate.",
                      parameters={"temperature": 0, "num_predict": 4, "stop": ["\n"]})
    assert r.status == "success"
    shown = client.show("pirate")
    assert "temperature" in shown.parameters and "num_predict" in shown.parameters
    assert 'SYSTEM """You are a pirate."""' in shown.modelfile
    g = client.generate(model="pirate", prompt="Hello")
    assert g.done and g.eval_count <= 4
    with pytest.raises(ollama.ResponseError) as e:
        client.create(model="broken", from_=MODEL, parameters={"no_such_option": 1})
    assert e.value.status_code == 400 and "unknown parameter" in e.value.error
    client.delete("pirate")
    assert not any(m.model == "pirate:latest" for m in client.list().models)
