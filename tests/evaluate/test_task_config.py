"""Task YAML validation: every mistake is an error naming the YAML file, the key or the data line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fucina.errors import ConfigError, DataError
from fucina.evaluate.prompts import build_questions
from fucina.evaluate.task_config import builtin_task_names, load_items, load_task_spec

GOOD = 'file: quiz.jsonl\nprompt: "{{ question }}"\nchoices_field: choices\nanswer_field: answer\n'
RECORDS = [{"question": "Capitale d'Italia?", "choices": ["Roma", "Milano"], "answer": 0}]


def _files(tmp_path: Path, yaml_text: str, records=RECORDS) -> Path:
    (tmp_path / "quiz.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    task = tmp_path / "quiz.yaml"
    task.write_text(yaml_text, encoding="utf-8")
    return task


def test_unknown_key_is_rejected_by_name(tmp_path):
    task = _files(tmp_path, GOOD + "promt_template: x\n")
    with pytest.raises(ConfigError, match=r"quiz\.yaml: unknown key 'promt_template'"):
        load_task_spec(task)


def test_unknown_nested_key_is_rejected_by_name(tmp_path):
    task = _files(tmp_path, GOOD + "fewshot: {fil: other.jsonl}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'fewshot\.fil' \(did you mean 'file'\?\)"):
        load_task_spec(task)


def test_missing_data_file_names_the_key(tmp_path):
    task = _files(tmp_path, GOOD.replace("quiz.jsonl", "nowhere.jsonl"))
    spec = load_task_spec(task)
    with pytest.raises(ConfigError, match=r"quiz\.yaml: key 'file': data file not found: .*nowhere\.jsonl"):
        load_items(spec, tmp_path)


def test_bad_answer_index_names_the_data_line(tmp_path):
    records = [*RECORDS, {"question": "Due più due?", "choices": ["tre", "quattro"], "answer": 2}]
    spec = load_task_spec(_files(tmp_path, GOOD, records))
    with pytest.raises(
        DataError, match=r"quiz\.jsonl:2: bad answer index 2 for 2 choices \(key 'answer_field'"
    ):
        load_items(spec, tmp_path)


def test_answer_label_missing_from_the_map_is_reported(tmp_path):
    records = [{"question": "Vero?", "label": "FORSE"}]
    text = 'file: quiz.jsonl\nprompt: "{{ question }}"\nchoices: [Vero, Falso]\nanswer_field: label\n'
    spec = load_task_spec(_files(tmp_path, text + "answer_map: {VERO: 0, FALSO: 1}\n", records))
    with pytest.raises(DataError, match=r"quiz\.jsonl:1: answer 'FORSE' is not in 'answer_map'"):
        load_items(spec, tmp_path)


def test_choices_must_come_from_exactly_one_place(tmp_path):
    with pytest.raises(ConfigError, match="exactly one of 'choices_field'"):
        load_task_spec(_files(tmp_path, GOOD + "choices: [a, b]\n"))


def test_template_syntax_error_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"key 'choice_template': invalid template"):
        load_task_spec(_files(tmp_path, GOOD + 'choice_template: " {{ choice "\n'))


def test_misspelt_field_in_a_template_names_the_data_line(tmp_path):
    spec = load_task_spec(_files(tmp_path, GOOD.replace("{{ question }}", "{{ questione }}")))
    items = load_items(spec, tmp_path)
    with pytest.raises(DataError, match=r"quiz\.jsonl:1: key 'prompt' of .*'questione' is undefined"):
        build_questions(spec, items, [])


def test_unknown_metric_and_unknown_task_name(tmp_path):
    with pytest.raises(ConfigError, match="unknown metric 'f1'"):
        load_task_spec(_files(tmp_path, GOOD + "metrics: [acc, f1]\n"))
    with pytest.raises(ConfigError, match="unknown task 'hellaswag'; built-in tasks: exams, fever"):
        load_task_spec("hellaswag")


def test_builtin_tasks_are_valid():
    assert builtin_task_names() == ["exams", "fever", "itacola", "italic", "xcopa"]
    for name in builtin_task_names():
        spec = load_task_spec(name)
        assert spec.name == name and spec.description
