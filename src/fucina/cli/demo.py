"""`fucina demo`: from text to a chatting model on the built-in corpus, in minutes on a laptop CPU.

It is a thin wrapper over the same configuration and loop as `fucina train`: it loads the two recipes
shipped with the package (`fucina/train/recipes/demo-pretrain.yaml` and `demo-sft.yaml`, also linked
from `configs/`), trains the first into `OUT/pretrain` (a picodac tokenizer of 1920 ids trained on the
built-in prose and conversations, then PicoDAC-size pretraining), the second into `OUT/chat` (chat
fine-tuning initialised from `OUT/pretrain/best`), and asks the result three Italian questions.
Re-running it on the same OUT resumes (or, when finished, just answers again).

The answers come from `OUT/chat/final`, the model at the end of fine-tuning: on a corpus this small
the model mostly memorizes the conversations, which is what makes its answers sensible, while the
validation loss (and so `best/`) favours an earlier, less memorized model. Both are printed.
"""

from __future__ import annotations

import argparse
import time
from importlib import resources
from pathlib import Path

PROMPTS = (
    "Qual è la capitale d'Italia?",
    "Ciao, come stai?",
    "Che cos'è la pizza margherita?",
)


def recipe_path(name: str) -> Path:
    """Path of a training recipe shipped inside the package."""
    return Path(str(resources.files("fucina.train") / "recipes" / name))


def register(subparsers) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="train a tiny Italian chat model on the built-in corpus and talk to it",
        description=__doc__.split("\n\n")[1],
    )
    demo.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    demo.add_argument(
        "--set-pretrain",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of the pretraining recipe (repeatable)",
    )
    demo.add_argument(
        "--set-sft",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of the chat fine-tuning recipe (repeatable)",
    )
    demo.set_defaults(func=run_demo)


def answer(model, tokenizer, question: str, max_new_tokens: int = 60) -> str:
    """The model's greedy reply to one user message."""
    from fucina.inference.generate import SamplingConfig, generate

    prompt = tokenizer.template.encode_prompt(tokenizer, [{"role": "user", "content": question}])
    sampling = SamplingConfig(
        max_new_tokens=max_new_tokens,
        greedy=True,
        repetition_penalty=1.15,
        stop_token_ids=tuple(tokenizer.template.stop_token_ids(tokenizer)),
    )
    return tokenizer.decode(generate(model, [prompt], sampling)[0]).strip()


def run_demo(args: argparse.Namespace) -> int:
    from fucina.cli.summary import format_result
    from fucina.model_dir import FINAL_DIR, load_pretrained
    from fucina.train.config import load_train_config
    from fucina.train.loop import train

    started = time.perf_counter()
    out = Path(args.out)
    pretrain_config = load_train_config(recipe_path("demo-pretrain.yaml"), args.set_pretrain)
    sft_config = load_train_config(
        recipe_path("demo-sft.yaml"), [f"init_from={(out / 'pretrain').resolve()}", *args.set_sft]
    )
    print(f"fucina demo -> {out}\n")
    print("[1/3] tokenizer + pretraining on the built-in prose (PicoDAC size)")
    stage_started = time.perf_counter()
    pretrained = train(pretrain_config, out / "pretrain")
    print(format_result(pretrained))
    print(
        f"stage time {time.perf_counter() - stage_started:.0f} s (tokenizer, packing, training, evaluation)\n"
    )
    print("[2/3] chat fine-tuning on the built-in conversations (loss on assistant tokens only)")
    stage_started = time.perf_counter()
    tuned = train(sft_config, out / "chat")
    print(format_result(tuned))
    print(f"stage time {time.perf_counter() - stage_started:.0f} s\n")

    final = out / "chat" / FINAL_DIR
    print(f"[3/3] three questions to the fine-tuned model ({final}, greedy decoding)\n")
    model, tokenizer = load_pretrained(final)
    for question in PROMPTS:
        print(f"> {question}\n{answer(model, tokenizer, question)}\n")
    print(f"validation bits per byte: pretraining {_bpb(pretrained)}, chat fine-tuning {_bpb(tuned)}")
    print(f"runs: {out / 'pretrain'} (pretraining), {out / 'chat'} (chat); plots/loss.png and tb/ in each")
    print(f"total time {time.perf_counter() - started:.0f} s; chat with it: fucina chat --model {final}")
    return 0


def _bpb(result) -> str:
    """Bits per byte of the stage's final model and of its best one."""
    if result.last_eval is None:
        return "n/a"
    best = f" (best {result.best_val_bpb:.3f})" if result.best_val_bpb is not None else ""
    return f"{result.last_eval.val_bpb:.3f}{best}"
