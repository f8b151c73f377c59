"""`fucina train`, `fucina generate` and `fucina chat`: thin calls into fucina.train and fucina.inference.generate.

`fucina train --config CONFIG --out DIR` (or `fucina train CONFIG`) trains one stage (pretraining or
chat fine-tuning) as the YAML says; the run directory defaults to runs/<config name>. `--set
section.key=value` overrides any key. Resume policy: a run directory that already holds this run is
resumed from its newest usable checkpoint (the default, or `--resume` to insist on it); `--no-resume`
refuses such a directory unless `--overwrite` moves the old run aside to `DIR.old-<timestamp>` (nothing
is ever deleted). `--dry-run` runs the whole pipeline briefly (a few steps, a tiny evaluation, at most a
few hundred documents) in a temporary directory unless --out is given. `--debug-kill-after-step K` makes
the process SIGKILL itself right after step K (tests use it to check that a killed run resumes
bit-identically).

`fucina generate --model RUN "prompt"` answers the prompt as a user message when the model was chat
fine-tuned (its training.json says stage "sft"), else continues it as raw text; `--raw`/`--chat` force
either. `fucina chat --model RUN` is interactive: lines from stdin, tokens streamed, the history kept
and its oldest turns dropped to fit the context; `/reset` clears the history, `/exit` (or end of
input) quits.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from fucina.errors import ConfigError

DRY_RUN_DOCUMENTS = 300


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument(
        "--max-new-tokens", type=int, default=128, help="most tokens to generate (default 128)"
    )
    group.add_argument("--temperature", type=float, default=0.8, help="softmax temperature (default 0.8)")
    group.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: all)")
    group.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    group.add_argument("--repetition-penalty", type=float, default=1.1, help="(default 1.1; 1: none)")
    group.add_argument("--seed", type=int, default=None, help="seed for sampling (default: random)")
    group.add_argument("--greedy", action="store_true", help="always take the most likely token")


def add_compile_argument(parser: argparse.ArgumentParser) -> None:
    """--compile: decode through torch.compile (see fucina.inference.generate)."""
    parser.add_argument(
        "--compile",
        action="store_true",
        help="compile the decoding step with torch.compile: tens of seconds once, then faster tokens "
        "(worth it for long outputs and chat sessions; needs a C++ compiler on CPU)",
    )


def sampling_from_args(args: argparse.Namespace, stop_token_ids: list[int]):
    from fucina.inference.generate import SamplingConfig

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    return SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        stop_token_ids=tuple(stop_token_ids),
        seed=args.seed,
        greedy=args.greedy,
    )


def register(subparsers) -> None:
    train = subparsers.add_parser(
        "train",
        help="train a model (pretraining or chat fine-tuning) from a YAML config",
        description=__doc__.split("\n\n")[1],
    )
    train.add_argument("config", nargs="?", help="YAML training config (see configs/)")
    train.add_argument(
        "--config", dest="config_option", metavar="CONFIG", help="the YAML config (same as the positional)"
    )
    train.add_argument("--out", help="run directory (default: runs/<config name>)")
    train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set optim.lr=1e-3 (repeatable)",
    )
    resume = train.add_mutually_exclusive_group()
    resume.add_argument(
        "--resume",
        dest="resume",
        action="store_true",
        default=None,
        help="resume the run in --out (error if there is none); the default when one exists",
    )
    resume.add_argument(
        "--no-resume",
        dest="resume",
        action="store_false",
        help="start afresh; refused on a directory holding a run unless --overwrite",
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="with --no-resume: move an existing run aside to DIR.old-<timestamp>",
    )
    train.add_argument("--dry-run", action="store_true", help="run the whole pipeline briefly")
    train.add_argument("--steps", type=int, help="step budget (sets train.max_steps; 20 with --dry-run)")
    train.add_argument(
        "--debug-kill-after-step",
        type=int,
        metavar="K",
        help="testing aid: SIGKILL this process right after step K",
    )
    train.set_defaults(func=run_train)

    generate = subparsers.add_parser("generate", help="generate text from a trained model")
    generate.add_argument("prompt", help="the user's message (or the text to continue with --raw)")
    generate.add_argument("--model", required=True, help="run directory (uses best/) or model directory")
    mode = generate.add_mutually_exclusive_group()
    mode.add_argument("--raw", action="store_true", help="continue the prompt as plain text")
    mode.add_argument("--chat", action="store_true", help="treat the prompt as a user message")
    generate.add_argument("--system", help="a system message (chat mode)")
    add_sampling_arguments(generate)
    add_compile_argument(generate)
    generate.set_defaults(func=run_generate)

    chat = subparsers.add_parser("chat", help="chat with a trained model (interactive)")
    chat.add_argument("--model", required=True, help="run directory (uses best/) or model directory")
    chat.add_argument("--system", help="a system message kept at the start of the conversation")
    add_sampling_arguments(chat)
    add_compile_argument(chat)
    chat.set_defaults(func=run_chat)


def run_train(args: argparse.Namespace) -> int:
    from fucina.train.config import load_train_config
    from fucina.train.loop import train

    args.config = config_argument(args)
    overrides = list(args.overrides)
    steps = args.steps if args.steps is not None else (20 if args.dry_run else None)
    if steps is not None:
        if steps < 1:
            raise ConfigError(f"--steps must be >= 1, got {steps}")
        overrides += [f"train.max_steps={steps}", "train.epochs=null"]
    if args.dry_run:
        overrides += dry_run_overrides(load_train_config(args.config, overrides))
    config = load_train_config(args.config, overrides)
    temporary = None
    out = args.out
    if out is None and args.dry_run:
        temporary = out = tempfile.mkdtemp(prefix="fucina-dry-run-")
    elif out is None:
        out = str(Path("runs") / Path(args.config).stem)
    try:
        result = train(
            config,
            out,
            resume=args.resume,
            overwrite=args.overwrite,
            kill_after_step=args.debug_kill_after_step,
        )
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
    print(format_result(result, dry_run=args.dry_run))
    return 0


def config_argument(args: argparse.Namespace) -> str:
    """The config path, given positionally or as --config (exactly one of the two)."""
    given = [c for c in (args.config, args.config_option) if c is not None]
    if not given:
        raise ConfigError("fucina train needs a config: fucina train --config configs/picodac.yaml")
    if len(given) == 2 and given[0] != given[1]:
        raise ConfigError(f"two configs given ({given[0]} and --config {given[1]}); pass one")
    return given[0]


def dry_run_overrides(config) -> list[str]:
    """Overrides that keep every stage of the pipeline but make each one brief."""
    steps = config.train.max_steps or 20
    documents = min(config.data.max_documents or DRY_RUN_DOCUMENTS, DRY_RUN_DOCUMENTS)
    return [
        f"eval.every={max(1, steps // 2)}",
        "eval.max_batches=2",
        f"checkpoint.every={steps}",
        f"data.max_documents={documents}",
        "log.tensorboard=false",
    ]


def format_result(result, dry_run: bool = False) -> str:
    lines = [
        f"{'dry run: ' if dry_run else ''}trained {result.steps}/{result.total_steps} steps in "
        f"{result.train_seconds:.0f} s ({result.tokens_per_second:,.0f} tokens/s)"
        + (", stopped early" if result.stopped_early else "")
    ]
    if result.last_eval is not None:
        e = result.last_eval
        lines.append(
            f"validation: loss {e.val_loss:.4f}, perplexity {e.val_ppl:.2f}, bits/byte {e.val_bpb:.4f}"
        )
    if result.best_val_bpb is not None:
        lines.append(f"best: loss {result.best_val_loss:.4f}, bits/byte {result.best_val_bpb:.4f}")
    if not dry_run:
        lines.append(f"model: {Path(result.run_dir) / 'best'}")
    return "\n".join(lines)


# --- generation ---------------------------------------------------------------------------------------------


def _load(path: str):
    from fucina.model_dir import load_pretrained, resolve_model_dir

    model_dir = resolve_model_dir(path)
    model, tokenizer = load_pretrained(model_dir)
    model.eval()
    info_path = model_dir / "training.json"
    stage = None
    if info_path.is_file():
        try:
            stage = json.loads(info_path.read_text(encoding="utf-8")).get("stage")
        except (json.JSONDecodeError, OSError):
            stage = None
    return model, tokenizer, stage


def fit_prompt(prompt_ids: list[int], context_length: int, max_new_tokens: int) -> tuple[list[int], int]:
    """Keep the prompt's last tokens so that at least some reply fits; returns (prompt, max new tokens)."""
    reserve = min(max_new_tokens, max(1, context_length // 2))
    if len(prompt_ids) > context_length - reserve:
        prompt_ids = prompt_ids[-(context_length - reserve) :]
    return prompt_ids, min(max_new_tokens, context_length - len(prompt_ids))


def chat_prompt(tokenizer, messages: list[dict], context_length: int, max_new_tokens: int) -> list[int]:
    """Prompt ids for `messages`, dropping the oldest turns (never the system message) to fit."""
    reserve = min(max_new_tokens, max(1, context_length // 2))
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system) :]
    while True:
        ids = tokenizer.template.encode_prompt(tokenizer, system + turns)
        if len(ids) <= context_length - reserve or len(turns) <= 1:
            return ids
        turns = turns[2:] if len(turns) > 2 else turns[-1:]


def run_generate(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from fucina.inference.generate import generate

    model, tokenizer, stage = _load(args.model)
    chat_mode = args.chat or (not args.raw and stage != "pretrain")
    context = model.config.context_length
    if chat_mode:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}
        ]
        sampling = sampling_from_args(args, tokenizer.template.stop_token_ids(tokenizer))
        prompt = chat_prompt(tokenizer, messages, context, sampling.max_new_tokens)
    else:
        sampling = sampling_from_args(args, [tokenizer.eos_id] if tokenizer.eos_id is not None else [])
        start = [tokenizer.eos_id] if tokenizer.eos_id is not None else []  # documents follow an EOS
        prompt = start + tokenizer.encode(args.prompt)
    prompt, budget = fit_prompt(prompt, context, sampling.max_new_tokens)
    new_ids = generate(model, [prompt], replace(sampling, max_new_tokens=budget), compile=args.compile)[0]
    text = tokenizer.decode(new_ids)
    print(text.strip() if chat_mode else args.prompt + text)
    return 0


def _stream_reply(model, tokenizer, prompt: list[int], sampling, compile: bool = False) -> str:
    from fucina.inference.generate import stream

    ids: list[int] = []
    shown = ""
    stops = set(sampling.stop_token_ids)
    for token in stream(model, prompt, sampling, compile=compile):
        if token in stops:
            break
        ids.append(token)
        text = tokenizer.decode(ids)
        if text.endswith("\ufffd"):
            continue  # half of a multi-byte character: wait for the rest
        print(text[len(shown) :], end="", flush=True)
        shown = text
    print(flush=True)
    return tokenizer.decode(ids).strip()


def run_chat(args: argparse.Namespace) -> int:
    from dataclasses import replace

    model, tokenizer, stage = _load(args.model)
    if stage == "pretrain":
        print("(this model was only pretrained, not chat fine-tuned: expect rambling)", file=sys.stderr)
    sampling = sampling_from_args(args, tokenizer.template.stop_token_ids(tokenizer))
    context = model.config.context_length
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    print("fucina chat: /reset clears the conversation, /exit quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        line = line.strip()
        if not line:
            continue
        if line == "/exit":
            return 0
        if line == "/reset":
            history = []
            print("(conversation cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        prompt = chat_prompt(tokenizer, system + history, context, sampling.max_new_tokens)
        prompt, budget = fit_prompt(prompt, context, sampling.max_new_tokens)
        reply = _stream_reply(
            model, tokenizer, prompt, replace(sampling, max_new_tokens=budget), compile=args.compile
        )
        history.append({"role": "assistant", "content": reply or "…"})
