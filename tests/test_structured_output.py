"""Structured output through a real `levante serve` on SmolLM2 and the openai client: every answer parses and
validates against its JSON schema, greedy and sampled at temperature 1; json_object mode; streaming; GBNF on
completions; schemas the engine cannot compile are 400s naming the problem."""

from __future__ import annotations

import concurrent.futures as cf
import json
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

SCHEMAS = json.loads((Path(__file__).parent / "data" / "json_schemas.json").read_text())


@pytest.fixture(scope="module")
def server(smollm2_server):
    return smollm2_server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=300)


def _ask(client, name: str, schema: dict, temperature: float, seed: int):
    r = client.chat.completions.create(
        model="levante", temperature=temperature, seed=seed, max_tokens=400,
        messages=[{"role": "system", "content": "Answer with JSON only."},
                  {"role": "user", "content": f"Give an example {name.replace('_', ' ')} object."}],
        response_format={"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}})
    return r.choices[0]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_answer_parses_and_validates(client, temperature):
    with cf.ThreadPoolExecutor(8) as pool:  # concurrent: the engine batches rows with different grammars
        futs = {name: pool.submit(_ask, client, name, schema, temperature, i)
                for i, (name, schema) in enumerate(SCHEMAS.items())}
        for name, f in futs.items():
            choice = f.result()
            assert choice.finish_reason == "stop", (name, choice.message.content)
            jsonschema.validate(json.loads(choice.message.content), SCHEMAS[name])


def test_json_object_mode_and_streaming(client):
    r = client.chat.completions.create(model="levante", max_tokens=300, temperature=0.7, seed=1,
                                       messages=[{"role": "system", "content": "Answer with JSON only."},
                                                 {"role": "user", "content": "Give a JSON object describing a "
                                                                             "book: title and author."}],
                                       response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict) and r.choices[0].finish_reason == "stop"
    schema = SCHEMAS["nested"]
    stream = client.chat.completions.create(
        model="levante", max_tokens=300, temperature=1.0, seed=4, stream=True,
        messages=[{"role": "user", "content": "A user with an address."}],
        response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), schema)


def test_completions_take_response_format_and_gbnf(client, server):
    r = client.completions.create(model="levante", prompt="A person:", max_tokens=200, temperature=1.0, seed=5,
                                  extra_body={"response_format": {"type": "json_schema", "json_schema": {
                                      "name": "p", "schema": SCHEMAS["person"]}}})
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMAS["person"])
    gbnf = 'root ::= "yes" | "no"'
    r = httpx.post(server + "/v1/completions", json={"prompt": "Is water wet? Answer:", "max_tokens": 5,
                                                     "grammar": gbnf, "n": 3, "temperature": 1.0}, timeout=60)
    assert r.status_code == 200 and {c["text"] for c in r.json()["choices"]} <= {"yes", "no"}


@pytest.mark.parametrize("body, param, match", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such"}}}},
     "response_format", "cannot compile the JSON schema"),
    ({"response_format": {"type": "xml"}}, "response_format", "unsupported response_format type"),
    ({"grammar": "root ::= missing"}, "grammar", "cannot compile the GBNF grammar"),
    ({"grammar": 'root ::= "a"', "response_format": {"type": "json_object"}}, "grammar", "at most one"),
])
def test_uncompilable_grammars_are_400s(server, body, param, match):
    r = httpx.post(server + "/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **body}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and match in err["message"]
    assert httpx.get(server + "/health").status_code == 200
