"""Chat completions through the official `openai` client (and raw SSE) against a real server."""

from __future__ import annotations

import json

import pytest
from openai import OpenAI
from serving import ANSWER, MODEL_NAME, QUESTION, sse_data

from fucina.tokenizer import FucinaTokenizer

MESSAGES = [{"role": "user", "content": QUESTION}]


@pytest.fixture(scope="module")
def client(server_url) -> OpenAI:
    return OpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0)


def test_greedy_chat_reply_is_the_memorised_answer_with_openai_fields(client):
    reply = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, temperature=0)
    assert (
        reply.object == "chat.completion" and reply.model == MODEL_NAME and reply.id.startswith("chatcmpl-")
    )
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == ANSWER
    assert choice.finish_reason == "stop"
    assert reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_stream_opens_with_the_role_keeps_one_id_and_ends_with_finish_usage_and_done(client):
    chunks = list(
        client.chat.completions.create(
            model=MODEL_NAME,
            messages=MESSAGES,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ANSWER
    final = chunks[-2]
    assert final.choices[0].finish_reason == "stop" and not final.choices[0].delta.content
    assert all(c.choices[0].finish_reason is None for c in chunks[:-2])
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens > 0
    whole = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, temperature=0)
    assert usage.usage.completion_tokens == whole.usage.completion_tokens


def test_accented_text_streams_byte_exactly_never_half_a_character(server_url, served_model_dir):
    tokenizer = FucinaTokenizer.load(served_model_dir)
    split = [i for i in tokenizer.encode(ANSWER) if not _is_utf8(tokenizer.token_bytes(i))]
    assert split, "the answer must hold characters split across tokens for this test to mean anything"
    body = {"messages": MESSAGES, "temperature": 0, "stream": True}
    payloads = sse_data(f"{server_url}/v1/chat/completions", body)
    assert payloads[-1] == b"[DONE]"
    pieces = [json.loads(p)["choices"][0]["delta"].get("content") or "" for p in payloads[:-1]]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces).encode("utf-8") == ANSWER.encode("utf-8")
    assert len([p for p in pieces if p]) > 10  # streamed piece by piece, not in one block


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_spanning_tokens_is_never_sent(client, served_model_dir, stream):
    stop = "già così"
    tokenizer = FucinaTokenizer.load(served_model_dir)
    assert len(tokenizer.encode(stop)) > 2  # its characters arrive over several tokens
    reply = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, temperature=0, stop=["zzz", stop], stream=stream
    )
    if stream:
        chunks = list(reply)
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        reason = chunks[-1].choices[0].finish_reason
    else:
        text, reason = reply.choices[0].message.content, reply.choices[0].finish_reason
    assert text == ANSWER[: ANSWER.index(stop)]
    assert reason == "stop"


def test_max_tokens_cuts_the_reply_with_finish_reason_length(client):
    reply = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, temperature=0, max_completion_tokens=5
    )
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 5
    assert ANSWER.startswith(reply.choices[0].message.content)


def test_the_same_seed_gives_the_same_text_streamed_or_not(client):
    messages = [{"role": "user", "content": "Raccontami qualcosa di nuovo."}]
    options = dict(model=MODEL_NAME, messages=messages, temperature=2.0, max_tokens=24)
    whole = client.chat.completions.create(seed=11, **options).choices[0].message.content
    chunks = client.chat.completions.create(seed=11, stream=True, **options)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == whole
    others = {client.chat.completions.create(seed=s, **options).choices[0].message.content for s in range(4)}
    assert len(others) > 1  # sampling at temperature 2 does depend on the seed


def test_n_choices_are_indexed_and_greedy_choices_agree(client):
    reply = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, temperature=0, n=2)
    assert [c.index for c in reply.choices] == [0, 1]
    assert [c.message.content for c in reply.choices] == [ANSWER, ANSWER]
    chunks = list(
        client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, temperature=0, n=2, stream=True)
    )
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert mine[0].delta.role == "assistant"
        assert "".join(c.delta.content or "" for c in mine) == ANSWER
        assert mine[-1].finish_reason == "stop"


def test_logprobs_cover_the_text_and_the_greedy_token_is_the_top_one(client):
    reply = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, temperature=0, logprobs=True, top_logprobs=3
    )
    entries = reply.choices[0].logprobs.content
    assert b"".join(bytes(e.bytes) for e in entries) == ANSWER.encode("utf-8")
    for entry in entries:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].bytes == entry.bytes
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob
        assert entry.logprob <= 0
    chunks = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, temperature=0, logprobs=True, stream=True
    )
    streamed = [
        e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
    ]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in entries])
