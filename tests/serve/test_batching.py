"""Continuous batching seen from clients: concurrent streams decode together and each gets the text it
gets alone; a full server answers 429; a client that goes away frees its row at once."""

from __future__ import annotations

import asyncio
import http.client
import json
import time
import urllib.request

import openai
import pytest
from openai import AsyncOpenAI, OpenAI
from serving import MODEL_NAME, start_server

PROMPTS = [
    "Perché", "Ciao, come stai?", "Il caffè", "città e virtù", "Più", "ciò è tutto",
    "Com'è il caffè in città?", "buono", "Raccontami", "La", "Roma è una città antica e bella",
    "Perché è già così", "e", "tutto", "virtù: ciò", "Un giorno d'estate, al mare",
    "Milano", "Il treno per Napoli parte alle otto", "Buongiorno!", "Che ore sono?", "Ho fame", "Sì",
    "Dove si trova la stazione?", "Mi piace il gelato", "Grazie mille", "Arrivederci", "Firenze è",
    "Ieri sera", "Domani piove", "Il gatto dorme sul divano", "Perché no?", "Così",
]  # fmt: skip
LONG = {"ignore_eos": True}  # generate exactly max_tokens: the stream stays busy


def _health(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/health", timeout=10) as response:
        return json.loads(response.read())


def test_32_concurrent_streams_each_equal_their_solo_greedy_text(server_url):
    options = dict(model=MODEL_NAME, temperature=0, max_tokens=24, extra_body=LONG)
    client = OpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0)
    alone = [client.completions.create(prompt=p, **options).choices[0].text for p in PROMPTS]
    peak = 0

    async def watch(done: asyncio.Event) -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, (await asyncio.to_thread(_health, server_url))["running"])
            await asyncio.sleep(0.005)

    async def run() -> list[str]:
        together = AsyncOpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0)

        async def one(prompt: str) -> str:
            stream = await together.completions.create(prompt=prompt, stream=True, **options)
            return "".join([chunk.choices[0].text async for chunk in stream])

        done = asyncio.Event()
        watcher = asyncio.create_task(watch(done))
        texts = await asyncio.gather(*(one(p) for p in PROMPTS))
        done.set()
        await watcher
        return texts

    assert len(PROMPTS) == 32
    assert asyncio.run(run()) == alone  # 16 rows: half of them waited in the queue, then joined
    assert peak > 1  # the requests did decode side by side


def test_requests_beyond_rows_and_queue_are_429_while_others_run(served_model_dir):
    """One row and one waiting place, both taken by a running request for two long choices."""
    with start_server(served_model_dir, max_batch=1, max_queue=1) as url:
        body = {"prompt": "Ciao", "max_tokens": 1000, "n": 2, "stream": True, **LONG}
        request = urllib.request.Request(f"{url}/v1/completions", json.dumps(body).encode())
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        with urllib.request.urlopen(request, timeout=60) as holder:
            assert holder.readline().startswith(b"data: ")  # admitted: it holds the row and the queue
            health = _health(url)
            assert (health["running"], health["waiting"]) == (1, 1)
            with pytest.raises(openai.RateLimitError) as caught:
                client.completions.create(model=MODEL_NAME, prompt="Ciao", max_tokens=2)
            assert caught.value.body["type"] == "rate_limit_error"
        deadline = time.monotonic() + 10
        while _health(url)["running"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert client.completions.create(model=MODEL_NAME, prompt="Ciao", max_tokens=2).choices


def test_a_client_that_disconnects_frees_its_row_at_once(served_model_dir):
    with start_server(served_model_dir, max_batch=1, max_queue=0) as url:
        before = _health(url)["generated_tokens"]
        body = {"prompt": "Ciao", "max_tokens": 1000, "stream": True, **LONG}
        request = urllib.request.Request(f"{url}/v1/completions", json.dumps(body).encode())
        response = urllib.request.urlopen(request, timeout=60)
        assert response.readline().startswith(b"data: ")
        response.close()
        deadline = time.monotonic() + 5
        while _health(url)["running"] and time.monotonic() < deadline:
            time.sleep(0.005)
        health = _health(url)
        assert health["running"] == 0
        assert health["generated_tokens"] - before < 1000  # cut short, not run to its end
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        reply = client.completions.create(model=MODEL_NAME, prompt="Ciao", max_tokens=2, extra_body=LONG)
        assert reply.usage.completion_tokens == 2  # the only row was free again


def test_a_whole_response_client_that_gives_up_frees_its_row_too(served_model_dir):
    with start_server(served_model_dir, max_batch=1, max_queue=0) as url:
        before = _health(url)["generated_tokens"]
        body = json.dumps({"prompt": "Ciao", "max_tokens": 1000, **LONG})
        connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=0.2)
        connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        with pytest.raises(TimeoutError):
            connection.getresponse()
        connection.close()
        deadline = time.monotonic() + 5
        while _health(url)["running"] and time.monotonic() < deadline:
            time.sleep(0.005)
        health = _health(url)
        assert health["running"] == 0
        assert health["generated_tokens"] - before < 1000
