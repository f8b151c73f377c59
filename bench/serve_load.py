"""Serving under load: time to first token and aggregate tokens/s of `fucina serve` beside llama.cpp's server.

For one model (--model, or a LLaMA-30M-shape one this script trains briefly), it starts `fucina serve`
(--max-batch 32) and, when llama-cpp-python[server] is installed, llama.cpp's OpenAI-compatible server on
our own GGUF export (f32 weights, the precision fucina serves in), with the same threads. Then for 1, 8
and 32 concurrent clients, each streaming `--requests` completions one after another (the same prompts
for both servers: openings of the built-in prose, greedy, `--new-tokens` each), it records time to first
token (p50, p95), aggregate generated tokens/s, and failed requests. Tokens are counted by re-tokenizing
each reply with the model's tokenizer (llama.cpp's GGUF carries the same one), so both servers are
counted alike. fucina is asked with `ignore_eos` so every reply has the full length; llama.cpp stops at
its EOS, which the count reflects.
Targets (issue 14): with 32 clients, fucina's aggregate tokens/s >= 5x its own 1-client figure and
>= 2x llama.cpp server's; no request lost or failed.

Full run (the lead, on a quiet machine):
    python bench/serve_load.py --preset llama-30m --train-steps 300 --threads 4
    python bench/serve_load.py --model runs/llama-30m-it --threads 4
Quick check that the script works (seconds, numbers meaningless): python bench/serve_load.py --quick
Results go to bench/results/serve_load.json (quick: serve_load_quick.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from openai import AsyncOpenAI
from quantize_speed import train_model

from fucina.model_dir import resolve_model_dir
from fucina.resources import builtin_prose_files
from fucina.tokenizer import FucinaTokenizer

RESULTS = Path(__file__).parent / "results"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"no server answered at {url}")


def start_fucina(model_dir: Path, threads: int, compile: bool) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "fucina.cli.main",
        "serve",
        "--model",
        str(model_dir),
        "--port",
        str(port),
    ]
    command += ["--max-batch", "32", "--max-queue", "64", "--model-name", "bench"] + (
        ["--compile"] if compile else []
    )
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_until_up(url, process)
    return process, url


def start_llama_cpp(
    model_dir: Path, work: Path, threads: int, context: int
) -> tuple[subprocess.Popen, str] | str:
    """llama.cpp's server on the f32 GGUF export, or the reason it was not started."""
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError:
        return "llama-cpp-python[server] not installed"
    from fucina.errors import FucinaError
    from fucina.interop.gguf import export_gguf
    from fucina.interop.source import load_source

    try:
        path = export_gguf(load_source(model_dir), work / "model-f32.gguf", quant="f32").path
    except FucinaError as err:
        return f"no GGUF: {err}"
    port = free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--port", str(port)]
    command += ["--n_threads", str(threads), "--n_ctx", str(context), "--model_alias", "bench"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_until_up(url, process)
    return process, url


def prompts(tokenizer: FucinaTokenizer, count: int, length: int) -> list[str]:
    """`count` different openings of the built-in prose, about `length` tokens each."""
    words = " ".join(path.read_text(encoding="utf-8") for path in builtin_prose_files()).split()
    chosen = []
    for index in range(count):
        start = index * 97 % max(len(words) - 200, 1)
        text = ""
        for word in words[start:]:
            if len(tokenizer.encode(text + " " + word)) > length:
                break
            text = (text + " " + word).strip()
        chosen.append(text)
    return chosen


async def one_level(
    url: str, texts: list[str], clients: int, requests: int, new_tokens: int, tokenizer, fucina: bool
):
    """TTFT percentiles, aggregate tokens/s and failures for `clients` concurrent streaming clients."""
    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=600)
    extra = {"ignore_eos": True} if fucina else {}
    first_token: list[float] = []
    produced = failed = 0

    async def one_client(index: int) -> None:
        nonlocal produced, failed
        for turn in range(requests):
            prompt = texts[(index * requests + turn) % len(texts)]
            start = time.perf_counter()
            try:
                stream = await client.completions.create(
                    model="bench",
                    prompt=prompt,
                    max_tokens=new_tokens,
                    temperature=0,
                    stream=True,
                    extra_body=extra,
                )
                pieces, first = [], None
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].text:
                        first = first or time.perf_counter() - start
                        pieces.append(chunk.choices[0].text)
                first_token.append(first if first is not None else time.perf_counter() - start)
                produced += len(tokenizer.encode("".join(pieces)))
            except Exception:  # noqa: BLE001 - a failed request is a result to count, not a crash
                failed += 1

    start = time.perf_counter()
    async with client:
        await asyncio.gather(*(one_client(i) for i in range(clients)))
    wall = time.perf_counter() - start
    ordered = sorted(first_token) or [float("nan")]
    return {
        "clients": clients,
        "requests": clients * requests,
        "failed": failed,
        "ttft_p50_s": round(statistics.median(ordered), 4),
        "ttft_p95_s": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 4),
        "tokens_per_second": round(produced / wall, 1),
        "generated_tokens": produced,
        "wall_s": round(wall, 2),
    }


