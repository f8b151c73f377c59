"""Streaming detokenisation and chat sessions (fucina.inference.chat) with a real trained tokenizer."""

from __future__ import annotations

import pytest

from fucina.inference.chat import ChatSession, StreamingDetokenizer, fit_prompt
from fucina.inference.generate import SamplingConfig
from fucina.resources import builtin_chat_file, builtin_prose_files
from fucina.tokenizer import FucinaTokenizer, _unicode_to_byte, train_tokenizer
from tiny_models import tiny_model

ITALIAN = "Perché è già così? Più caffè, città e virtù: ciò è tutto."


@pytest.fixture(scope="module")
def tokenizer() -> FucinaTokenizer:
    texts = [path.read_text(encoding="utf-8") for path in builtin_prose_files()[:4]]
    texts.append(builtin_chat_file().read_text(encoding="utf-8"))
    return train_tokenizer(texts, 400, template="chatml", show_progress=False)


def byte_tokens(tokenizer: FucinaTokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte: every accented letter arrives in two halves."""
    char_of_byte = {b: c for c, b in _unicode_to_byte().items()}
    return [tokenizer.token_to_id(char_of_byte[b]) for b in text.encode("utf-8")]


def streamed(detokenizer: StreamingDetokenizer, ids: list[int]) -> list[str]:
    pieces = [detokenizer.push(i) for i in ids]
    return [*pieces, detokenizer.finish()]


def test_accented_characters_split_across_tokens_are_never_emitted_in_halves(tokenizer):
    ids = byte_tokens(tokenizer, ITALIAN)
    pieces = streamed(StreamingDetokenizer(tokenizer), ids)
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == ITALIAN
    assert sum(1 for piece in pieces if piece) == len(ITALIAN)  # one whole character per completion


def test_streamed_text_equals_decoding_at_once_with_real_tokens(tokenizer):
    ids = tokenizer.encode(ITALIAN * 3)
    detokenizer = StreamingDetokenizer(tokenizer)
    assert "".join(streamed(detokenizer, ids)) == tokenizer.decode(ids) == detokenizer.text


def test_text_that_could_become_a_stop_string_is_held_back(tokenizer):
    detokenizer = StreamingDetokenizer(tokenizer, stop_strings=["Utente:"])
    shown = "".join(detokenizer.push(i) for i in byte_tokens(tokenizer, "Ciao! Ute"))
    assert shown == "Ciao! "  # "Ute" may still become "Utente:"
    rest = "".join(detokenizer.push(i) for i in byte_tokens(tokenizer, "nte: e poi altro"))
    assert rest == "" and detokenizer.stopped
    assert detokenizer.text == "Ciao! " and detokenizer.finish() == ""
    assert detokenizer.push(tokenizer.encode("x")[0]) == ""  # nothing after a stop


def test_held_back_text_is_released_when_it_cannot_be_a_stop_string(tokenizer):
    detokenizer = StreamingDetokenizer(tokenizer, stop_strings=["Utente:", "###"])
    pieces = streamed(detokenizer, byte_tokens(tokenizer, "Ciao Uto # e ## fine #"))
    assert "".join(pieces) == "Ciao Uto # e ## fine #" and not detokenizer.stopped
    assert pieces[-1] == "#"  # a trailing "#" is held until the end: it could begin "###"


def test_a_stop_string_inside_one_token_cuts_the_text_before_it(tokenizer):
    ids = tokenizer.encode("Va bene. ### Altro testo")
    detokenizer = StreamingDetokenizer(tokenizer, stop_strings=["###"])
    assert "".join(streamed(detokenizer, ids)) == "Va bene. " and detokenizer.stopped


def test_fit_prompt_keeps_the_last_tokens_and_room_for_a_reply():
    prompt, budget = fit_prompt(list(range(100)), context_length=64, max_new_tokens=16)
    assert prompt == list(range(52, 100)) and budget == 16
    prompt, budget = fit_prompt(list(range(10)), context_length=64, max_new_tokens=100)
    assert prompt == list(range(10)) and budget == 54


def test_chat_session_keeps_the_history_within_the_context_and_the_system_message(tokenizer):
    model = tiny_model(vocab_size=tokenizer.vocab_size, context_length=128).eval()
    sampling = SamplingConfig(
        max_new_tokens=8, greedy=True, stop_token_ids=tokenizer.template.stop_token_ids(tokenizer)
    )
    session = ChatSession(model, tokenizer, sampling, system="Rispondi in italiano.")
    for i in range(6):
        reply = "".join(session.send(f"Domanda numero {i} sulla cucina italiana?"))
        assert session.history[-1] == {"role": "assistant", "content": reply.strip() or "…"}
        prompt, budget = session.prompt()
        assert len(prompt) + budget <= 128 and budget == 8
    assert len(session.history) == 12
    session.history.append({"role": "user", "content": "Ultima domanda?"})
    text = tokenizer.decode(session.prompt()[0])
    assert "Rispondi in italiano." in text and "Ultima domanda?" in text  # system and newest kept
    assert "numero 0" not in text  # the oldest turns were dropped
    session.reset()
    assert session.history == [] and session.system
