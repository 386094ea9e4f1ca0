"""Hosted mode through the official `ollama` Python client: API keys in both header forms
(and OLLAMA_API_KEY), per-key rate limits with their 429 headers, and HTTPS with a
self-signed certificate."""

import ssl
import subprocess

import httpx
import ollama
import pytest

from turbine_server import binary, serve

MODEL = "gemma3:270m"


def make_key(home, *args):
    out = subprocess.run(
        [str(binary()), "keys", "create", *args],
        env={"TURBINE_HOME": str(home), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    """A server with two keys: one unlimited, one allowed 2 requests a minute."""
    home = tmp_path_factory.mktemp("turbine-home")
    free = make_key(home, "--name", "free")
    tight = make_key(home, "--name", "tight", "--rpm", "2")
    with serve(env={"TURBINE_HOME": str(home)}) as url:
        yield url, free, tight


def test_both_header_forms_and_no_key(keyed):
    url, key, _ = keyed
    bare = ollama.Client(host=url, headers={"Authorization": key})
    bearer = ollama.Client(host=url, headers={"Authorization": f"Bearer {key}"})
    assert any(m.model == MODEL for m in bare.list().models)
    r = bearer.generate(model=MODEL, prompt="Hello", options={"temperature": 0, "num_predict": 4})
    assert r.done and r.eval_count == 4
    with pytest.raises(ollama.ResponseError) as e:
        ollama.Client(host=url).list()
    assert e.value.status_code == 401 and "unauthorized" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        ollama.Client(host=url, headers={"Authorization": "Bearer tb-wrong"}).list()
    assert e.value.status_code == 401


def test_ollama_api_key_environment(keyed, monkeypatch):
    url, key, _ = keyed
    monkeypatch.setenv("OLLAMA_API_KEY", key)
    assert any(m.model == MODEL for m in ollama.Client(host=url).list().models)


def test_rate_limit_429_and_headers(keyed):
    url, _, tight = keyed
    client = ollama.Client(host=url, headers={"Authorization": tight})
    first = httpx.get(url + "/api/tags", headers={"Authorization": f"Bearer {tight}"})
    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert first.headers["x-ratelimit-reset-requests"].endswith("s")
    client.list()
    with pytest.raises(ollama.ResponseError) as e:
        client.list()
    assert e.value.status_code == 429 and "requests per minute" in e.value.error
    limited = httpx.get(url + "/api/tags", headers={"Authorization": tight})
    assert limited.status_code == 429
    assert 1 <= int(limited.headers["retry-after"]) <= 30
    assert limited.headers["x-ratelimit-remaining-requests"] == "0"
    assert limited.json() == {"error": "rate limit exceeded: 2 requests per minute"}


def test_https_with_a_self_signed_certificate(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    args = ["--tls-cert", str(cert), "--tls-key", str(key)]
    with serve(args=args, cafile=str(cert)) as url:
        assert url.startswith("https://")
        client = ollama.Client(host=url, verify=ssl.create_default_context(cafile=str(cert)))
        r = client.chat(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                        options={"temperature": 0, "num_predict": 4})
        assert r.done and r.eval_count == 4
        parts = list(client.generate(model=MODEL, prompt="Once", stream=True,
                                     options={"temperature": 0, "num_predict": 4}))
        assert parts[-1].done and parts[-1].eval_count == 4
        # A client that does not trust the certificate is refused by its own TLS stack.
        with pytest.raises(Exception):
            ollama.Client(host=url).list()