def measure(url: str, texts, levels, requests, new_tokens, tokenizer, fucina: bool) -> list[dict]:
    asyncio.run(one_level(url, texts, 1, 1, new_tokens, tokenizer, fucina))  # warm-up
    return [asyncio.run(one_level(url, texts, c, requests, new_tokens, tokenizer, fucina)) for c in levels]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a trained model or run directory (default: train one briefly)")
    parser.add_argument("--preset", default="llama-30m")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=2, help="requests each client sends in turn")
    parser.add_argument("--compile", action="store_true", help="serve with fucina serve --compile")
    parser.add_argument("--quick", action="store_true", help="tiny model and budgets: proves the script runs")
    args = parser.parse_args()
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # one line per request otherwise
    logging.getLogger("httpx").setLevel(logging.WARNING)
    levels = [1, 8, 32]
    if args.quick:
        args.preset, args.train_steps, args.context, args.threads = "llama-tiny", 3, 64, 1
        args.prompt_tokens, args.new_tokens, args.requests, levels = 8, 8, 1, [1, 4]

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = (
            resolve_model_dir(args.model)
            if args.model
            else train_model(work, args.preset, args.train_steps, args.context)
        )
        tokenizer = FucinaTokenizer.load(model_dir)
        texts = prompts(tokenizer, 64, args.prompt_tokens)
        report: dict = {
            "model": str(args.model or f"{args.preset}, {args.train_steps} steps"),
            "threads": args.threads,
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "requests_per_client": args.requests,
            "machine": platform.processor() or platform.machine(),
            "quick": args.quick,
        }
        process, url = start_fucina(model_dir, args.threads, args.compile)
        try:
            report["fucina"] = measure(url, texts, levels, args.requests, args.new_tokens, tokenizer, True)
        finally:
            process.terminate()
            process.wait(timeout=60)
        peer = start_llama_cpp(model_dir, work, args.threads, args.context)
        if isinstance(peer, str):
            report["llama_cpp_server"] = peer
        else:
            process, url = peer
            try:
                report["llama_cpp_server"] = measure(
                    url, texts, levels, args.requests, args.new_tokens, tokenizer, False
                )
            finally:
                process.terminate()
                process.wait(timeout=60)

    fucina = report["fucina"]
    report["speedup_vs_own_single_stream"] = round(
        fucina[-1]["tokens_per_second"] / fucina[0]["tokens_per_second"], 2
    )
    if isinstance(report["llama_cpp_server"], list):
        peer_top = report["llama_cpp_server"][-1]["tokens_per_second"]
        report["speedup_vs_llama_cpp_server"] = round(fucina[-1]["tokens_per_second"] / peer_top, 2)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / ("serve_load_quick.json" if args.quick else "serve_load.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'server':<18}{'clients':>8}{'ttft p50':>10}{'ttft p95':>10}{'tok/s':>10}{'failed':>8}")
    for name in ("fucina", "llama_cpp_server"):
        rows = report[name]
        if isinstance(rows, str):
            print(f"{name:<18}{rows}")
            continue
        for row in rows:
            print(
                f"{name:<18}{row['clients']:>8}{row['ttft_p50_s']:>10}{row['ttft_p95_s']:>10}"
                f"{row['tokens_per_second']:>10}{row['failed']:>8}"
            )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
