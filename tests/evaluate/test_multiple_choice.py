"""Multiple choice by log-likelihood: a model that knows the answer scores 100%, a uniform one chance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from scoring_doubles import BigramModel, PreferringModel, UniformModel

from fucina.evaluate.loglikelihood import encode_requests, score_requests
from fucina.evaluate.multiple_choice import evaluate_task
from fucina.evaluate.prompts import build_questions
from fucina.evaluate.task_config import load_fewshot_pool, load_items, load_task_spec

WORDS = ["sole", "mare", "vento", "pane"]


def _write_task(tmp_path: Path, records: list[dict], extra: str = "") -> Path:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    with open(data / "quiz.jsonl", "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    task = tmp_path / "quiz.yaml"
    task.write_text(
        'file: quiz.jsonl\nprompt: "Domanda: {{ question }}\\nRisposta:"\n'
        "choices_field: choices\nanswer_field: answer\n" + extra,
        encoding="utf-8",
    )
    return task


def _quiz(count: int = 8) -> list[dict]:
    """Questions whose right answer rotates over the four positions (answer = index % 4)."""
    return [
        {
            "id": i,
            "question": f"Qual è la parola numero {i}?",
            "choices": WORDS,
            "answer": i % 4,
            "split": "test",
        }
        for i in range(count)
    ]


def test_a_model_preferring_the_right_answer_scores_100_percent(tokenizer, tmp_path):
    records = [
        {"question": f"Domanda {i}", "choices": ["gatto", "tavolo", "finestra"], "answer": 0}
        for i in range(6)
    ]
    for i, record in enumerate(records):  # put the right answer at every position
        record["choices"] = record["choices"][i % 3 :] + record["choices"][: i % 3]
        record["answer"] = record["choices"].index("gatto")
    task = _write_task(tmp_path, records)
    model = PreferringModel(tokenizer.vocab_size, 32, tokenizer.encode(" gatto"))
    result = evaluate_task(model, tokenizer, task, data_dir=tmp_path / "data", show_progress=False)
    by_metric = {row.metric: row for row in result.rows}
    assert by_metric["acc"].value == 1.0
    assert by_metric["acc_norm"].value == 1.0
    assert by_metric["acc"].chance == pytest.approx(1 / 3)
    assert by_metric["acc"].n == 6
    assert by_metric["acc"].ci_low < 1.0 == by_metric["acc"].ci_high


def test_a_uniform_model_scores_chance(tokenizer, tmp_path):
    lengths = {len(ids) for _, ids in encode_requests(tokenizer, [("Risposta:", f" {w}") for w in WORDS])}
    assert len(lengths) == 1, "precondition: the choices must have equal token counts"
    task = _write_task(tmp_path, _quiz(8))
    model = UniformModel(tokenizer.vocab_size, 32)
    result = evaluate_task(model, tokenizer, task, data_dir=tmp_path / "data", show_progress=False)
    by_metric = {row.metric: row for row in result.rows}
    assert by_metric["acc"].value == pytest.approx(0.25) == by_metric["acc"].chance


def test_acc_norm_divides_by_the_characters_of_the_choice(tokenizer, tmp_path):
    # Uniform model: a choice's log-likelihood is -(its tokens) * ln V, so acc picks the choice with the
    # fewest tokens, while acc_norm picks the one with the most characters per token.
    records = [{"question": "Quale?", "choices": ["la cucina italiana", "è"], "answer": 0}]
    task = _write_task(tmp_path, records)
    result = evaluate_task(
        UniformModel(tokenizer.vocab_size, 64),
        tokenizer,
        task,
        data_dir=tmp_path / "data",
        show_progress=False,
    )
    long_tokens, short_tokens = (len(tokenizer.encode(" " + c)) for c in records[0]["choices"])
    assert short_tokens < long_tokens, "precondition"
    assert long_tokens / len(" la cucina italiana") < short_tokens / len(" è"), "precondition"
    assert result.predictions.tolist() == [1]
    assert result.normalized_predictions.tolist() == [0]


def test_left_truncation_keeps_the_continuation(tokenizer):
    model = BigramModel(tokenizer.vocab_size, context_length=10)
    context = "Questa è una frase molto lunga che non entra nella finestra del modello. " * 3 + "Risposta:"
    continuation = " la cucina italiana"
    ((context_ids, continuation_ids),) = encode_requests(tokenizer, [(context, continuation)])
    assert len(context_ids) > 10 and len(continuation_ids) < 10
    (score,) = score_requests(model, tokenizer, [(context, continuation)], show_progress=False)
    assert score.context_truncated and not score.continuation_truncated
    assert score.tokens == len(continuation_ids)
    # A bigram model needs only the token before each: the cut context must not change the score.
    assert score.logprob == pytest.approx(model.logprob(context_ids[-1:] + continuation_ids), rel=1e-6)


def test_batching_and_padding_do_not_change_scores(tokenizer):
    model = BigramModel(tokenizer.vocab_size, context_length=24)
    requests = [(f"Domanda {'lunga ' * i}numero {i}:", f" {WORDS[i % 4]}") for i in range(9)]
    one = score_requests(model, tokenizer, requests, batch_size=1, show_progress=False)
    many = score_requests(model, tokenizer, requests, batch_size=4, show_progress=False)
    assert [s.logprob for s in one] == pytest.approx([s.logprob for s in many], rel=1e-6)


def test_fewshot_never_includes_the_evaluated_item(tmp_path):
    records = _quiz(6)
    records.append(dict(records[2], id=99))  # a duplicate of item 2 on another line
    task = _write_task(tmp_path, records)
    spec = load_task_spec(task)
    items = load_items(spec, tmp_path / "data")
    pool = load_fewshot_pool(spec, tmp_path / "data")
    questions = build_questions(spec, items, pool, shots=6, seed=3)
    for question in questions:
        own = f"Domanda: {question.item.record['question']}\nRisposta:"
        examples = question.context.split("\n\n")[:-1]
        assert question.context.endswith(own)
        assert own not in "\n\n".join(examples)
        assert question.shots == len(examples)
    # 7 records: 6 others for each item, but only 5 for the two copies of the same question.
    assert all(q.shots == 6 for q in questions if q.item.record["id"] not in (2, 99))
    assert all(q.shots == 5 for q in questions if q.item.record["id"] in (2, 99))


def test_fewshot_draws_repeat_with_the_seed_and_ignore_the_limit(tmp_path):
    task = _write_task(tmp_path, _quiz(12))
    spec = load_task_spec(task)
    items = load_items(spec, tmp_path / "data")
    pool = load_fewshot_pool(spec, tmp_path / "data")
    first = build_questions(spec, items, pool, shots=3, seed=7)
    again = build_questions(spec, items[5:6], pool, shots=3, seed=7)
    other_seed = build_questions(spec, items, pool, shots=3, seed=8)
    assert again[0].context == first[5].context
    assert [q.context for q in other_seed] != [q.context for q in first]


def test_limit_evaluates_a_seeded_sample(tokenizer, tmp_path):
    task = _write_task(tmp_path, _quiz(40))
    model = UniformModel(tokenizer.vocab_size, 32)
    options = dict(data_dir=tmp_path / "data", limit=10, show_progress=False)
    first = evaluate_task(model, tokenizer, task, seed=1, **options)
    again = evaluate_task(model, tokenizer, task, seed=1, **options)
    other = evaluate_task(model, tokenizer, task, seed=2, **options)
    ids = [[q.item.record["id"] for q in r.questions] for r in (first, again, other)]
    assert len(ids[0]) == 10 and ids[0] == sorted(ids[0])
    assert ids[0] == ids[1] != ids[2]


def test_group_by_and_mcc_rows(tokenizer, tmp_path):
    records = [
        {"sentence": f"Frase {i}.", "acceptable": i % 2, "kind": "a" if i < 4 else "b", "split": "test"}
        for i in range(8)
    ]
    data = tmp_path / "data"
    data.mkdir()
    (data / "cola.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    task = tmp_path / "cola.yaml"
    task.write_text(
        'file: cola.jsonl\nprompt: "{{ sentence }} Corretta?"\nchoices: ["Sì", "No"]\n'
        "answer_field: acceptable\nanswer_map: {1: 0, 0: 1}\nmetrics: [acc, mcc]\ngroup_by: kind\n"
        "filter: {split: [test]}\n",
        encoding="utf-8",
    )
    model = PreferringModel(tokenizer.vocab_size, 32, tokenizer.encode(" Sì"))
    result = evaluate_task(model, tokenizer, task, data_dir=data, show_progress=False)
    rows = {(row.task, row.metric): row for row in result.rows}
    assert rows[("cola", "acc")].value == 0.5  # always "Sì": right on the 4 acceptable sentences
    assert rows[("cola", "mcc")].value == 0.0  # a constant answer has no skill
    assert rows[("cola/a", "acc")].n == rows[("cola/b", "acc")].n == 4
