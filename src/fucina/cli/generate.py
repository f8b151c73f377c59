"""`fucina generate` and `fucina chat`: thin calls into fucina.inference.

`fucina generate --model RUN "prompt"` answers the prompt as a user message when the model was chat
fine-tuned (its training.json says stage "sft"), else continues it as raw text; `--raw`/`--chat` force
either. `fucina chat --model RUN` is interactive: lines from stdin, text streamed as it is generated,
the history kept and its oldest turns dropped to fit the context; `/reset` clears the history, `/exit`
(or end of input) quits. `--dtype bf16` decodes with bfloat16 weights, `--compile` through torch.compile.
"""

from __future__ import annotations

import argparse
import json
import sys

from fucina.errors import ConfigError


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


DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def add_dtype_argument(parser: argparse.ArgumentParser) -> None:
    """--dtype: the float type of the weights while decoding (see fucina.inference.cpu_kernels)."""
    parser.add_argument(
        "--dtype",
        default="fp32",
        choices=tuple(DTYPES),
        help="weights in float32 (default) or bfloat16: half the bytes to read per token, fastest on "
        "CPUs with native bf16 (AVX512-BF16/AMX); quantized models keep their int8/int4 weights",
    )


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
    generate = subparsers.add_parser("generate", help="generate text from a trained model")
    generate.add_argument("prompt", help="the user's message (or the text to continue with --raw)")
    generate.add_argument("--model", required=True, help="run directory (uses best/) or model directory")
    mode = generate.add_mutually_exclusive_group()
    mode.add_argument("--raw", action="store_true", help="continue the prompt as plain text")
    mode.add_argument("--chat", action="store_true", help="treat the prompt as a user message")
    generate.add_argument("--system", help="a system message (chat mode)")
    add_sampling_arguments(generate)
    add_compile_argument(generate)
    add_dtype_argument(generate)
    generate.set_defaults(func=run_generate)

    chat = subparsers.add_parser("chat", help="chat with a trained model (interactive)")
    chat.add_argument("--model", required=True, help="run directory (uses best/) or model directory")
    chat.add_argument("--system", help="a system message kept at the start of the conversation")
    add_sampling_arguments(chat)
    add_compile_argument(chat)
    add_dtype_argument(chat)
    chat.set_defaults(func=run_chat)


def _load(path: str, dtype: str = "fp32"):
    """(model in eval mode, tokenizer, training stage or None) of a run or model directory."""
    import torch

    from fucina.model_dir import TRAINING_INFO_FILE, load_pretrained, resolve_model_dir

    model_dir = resolve_model_dir(path)
    model, tokenizer = load_pretrained(model_dir, dtype=getattr(torch, DTYPES[dtype]))
    model.eval()
    info_path = model_dir / TRAINING_INFO_FILE
    stage = None
    if info_path.is_file():
        try:
            stage = json.loads(info_path.read_text(encoding="utf-8")).get("stage")
        except (json.JSONDecodeError, OSError):
            stage = None
    return model, tokenizer, stage


def run_generate(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from fucina.inference.chat import chat_prompt, fit_prompt
    from fucina.inference.generate import generate

    model, tokenizer, stage = _load(args.model, args.dtype)
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


def run_chat(args: argparse.Namespace) -> int:
    from fucina.inference.chat import ChatSession

    model, tokenizer, stage = _load(args.model, args.dtype)
    if stage == "pretrain":
        print("(this model was only pretrained, not chat fine-tuned: expect rambling)", file=sys.stderr)
    sampling = sampling_from_args(args, tokenizer.template.stop_token_ids(tokenizer))
    session = ChatSession(model, tokenizer, sampling, system=args.system, compile=args.compile)
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
            session.reset()
            print("(conversation cleared)", file=sys.stderr)
            continue
        for piece in session.send(line):
            print(piece, end="", flush=True)
        print(flush=True)
