"""Chat templates: a conversation becomes token ids plus the mask of the tokens trained on.

Five templates, each defined once here and used by SFT, generation, serving and export:

- "picodac":  `<BOS>prompt<SEP>response<EOS>prompt<SEP>response<EOS>...` (tokens `<PAD> <BOS> <EOS> <SEP>
  <UNK>`). It has no roles, so a system message is only allowed first and is rendered as the start of the
  first prompt, `system + "\\n\\n" + prompt`; two user (or two assistant) messages in a row are rejected.
  A leading assistant message gets an empty prompt (`<BOS><SEP>greeting<EOS>`).
- "microdac": `<|bos|><|system|>…<|sep|><|user|>…<|sep|><|assistant|>…<|sep|>` (tokens `<|pad|> <|bos|>
  <|eos|> <|unk|> <|user|> <|assistant|> <|sep|> <|system|>`). The assistant turn ends with `<|sep|>`.
- "chatml":   `<|im_start|>role\\ncontent<|im_end|>\\n` per message, ChatML as in Qwen (tokens
  `<|endoftext|> <|im_start|> <|im_end|>`; `<|endoftext|>` is eos and pad, there is no bos).
- "llama3":   `<|begin_of_text|>`, then `<|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>` per
  message, as Llama 3 (tokens `<|end_of_text|> <|begin_of_text|> <|start_header_id|> <|end_header_id|>
  <|eot_id|>`). `<|end_of_text|>` is eos and pad and takes id 0 like the other templates' pad; the others
  follow in Llama 3's order. A turn ends with `<|eot_id|>`, a document with `<|end_of_text|>`.
- "llama2":   `<s>[INST] <<SYS>>\\nsystem\\n<</SYS>>\\n\\nuser [/INST] reply</s><s>[INST] user [/INST]`, the
  Llama-2-chat layout (tokens `<unk> <s> </s>` with Llama 2's ids; `[INST]` and `<<SYS>>` are plain text;
  `<unk>` doubles as pad, as in Llama 2 fine-tunes, since byte-level BPE never produces it). Like picodac it
  has no system role: a system message may only come first, user and assistant turns alternate, and a
  reply with no user message before it gets an empty one. The assistant header is ` [/INST]`; the space
  before the reply belongs to the reply (trained) and there is none before `</s>` (see below).

Design choices, and why:
- Message content is stripped of surrounding whitespace (Jinja `| trim`, Python `str.strip`, which agree).
  This is what makes segment-wise encoding exact: in ChatML the text run `assistant\\n` + content would be
  one string for Hugging Face, and a content starting with spaces could merge with the header's newline
  into one pre-token. With stripped content every pre-token boundary falls on the header/content seam, so
  encoding the pieces separately gives exactly the ids of encoding the whole run. llama2's seam is `]` +
  ` reply`: whatever the reply starts with, both pre-tokenizers split right after `]`, and the space goes
  with the reply's first word as Hugging Face splits it. Meta's space before `</s>` would join the reply's
  last piece or not depending on its last character, so there is none.
  Two known limits, where the layout leaves no choice: with the "bytelevel" (GPT-2) pre-tokenizer,
  Hugging Face splits llama3's `\\n\\n` + reply as `\\n` `\\n` `reply`, while the generation prompt ends
  with `\\n\\n` alone; fucina encodes the header as the prompt has it, so training and generation see the
  same ids, and HF's ids differ there (the text is the same). With the "italian" pre-tokenizer a reply
  that starts with a sentence stop (`(`, `...`) joins the newline before it (chatml and llama3).
- Ids are built from segments (special ids + `tok.encode(text)`), never by searching the rendered string,
  so the mask is exact by construction: it is True on the assistant's content and on its end marker
  (`<EOS>`, `<|sep|>`, `<|im_end|>`, `<|eot_id|>`, `</s>`), never on system/user text, the assistant
  header (`<SEP>`, `<|assistant|>`, `<|im_start|>assistant\\n`, `<|start_header_id|>assistant<|end_header_id|>\\n\\n`,
  ` [/INST]`) or the newline after `<|im_end|>`.
- Adjacent untrained text pieces are joined before encoding (e.g. picodac's system + prompt), because
  Hugging Face encodes the text between two special tokens as one string.
- `tok.encode` treats spelled special tokens as ordinary text, so message content can never inject a role.
- The `jinja` string is the same template for `transformers.apply_chat_template` (tokenize=True gives the
  same ids for content without spelled special tokens). It avoids `{% generation %}` and `loop.previtem`
  so that other Jinja engines (llama.cpp's minja) can run it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fucina.errors import ConfigError, DataError, TokenizerError

if TYPE_CHECKING:
    from fucina.tokenizer import FucinaTokenizer

ROLES = ("system", "user", "assistant")
TRAIN_ON_CHOICES = ("all", "last")


@dataclass(frozen=True)
class EncodedConversation:
    """Token ids of a rendered conversation and, per token, whether the model is trained on it."""

    input_ids: list[int]
    assistant_mask: list[bool]  # True on tokens trained on: assistant content + its end marker


@dataclass(frozen=True)
class Segment:
    """One piece of a rendered conversation: a special token (by its string) or a run of plain text."""

    text: str
    special: bool = False
    trained: bool = False


def _special(token: str, trained: bool = False) -> Segment:
    return Segment(token, special=True, trained=trained)


def _text(text: str, trained: bool = False) -> Segment:
    return Segment(text, special=False, trained=trained)


def _validated(messages: Sequence[Mapping]) -> list[tuple[str, str]]:
    """(role, stripped content) pairs; DataError naming the message index on anything malformed."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise DataError(f"a conversation must be a list of messages, got {type(messages).__name__}")
    if not messages:
        raise DataError("a conversation needs at least one message")
    turns = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise DataError(f"message {index} is a {type(message).__name__}, expected a dict")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(f"message {index} has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"message {index} has no text 'content' (got {type(content).__name__})")
        turns.append((role, content.strip()))
    return turns


def _trained_turns(turns: list[tuple[str, str]], train_on: str) -> set[int]:
    """Indices of the assistant turns whose tokens count in the loss."""
    if train_on not in TRAIN_ON_CHOICES:
        raise ConfigError(f"train_on must be one of {', '.join(TRAIN_ON_CHOICES)}, got {train_on!r}")
    assistant = [i for i, (role, _) in enumerate(turns) if role == "assistant"]
    return set(assistant[-1:] if train_on == "last" else assistant)


class ChatTemplate:
    """Base of the templates: subclasses say how messages become segments; encoding is shared."""

    name: str
    special_tokens: tuple[str, ...]  # in id order: the trainer gives them ids 0, 1, 2, ...
    pad_token: str
    bos_token: str | None
    eos_token: str
    unk_token: str | None
    stop_tokens: tuple[str, ...]  # tokens that end an assistant turn
    jinja: str

    def segments(
        self, turns: list[tuple[str, str]], trained: set[int], add_generation_prompt: bool
    ) -> list[Segment]:
        raise NotImplementedError

    def render(self, messages: Sequence[Mapping], add_generation_prompt: bool = False) -> str:
        """The conversation as text, special tokens spelled out: what the Jinja template renders."""
        segments = self.segments(_validated(messages), set(), add_generation_prompt)
        return "".join(segment.text for segment in segments)

    def encode(
        self, tok: FucinaTokenizer, messages: Sequence[Mapping], train_on: str = "all"
    ) -> EncodedConversation:
        """Token ids of the whole conversation and the mask of its trained tokens (see module doc)."""
        turns = _validated(messages)
        return self._encode_segments(tok, self.segments(turns, _trained_turns(turns, train_on), False))

    def encode_prompt(self, tok: FucinaTokenizer, messages: Sequence[Mapping]) -> list[int]:
        """Ids of the conversation followed by the header that asks the model for the assistant's reply."""
        return self._encode_segments(tok, self.segments(_validated(messages), set(), True)).input_ids

    def stop_token_ids(self, tok: FucinaTokenizer) -> list[int]:
        """Ids that end an assistant turn (generation stops on any of them)."""
        return [self._special_id(tok, token) for token in self.stop_tokens]

    def _special_id(self, tok: FucinaTokenizer, token: str) -> int:
        token_id = tok.token_to_id(token)
        if token_id is None:
            raise TokenizerError(
                f"the tokenizer has no {token!r} token, which the {self.name!r} template needs"
            )
        return token_id

    def _encode_segments(self, tok: FucinaTokenizer, segments: list[Segment]) -> EncodedConversation:
        input_ids: list[int] = []
        assistant_mask: list[bool] = []
        for segment in _join_text_runs(segments):
            ids = [self._special_id(tok, segment.text)] if segment.special else tok.encode(segment.text)
            input_ids.extend(ids)
            assistant_mask.extend([segment.trained] * len(ids))
        return EncodedConversation(input_ids, assistant_mask)

    def __repr__(self) -> str:
        return f"ChatTemplate({self.name!r})"


def _join_text_runs(segments: list[Segment]) -> list[Segment]:
    """Adjacent text segments with the same mask become one, encoded as one string like HF does."""
    joined: list[Segment] = []
    for segment in segments:
        previous = joined[-1] if joined else None
        if previous and not previous.special and not segment.special and previous.trained == segment.trained:
            joined[-1] = _text(previous.text + segment.text, segment.trained)
        else:
            joined.append(segment)
    return joined


class PicoDACTemplate(ChatTemplate):
    name = "picodac"
    special_tokens = ("<PAD>", "<BOS>", "<EOS>", "<SEP>", "<UNK>")
    pad_token, bos_token, eos_token, unk_token = "<PAD>", "<BOS>", "<EOS>", "<UNK>"
    stop_tokens = ("<EOS>",)
    jinja = (
        "{%- set ns = namespace(previous='') -%}"
        "{%- for message in messages -%}"
        "{%- if loop.first -%}{{ '<BOS>' }}{%- endif -%}"
        "{%- set content = message['content'] | trim -%}"
        "{%- if message['role'] == 'system' -%}"
        "{%- if not loop.first -%}{{ raise_exception('picodac: a system message may only come first') }}"
        "{%- endif -%}"
        "{{ content + '\\n\\n' }}"
        "{%- elif message['role'] == 'user' -%}"
        "{%- if ns.previous == 'user' -%}{{ raise_exception('picodac: two user messages in a row') }}"
        "{%- endif -%}"
        "{{ content }}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{%- if ns.previous == 'assistant' -%}"
        "{{ raise_exception('picodac: two assistant messages in a row') }}{%- endif -%}"
        "{{ '<SEP>' + content + '<EOS>' }}"
        "{%- else -%}{{ raise_exception('picodac: unknown role ' + message['role']) }}"
        "{%- endif -%}"
        "{%- set ns.previous = message['role'] -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<SEP>' }}{%- endif -%}"
    )

    def segments(self, turns, trained, add_generation_prompt):
        segments = [_special("<BOS>")]
        previous = ""
        for index, (role, content) in enumerate(turns):
            if role == "system":
                if index != 0:
                    raise DataError(
                        f"message {index}: picodac takes a system message only as the first message"
                    )
                segments.append(_text(content + "\n\n"))
            elif role == previous:
                raise DataError(f"message {index}: picodac needs user and assistant turns to alternate")
            elif role == "user":
                segments.append(_text(content))
            else:
                is_trained = index in trained
                segments += [_special("<SEP>"), _text(content, is_trained), _special("<EOS>", is_trained)]
            previous = role
        if add_generation_prompt:
            segments.append(_special("<SEP>"))
        return segments


class MicroDACTemplate(ChatTemplate):
    name = "microdac"
    special_tokens = (
        "<|pad|>",
        "<|bos|>",
        "<|eos|>",
        "<|unk|>",
        "<|user|>",
        "<|assistant|>",
        "<|sep|>",
        "<|system|>",
    )
    pad_token, bos_token, eos_token, unk_token = "<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>"
    stop_tokens = ("<|sep|>", "<|eos|>")
    jinja = (
        "{%- for message in messages -%}"
        "{%- if loop.first -%}{{ '<|bos|>' }}{%- endif -%}"
        "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
        "{{ raise_exception('microdac: unknown role ' + message['role']) }}{%- endif -%}"
        "{{ '<|' + message['role'] + '|>' + (message['content'] | trim) + '<|sep|>' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|assistant|>' }}{%- endif -%}"
    )

    def segments(self, turns, trained, add_generation_prompt):
        segments = [_special("<|bos|>")]
        for index, (role, content) in enumerate(turns):
            is_trained = index in trained
            segments += [_special(f"<|{role}|>"), _text(content, is_trained), _special("<|sep|>", is_trained)]
        if add_generation_prompt:
            segments.append(_special("<|assistant|>"))
        return segments


class ChatMLTemplate(ChatTemplate):
    name = "chatml"
    special_tokens = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    pad_token, bos_token, eos_token, unk_token = "<|endoftext|>", None, "<|endoftext|>", None
    stop_tokens = ("<|im_end|>", "<|endoftext|>")
    jinja = (
        "{%- for message in messages -%}"
        "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
        "{{ raise_exception('chatml: unknown role ' + message['role']) }}{%- endif -%}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + (message['content'] | trim) + '<|im_end|>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    )

    def segments(self, turns, trained, add_generation_prompt):
        segments = []
        for index, (role, content) in enumerate(turns):
            is_trained = index in trained
            segments += [
                _special("<|im_start|>"),
                _text(role + "\n"),
                _text(content, is_trained),
                _special("<|im_end|>", is_trained),
                _text("\n"),
            ]
        if add_generation_prompt:
            segments += [_special("<|im_start|>"), _text("assistant\n")]
        return segments


class Llama3Template(ChatTemplate):
    name = "llama3"
    special_tokens = (
        "<|end_of_text|>",
        "<|begin_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    )
    pad_token, bos_token, eos_token, unk_token = (
        "<|end_of_text|>",
        "<|begin_of_text|>",
        "<|end_of_text|>",
        None,
    )
    stop_tokens = ("<|eot_id|>", "<|end_of_text|>")
    jinja = (
        "{%- for message in messages -%}"
        "{%- if loop.first -%}{{ '<|begin_of_text|>' }}{%- endif -%}"
        "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
        "{{ raise_exception('llama3: unknown role ' + message['role']) }}{%- endif -%}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
        " + (message['content'] | trim) + '<|eot_id|>' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
    )

    def segments(self, turns, trained, add_generation_prompt):
        segments = [_special("<|begin_of_text|>")]
        for index, (role, content) in enumerate(turns):
            is_trained = index in trained
            segments += [
                *_llama3_header(role),
                _text(content, is_trained),
                _special("<|eot_id|>", is_trained),
            ]
        if add_generation_prompt:
            segments += _llama3_header("assistant")
        return segments


def _llama3_header(role: str) -> list[Segment]:
    return [_special("<|start_header_id|>"), _text(role), _special("<|end_header_id|>"), _text("\n\n")]


class Llama2Template(ChatTemplate):
    name = "llama2"
    special_tokens = ("<unk>", "<s>", "</s>")
    pad_token, bos_token, eos_token, unk_token = "<unk>", "<s>", "</s>", "<unk>"
    stop_tokens = ("</s>",)
    jinja = (
        "{%- set ns = namespace(previous='') -%}"
        "{%- for message in messages -%}"
        "{%- set content = message['content'] | trim -%}"
        "{%- if message['role'] == 'system' -%}"
        "{%- if not loop.first -%}{{ raise_exception('llama2: a system message may only come first') }}"
        "{%- endif -%}"
        "{{ '<s>[INST] <<SYS>>\\n' + content + '\\n<</SYS>>\\n\\n' }}"
        "{%- elif message['role'] == 'user' -%}"
        "{%- if ns.previous == 'user' -%}{{ raise_exception('llama2: two user messages in a row') }}"
        "{%- endif -%}"
        "{%- if ns.previous != 'system' -%}{{ '<s>[INST] ' }}{%- endif -%}"
        "{{ content }}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{%- if ns.previous == 'assistant' -%}"
        "{{ raise_exception('llama2: two assistant messages in a row') }}{%- endif -%}"
        "{%- if ns.previous not in ['system', 'user'] -%}{{ '<s>[INST] ' }}{%- endif -%}"
        "{{ ' [/INST] ' + content + '</s>' }}"
        "{%- else -%}{{ raise_exception('llama2: unknown role ' + message['role']) }}"
        "{%- endif -%}"
        "{%- set ns.previous = message['role'] -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}"
        "{%- if ns.previous not in ['system', 'user'] -%}{{ '<s>[INST] ' }}{%- endif -%}"
        "{{ ' [/INST]' }}"
        "{%- endif -%}"
    )

    def segments(self, turns, trained, add_generation_prompt):
        segments = []
        previous = ""  # a pair `[INST] ... [/INST]` is open after a system or user message
        for index, (role, content) in enumerate(turns):
            if role == "system":
                if index != 0:
                    raise DataError(
                        f"message {index}: llama2 takes a system message only as the first message"
                    )
                segments += [_special("<s>"), _text(f"[INST] <<SYS>>\n{content}\n<</SYS>>\n\n")]
            elif role == previous:
                raise DataError(f"message {index}: llama2 needs user and assistant turns to alternate")
            elif role == "user":
                if previous != "system":
                    segments += [_special("<s>"), _text("[INST] ")]
                segments.append(_text(content))
            else:
                is_trained = index in trained
                segments += [
                    *_llama2_header(previous),
                    _text(" " + content, is_trained),
                    _special("</s>", is_trained),
                ]
            previous = role
        if add_generation_prompt:
            segments += _llama2_header(previous)
        return segments


def _llama2_header(previous: str) -> list[Segment]:
    """` [/INST]`, after an empty user turn when no system or user message has opened the pair."""
    opening = [] if previous in ("system", "user") else [_special("<s>"), _text("[INST] ")]
    return [*opening, _text(" [/INST]")]


_TEMPLATES: dict[str, ChatTemplate] = {
    template.name: template
    for template in (
        PicoDACTemplate(),
        MicroDACTemplate(),
        ChatMLTemplate(),
        Llama3Template(),
        Llama2Template(),
    )
}
CHAT_TEMPLATE_NAMES: tuple[str, ...] = tuple(_TEMPLATES)


def get_chat_template(name: str) -> ChatTemplate:
    """The template called `name`; ConfigError listing the known names otherwise."""
    try:
        return _TEMPLATES[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"unknown chat template {name!r}; choose one of {', '.join(CHAT_TEMPLATE_NAMES)}"
        ) from None
