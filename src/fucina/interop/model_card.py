"""The model card (README.md) written with an export: what the model is, how it was made, how it scores.

Design choices, and why:
- Everything comes from files the run already holds: the model config (architecture, parameter counts
  via fucina.model.info), best/training.json (stage, step, validation figures of the exported model),
  the run's train_config.yaml (data, tokenizer, optimiser, budget) and train_stats.json (every
  evaluation). Any of the run files may be missing (a model directory copied on its own): its section
  then says so instead of failing the export.
- Hugging Face's YAML front matter (language, library, tags) comes first so the Hub indexes it.
- The card says plainly when the export needs `trust_remote_code=True` and why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fucina.interop.source import ExportSource
from fucina.model.info import count_parameters
from fucina.model_dir import BEST_DIR, FINAL_DIR

VALIDATION_FIELDS = (
    ("val_loss", "validation loss (nats/token)"),
    ("val_ppl", "validation perplexity"),
    ("val_bpb", "validation bits per byte"),
)


def write_model_card(
    source: ExportSource, path: Path, architecture: str, remote_code: bool, export_format: str
) -> None:
    """Write README.md for an export of `source` as `architecture`."""
    path.write_text(render_model_card(source, architecture, remote_code, export_format), encoding="utf-8")


def render_model_card(source: ExportSource, architecture: str, remote_code: bool, export_format: str) -> str:
    """The model card as Markdown."""
    name = _model_name(source)
    sections = [
        _front_matter(export_format),
        f"# {name}\n\nAn Italian language model trained from scratch with fucina, exported as `{architecture}`.",
        _usage(architecture, remote_code, export_format),
        _architecture(source, architecture, remote_code),
        _tokenizer(source),
        _training(source),
        _evaluation(source),
        "## Limitations\n\nA small model trained on a small corpus: it writes fluent-looking Italian but "
        "makes up facts, and it has no safety tuning. Use it to study how language models work.",
    ]
    return "\n\n".join(section for section in sections if section) + "\n"


def _model_name(source: ExportSource) -> str:
    if source.model_dir.name in (BEST_DIR, FINAL_DIR) and source.run_dir is not None:
        return source.run_dir.name
    return source.model_dir.name


def _front_matter(export_format: str) -> str:
    library = "transformers" if export_format == "hf" else "gguf"
    return (
        f"---\nlanguage:\n- it\nlibrary_name: {library}\npipeline_tag: text-generation\ntags:\n- fucina\n---"
    )


def _usage(architecture: str, remote_code: bool, export_format: str) -> str:
    if export_format != "hf":
        return "## Usage\n\n```\nllama-cli -m model.gguf -cnv\n```"
    trust = ", trust_remote_code=True" if remote_code else ""
    # ImageGPT (PicoDAC's standard class) is not in AutoModelForCausalLM's mapping: name the class.
    model_class = architecture if architecture == "ImageGPTForCausalImageModeling" else "AutoModelForCausalLM"
    text = (
        f"## Usage\n\n```python\nfrom transformers import {model_class}, AutoTokenizer\n\n"
        f'model = {model_class}.from_pretrained("PATH"{trust})\n'
        f'tokenizer = AutoTokenizer.from_pretrained("PATH"{trust})\n'
        'messages = [{"role": "user", "content": "Qual è la capitale d\'Italia?"}]\n'
        'ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")\n'
        "print(tokenizer.decode(model.generate(ids, max_new_tokens=64)[0, ids.shape[1]:]))\n```"
    )
    if remote_code:
        text += (
            f"\n\n`{architecture}` is shipped as remote code (configuration_fucina_picodac.py and "
            "modeling_fucina_picodac.py): no standard transformers class combines learned absolute "
            "positions with RMSNorm and a non-gated MLP, as this model does. Read the two files before "
            "passing `trust_remote_code=True`; they reuse LLaMA's classes and change only those parts."
        )
    if model_class != "AutoModelForCausalLM":
        text += (
            "\n\nThis model (learned absolute positions, RMSNorm, a non-gated MLP) is computed exactly by "
            f"transformers' standard `{architecture}` class, GPT-2's block with an RMS norm; no custom "
            "code is needed. That class is not registered for AutoModelForCausalLM, so load it by name. "
            "Its head predicts `vocab_size - 1` tokens, so the embedding has one extra, never-used row."
        )
    return text


def _architecture(source: ExportSource, architecture: str, remote_code: bool) -> str:
    config = source.model.config
    counts = count_parameters(config)
    rows = [
        ("class", f"`{architecture}`" + (" (remote code)" if remote_code else "")),
        ("parameters", f"{counts.total:,}"),
        ("layers", config.n_layers),
        ("model width", config.d_model),
        (
            "attention heads / kv heads",
            f"{config.n_heads} / {config.kv_heads} (head size {config.head_size})",
        ),
        ("feed-forward", f"{config.ff_size}, {config.mlp}"),
        (
            "positions",
            f"{config.positions}" + (f" (base {config.rope_base:g})" if config.positions == "rope" else ""),
        ),
        ("normalisation", f"{config.norm}, eps {config.norm_eps:g}"),
        ("biases", "yes" if config.bias else "no"),
        ("tied embeddings", "yes" if config.tie_embeddings else "no"),
        ("context length", config.context_length),
        ("vocabulary", config.vocab_size),
    ]
    if config.sliding_window is not None:
        layers = (
            "all layers" if config.sliding_window_layers is None else f"layers {config.sliding_window_layers}"
        )
        rows.append(("sliding window", f"{config.sliding_window} ({layers})"))
    return "## Architecture\n\n" + _table(rows)


def _tokenizer(source: ExportSource) -> str:
    tok = source.tokenizer
    specials = ", ".join(f"`{tok.id_to_token(i)}`={i}" for i in sorted(tok.special_ids))
    return (
        "## Tokenizer and chat template\n\n"
        f"Byte-level BPE of {tok.vocab_size:,} tokens ({tok.pretokenizer!r} pre-tokenizer), chat template "
        f"`{tok.template.name}`, special tokens {specials}. Generation stops at "
        + ", ".join(f"`{tok.id_to_token(i)}`" for i in tok.template.stop_token_ids(tok))
        + "."
    )


def _training(source: ExportSource) -> str:
    config, info = source.train_config, source.training_info
    if not config and not info:
        return "## Training\n\nThe training records (train_config.yaml, training.json) were not found."
    train, optim = _section(config, "train"), _section(config, "optim")
    data, tokenizer = _section(config, "data"), _section(config, "tokenizer")
    schedule = _section(config, "schedule")
    rows = [
        ("stage", info.get("stage", config.get("stage"))),
        ("steps", info.get("step")),
        ("training data", ", ".join(map(str, data.get("train", []))) or None),
        ("tokenizer trained on", ", ".join(map(str, tokenizer.get("inputs", []))) or None),
        ("initialised from", config.get("init_from")),
        ("batch size", _batch(train)),
        (
            "step budget",
            train.get("max_steps") or (f"{train['epochs']} epochs" if train.get("epochs") else None),
        ),
        (
            "optimiser",
            f"AdamW, lr {optim['lr']:g}, weight decay {optim.get('weight_decay', 0):g}"
            if "lr" in optim
            else None,
        ),
        ("schedule", schedule.get("name")),
        ("precision", train.get("precision")),
        ("seed", train.get("seed")),
    ]
    rows = [(key, value) for key, value in rows if value not in (None, "")]
    return "## Training\n\n" + (_table(rows) if rows else "No training details were recorded.")


def _evaluation(source: ExportSource) -> str:
    info, stats = source.training_info, source.train_stats
    rows = [(label, _number(info[key])) for key, label in VALIDATION_FIELDS if key in info]
    lines = ["## Evaluation"]
    if rows:
        lines.append("Of the exported model, on the run's validation split:\n\n" + _table(rows))
    evals = [e for e in stats.get("evals", []) if isinstance(e, dict)]
    if evals:
        keys = [key for key, _ in VALIDATION_FIELDS if any(key in e for e in evals)]
        header = "| step | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys)
        body = "\n".join(
            f"| {e.get('step', '')} | " + " | ".join(_number(e.get(key)) for key in keys) + " |"
            for e in evals
        )
        lines.append("Every evaluation of the run (train_stats.json):\n\n" + header + "\n" + body)
    if len(lines) == 1:
        lines.append("No evaluation records were found with this model.")
    return "\n\n".join(lines)


def _section(config: dict[str, Any], key: str) -> dict[str, Any]:
    value = config.get(key)
    return value if isinstance(value, dict) else {}


def _batch(train: dict[str, Any]) -> str | None:
    if "batch_size" not in train:
        return None
    accum = train.get("grad_accum", 1) or 1
    return f"{train['batch_size']}" + (f" x {accum} accumulation steps" if accum > 1 else "")


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value)


def _table(rows: list[tuple[str, Any]]) -> str:
    return "| | |\n|---|---|\n" + "\n".join(f"| {key} | {value} |" for key, value in rows)
