"""Chat completions through the official `openai` client against a real server: whole and streamed."""

from __future__ import annotations

import pytest
from openai import OpenAI
from serving import ANSWER, MODEL_NAME, QUESTION

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
