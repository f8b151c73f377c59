"""Export a fucina model for Ollama: the GGUF file plus a Modelfile with the model's chat template.

`ollama create NAME -f DIR/Modelfile` then serves the model with the same prompt layout it was trained on.

Design choices, and why:
- The weights and tokenizer are the GGUF export (fucina.interop.gguf), written as DIR/model.gguf and named
  `FROM ./model.gguf`, so the Modelfile works wherever the directory is moved.
- The `TEMPLATE` is Ollama's Go template over `.Messages`, written by hand once per chat template
  (OLLAMA_TEMPLATES) and kept to a small subset: `range .Messages`, `if`/`else if`/`else` on `eq`/`ne`
  of `.Role`, `.Role`, `.Content`, and one variable (`$previous`, llama2's "is a `[INST]` pair open")
  set with `:=` and `=`. Ollama passes system messages inside `.Messages`, so `.System` is not needed.
  Ollama always asks for the assistant's reply, so the template ends with the generation prompt:
  rendering a conversation gives `ChatTemplate.render(messages, add_generation_prompt=True)`.
- Where Ollama's reading differs from fucina's, it is because Go templates cannot do better, and the
  difference is documented rather than hidden: Ollama's templates have no `trim`, so message content is
  used as the client sends it (fucina strips it); Ollama merges consecutive messages of one role with a
  blank line, where picodac and llama2 refuse them; a late system message is rendered in place rather
  than refused.
- One `PARAMETER stop` per end-of-turn token of the template (its `stop_tokens`), so generation ends
  where fucina's would. Sampling defaults: temperature 0.7, top_p 0.9, top_k 40, repeat_penalty 1.1
  (Ollama's own defaults except a lower temperature, which small models need to stay on topic), and
  num_ctx set to the model's context length, since Ollama's default window can exceed the positions the
  model was trained on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from fucina.chat_template import ChatTemplate
from fucina.fsutil import staged_output
from fucina.interop.gguf import GGUFExport, export_gguf
from fucina.interop.source import ExportError, ExportSource

log = logging.getLogger(__name__)

GGUF_NAME = "model.gguf"
MODELFILE_NAME = "Modelfile"
DEFAULT_PARAMETERS = {"temperature": 0.7, "top_p": 0.9, "top_k": 40, "repeat_penalty": 1.1}

OLLAMA_TEMPLATES = {
    "picodac": (
        '<BOS>{{ range .Messages }}{{ if eq .Role "system" }}{{ .Content }}\n\n'
        '{{ else if eq .Role "user" }}{{ .Content }}'
        "{{ else }}<SEP>{{ .Content }}<EOS>{{ end }}{{ end }}<SEP>"
    ),
    "microdac": "<|bos|>{{ range .Messages }}<|{{ .Role }}|>{{ .Content }}<|sep|>{{ end }}<|assistant|>",
    "chatml": (
        "{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
        "<|im_start|>assistant\n"
    ),
    "llama3": (
        "<|begin_of_text|>{{ range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
        "{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    # $previous: the role before; a `<s>[INST] ` pair is open after a system or user message.
    "llama2": (
        '{{ $previous := "" }}{{ range .Messages }}'
        '{{ if eq .Role "system" }}<s>[INST] <<SYS>>\n{{ .Content }}\n<</SYS>>\n\n'
        '{{ else if eq .Role "user" }}{{ if ne $previous "system" }}<s>[INST] {{ end }}{{ .Content }}'
        '{{ else }}{{ if eq $previous "" }}<s>[INST] {{ end }} [/INST] {{ .Content }}</s>{{ end }}'
        "{{ $previous = .Role }}{{ end }}"
        '{{ if eq $previous "assistant" }}<s>[INST] {{ end }} [/INST]'
    ),
}


@dataclass(frozen=True)
class OllamaExport:
    """What was written: the directory, its GGUF file and the Modelfile."""

    path: Path
    gguf: GGUFExport
    modelfile: Path


def modelfile_text(template: ChatTemplate, context_length: int) -> str:
    """The Modelfile for a model with chat template `template`: FROM, TEMPLATE, stops and defaults."""
    go_template = OLLAMA_TEMPLATES.get(template.name)
    if go_template is None:  # a template added without its Ollama reading
        raise ExportError(f"no Ollama template is defined for the {template.name!r} chat template")
    lines = [f"FROM ./{GGUF_NAME}", "", f'TEMPLATE """{go_template}"""', ""]
    lines += [f'PARAMETER stop "{token}"' for token in template.stop_tokens]
    lines += [f"PARAMETER {name} {value}" for name, value in DEFAULT_PARAMETERS.items()]
    lines.append(f"PARAMETER num_ctx {context_length}")
    return "\n".join(lines) + "\n"


def export_ollama(
    source: ExportSource, out: str | Path, quant: str = "f16", overwrite: bool = False
) -> OllamaExport:
    """Write the directory `out` with model.gguf (matrices in `quant`) and a Modelfile for `ollama create`."""
    text = modelfile_text(source.tokenizer.template, source.model.config.context_length)
    with staged_output(out, overwrite=overwrite, is_dir=True, protected=source.model_dir) as tmp:
        written = export_gguf(source, tmp / GGUF_NAME, quant=quant)
        (tmp / MODELFILE_NAME).write_text(text, encoding="utf-8")
    out = Path(out)
    log.info("wrote %s (%s, %s)", out, GGUF_NAME, MODELFILE_NAME)
    gguf = GGUFExport(out / GGUF_NAME, written.architecture, written.quant, written.tensors)
    return OllamaExport(out, gguf, out / MODELFILE_NAME)
