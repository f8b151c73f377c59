"""Text completions, echo with prompt logprobs (what lm-evaluation-harness scores with), and the
small endpoints: models, health, tokenize, detokenize."""

from __future__ import annotations

import json
import urllib.request

import pytest
from openai import OpenAI
from serving import ANSWER, MODEL_NAME, QUESTION, post_json, sse_data

from fucina.tokenizer import FucinaTokenizer

MESSAGES = [{"role": "user", "content": QUESTION}]


@pytest.fixture(scope="module")
def client(server_url) -> OpenAI:
    return OpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0)


def test_completion_streamed_equals_completion_whole(client):
    options = dict(model=MODEL_NAME, prompt="Perché è già", temperature=0, max_tokens=12)
    whole = client.completions.create(**options)
    assert whole.object == "text_completion" and whole.choices[0].finish_reason in ("stop", "length")
    chunks = list(client.completions.create(stream=True, **options))
    assert len({c.id for c in chunks}) == 1
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_echo_logprobs_score_the_prompt_as_the_decoder_scored_the_reply(client, server_url):
    """The prompt's logprobs (one forward) equal the chat reply's (step by step) at the same tokens."""
    chat = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, temperature=0, logprobs=True)
    decoded = [entry.logprob for entry in chat.choices[0].logprobs.content]
    _, tokenized = post_json(f"{server_url}/tokenize", {"messages": MESSAGES})
    _, answer = post_json(f"{server_url}/tokenize", {"prompt": ANSWER})
    ids = tokenized["tokens"] + answer["tokens"]
    scored = client.completions.create(
        model=MODEL_NAME, prompt=ids, max_tokens=0, echo=True, logprobs=1, temperature=0
    )
    logprobs = scored.choices[0].logprobs
    assert logprobs.token_logprobs[0] is None  # nothing precedes the first token
    assert logprobs.token_logprobs[len(tokenized["tokens"]) :] == pytest.approx(decoded, abs=1e-4)
    assert scored.usage.completion_tokens == 0
    assert "".join(logprobs.tokens).endswith(ANSWER[-5:])
    assert all(len(top) == 1 for top in logprobs.top_logprobs[1:])


def test_echo_of_a_text_prompt_returns_the_prompt_then_the_continuation(client):
    reply = client.completions.create(
        model=MODEL_NAME, prompt="Più caffè", max_tokens=4, echo=True, logprobs=0, temperature=0
    )
    text = reply.choices[0].text
    assert text.startswith("Più caffè") and len(text) > len("Più caffè")
    logprobs = reply.choices[0].logprobs
    assert logprobs.token_logprobs[0] is not None  # a text prompt follows an EOS, which conditions it
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)


def test_raw_completion_stream_ends_with_done(server_url):
    body = {"prompt": "Ciao", "max_tokens": 3, "temperature": 0, "stream": True}
    payloads = sse_data(f"{server_url}/v1/completions", body)
    assert payloads[-1] == b"[DONE]"
    assert json.loads(payloads[-2])["choices"][0]["finish_reason"] in ("stop", "length")


def test_models_health_tokenize_and_detokenize(client, server_url, served_model_dir):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    with urllib.request.urlopen(f"{server_url}/health", timeout=10) as response:
        assert json.loads(response.read())["status"] == "ok"
    tokenizer = FucinaTokenizer.load(served_model_dir)
    status, tokenized = post_json(f"{server_url}/tokenize", {"prompt": ANSWER})
    assert status == 200 and tokenized["tokens"] == tokenizer.encode(ANSWER)
    assert tokenized["max_model_len"] == 1024
    status, detokenized = post_json(f"{server_url}/detokenize", {"tokens": tokenized["tokens"]})
    assert status == 200 and detokenized["text"] == ANSWER
