"""lm-evaluation-harness scores XCOPA-it through the server exactly as through transformers.

Its `local-completions` model asks /v1/completions for `echo` + `logprobs` on token-id prompts and reads
the log-likelihood of each choice; its `hf` model runs the Hugging Face export of the same model. Both
must give the same per-choice log-likelihoods (1e-3) and the same accuracy, item by item.
"""

from __future__ import annotations

import json

import pytest
from serving import MODEL_NAME, start_server

from fucina.interop.hf_export import export_hf
from fucina.interop.source import load_source

lm_eval = pytest.importorskip("lm_eval")  # a dev dependency: `make test` installs it

ITEMS = 24  # XCOPA-it test items scored (each has two choices)

# lm-eval's own xcopa_it prompt: the premise without its full stop, then "perché" (cause) or
# "quindi" (effect); each choice with a lower-case first letter.
TASK_YAML = """\
task: xcopa_it_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question[:-1]}}}} {{{{'perché' if question_type == 'cause' else 'quindi'}}}}"
doc_to_choice: "{{{{[choices[0][0] | lower + choices[0][1:], choices[1][0] | lower + choices[1][1:]]}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""


def _evaluate(model: str, model_args: str, tasks_dir) -> dict:
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=["xcopa_it_local"],
        task_manager=TaskManager(include_path=str(tasks_dir)),
        batch_size=1,
        device="cpu",
        log_samples=True,
    )


def _per_item(results: dict) -> list[tuple[int, list[float]]]:
    """(doc id, log-likelihood of each choice) for every scored item, in order."""
    samples = sorted(results["samples"]["xcopa_it_local"], key=lambda s: s["doc_id"])
    return [(s["doc_id"], [float(r[0]) for r in s["filtered_resps"]]) for s in samples]


def test_local_completions_scores_xcopa_as_the_hf_model_does(tmp_path, shared_data, served_model_dir):
    rows = (shared_data / "xcopa-it/xcopa_it_test.mc.jsonl").read_text(encoding="utf-8").splitlines()[:ITEMS]
    data = tmp_path / "xcopa_it.jsonl"
    data.write_text("\n".join(rows) + "\n", encoding="utf-8")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "xcopa_it_local.yaml").write_text(TASK_YAML.format(data=json.dumps(str(data))))
    hf_dir = tmp_path / "hf"
    export_hf(load_source(served_model_dir), hf_dir)

    reference = _evaluate("hf", f"pretrained={hf_dir},dtype=float32", tasks)
    with start_server(served_model_dir, max_batch=4) as url:
        served = _evaluate(
            "local-completions",
            f"model={MODEL_NAME},base_url={url}/v1/completions,tokenizer_backend=huggingface,"
            f"tokenizer={hf_dir},tokenized_requests=True,num_concurrent=1,max_retries=1",
            tasks,
        )

    expected, got = _per_item(reference), _per_item(served)
    assert len(expected) == ITEMS and [i for i, _ in got] == [i for i, _ in expected]
    for (doc, want), (_, have) in zip(expected, got, strict=True):
        assert have == pytest.approx(want, abs=1e-3), f"item {doc}"
    accuracy = reference["results"]["xcopa_it_local"]["acc,none"]
    assert served["results"]["xcopa_it_local"]["acc,none"] == accuracy
