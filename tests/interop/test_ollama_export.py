"""`fucina export --format ollama`: the Modelfile's Go template renders what fucina's chat template does."""

from __future__ import annotations

import gguf
import pytest
from export_helpers import (
    ARCHITECTURES,
    architecture_model_dir,
    random_model,
    tiny_tokenizer,
    write_model_dir,
)
from go_template import GoTemplateError, parse_modelfile, render_go_template

from fucina.chat_template import CHAT_TEMPLATE_NAMES, get_chat_template
from fucina.cli.main import main
from fucina.fsutil import OutputExistsError
from fucina.interop.ollama import DEFAULT_PARAMETERS, OLLAMA_TEMPLATES, export_ollama, modelfile_text
from fucina.interop.source import ExportError, load_source

SYSTEM = {"role": "system", "content": "Sei un assistente gentile che risponde in italiano."}
USER_1 = {"role": "user", "content": "Com'è andata l'altra sera?"}
ASSISTANT_1 = {"role": "assistant", "content": "Bene, grazie! Siamo tornati alle 23."}
USER_2 = {"role": "user", "content": "E poi, dov'è finito il libro? (Quello rosso.)"}
ASSISTANT_2 = {"role": "assistant", "content": "«È sul tavolo dell'ingresso…» 🎉"}
# Content already stripped: Ollama's templates have no trim, so it renders content as the client sends it.
CONVERSATIONS = {
    "one-user": [USER_1],
    "system-user": [SYSTEM, USER_1],
    "multi-turn": [SYSTEM, USER_1, ASSISTANT_1, USER_2],
    "no-system-multi-turn": [USER_1, ASSISTANT_1, USER_2],
    "ends-with-assistant": [USER_1, ASSISTANT_1],
    "assistant-first": [ASSISTANT_1, USER_2],
    "system-then-assistant": [SYSTEM, ASSISTANT_1, USER_2, ASSISTANT_2],
}


def test_every_chat_template_has_an_ollama_template():
    assert set(OLLAMA_TEMPLATES) == set(CHAT_TEMPLATE_NAMES)


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("name", CHAT_TEMPLATE_NAMES)
def test_modelfile_template_renders_what_fucina_renders_with_the_generation_prompt(name, conversation):
    template = get_chat_template(name)
    modelfile = parse_modelfile(modelfile_text(template, context_length=128))
    [go_template] = modelfile["TEMPLATE"]
    messages = CONVERSATIONS[conversation]
    assert render_go_template(go_template, messages) == template.render(messages, add_generation_prompt=True)


@pytest.mark.parametrize("name", CHAT_TEMPLATE_NAMES)
def test_modelfile_stops_on_every_end_of_turn_token_and_sets_the_defaults(name):
    template = get_chat_template(name)
    modelfile = parse_modelfile(modelfile_text(template, context_length=128))
    assert modelfile["FROM"] == ["./model.gguf"]
    parameters = [line.split(" ", 1) for line in modelfile["PARAMETER"]]
    assert [value for key, value in parameters if key == "stop"] == [f'"{t}"' for t in template.stop_tokens]
    assert {key: value for key, value in parameters if key != "stop"} == {
        **{key: str(value) for key, value in DEFAULT_PARAMETERS.items()},
        "num_ctx": "128",
    }


def test_the_go_reader_refuses_what_is_outside_the_subset():
    for template in (
        "{{- range .Messages }}{{ end }}",
        "{{ .System }}",
        "{{ range .Messages }}",
        "{{ if x }}",
    ):
        with pytest.raises(GoTemplateError):
            render_go_template(template, [USER_1])


@pytest.mark.parametrize("template", ["chatml", "llama3", "llama2"])
def test_export_writes_the_gguf_and_a_modelfile_for_the_models_template(tmp_path, template):
    config, _ = ARCHITECTURES["llama"]
    model_dir = write_model_dir(tmp_path / "model", random_model(config), tiny_tokenizer(template))
    source = load_source(model_dir)
    result = export_ollama(source, tmp_path / "ollama", quant="f32")
    assert sorted(p.name for p in result.path.iterdir()) == ["Modelfile", "model.gguf"]
    fields = gguf.GGUFReader(result.gguf.path).fields
    assert fields["tokenizer.chat_template"].contents() == get_chat_template(template).jinja
    assert result.modelfile.read_text(encoding="utf-8") == modelfile_text(
        get_chat_template(template), config.context_length
    )


def test_existing_output_is_refused_unless_overwrite_and_picodac_writes_nothing(tmp_path, capsys):
    model_dir = architecture_model_dir(tmp_path / "model", "llama")
    out = tmp_path / "ollama"
    args = ["export", "--model", str(model_dir), "--format", "ollama", "--out", str(out), "--quant", "f32"]
    assert main(args) == 0
    assert "ollama create" in capsys.readouterr().out
    (out / "Modelfile").write_text("old", encoding="utf-8")
    with pytest.raises(OutputExistsError):
        export_ollama(load_source(model_dir), out)
    assert (out / "Modelfile").read_text(encoding="utf-8") == "old"
    assert main([*args, "--overwrite"]) == 0
    assert (out / "Modelfile").read_text(encoding="utf-8").startswith("FROM ./model.gguf\n")
    picodac = architecture_model_dir(tmp_path / "picodac", "picodac")
    with pytest.raises(ExportError):
        export_ollama(load_source(picodac), tmp_path / "picodac-ollama")
    assert not (tmp_path / "picodac-ollama").exists()
