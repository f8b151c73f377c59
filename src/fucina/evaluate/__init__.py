"""Evaluation in Italian: bits per byte on held-out text, multiple-choice benchmarks, tokenizer report.

- `intrinsic.py`: loss / perplexity / bits per byte of text or chat files (`heldout.py`: the splits).
- `task_config.py` + `tasks/*.yaml`: multiple-choice tasks defined by data; `prompts.py` renders them.
- `loglikelihood.py`: batched continuation scoring; `multiple_choice.py`: acc / acc_norm / mcc.
- `report.py`: intervals, tables, JSON; `tokenizer_report.py`; `suite.py`: runs a list of tasks.
"""
