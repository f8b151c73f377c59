"""Test helpers: a tiny model directory that knows one Italian answer by heart; servers of it.

The model (d_model 64, 2 layers, context 1024) is trained for a few hundred steps on one conversation, so
its greedy reply is known text with accents (two-byte characters split across byte-level tokens); a
real tokenizer trained on the built-in corpus is saved beside it, as `fucina train` would.
`start_server(model_dir, **create_app_options)` runs uvicorn in a thread and yields the base URL.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import uvicorn

from fucina.model.config import ModelConfig
from fucina.model.io import save_model
from fucina.model.transformer import Transformer
from fucina.resources import builtin_chat_file, builtin_prose_files
from fucina.serve.app import create_app
from fucina.tokenizer import train_tokenizer

QUESTION = "Com'è il caffè in città?"
ANSWER = "Perché è già così buono? Più caffè, città e virtù: ciò è tutto."
MODEL_NAME = "tiny-it"


def train_model_dir(directory: Path) -> Path:
    texts = [path.read_text(encoding="utf-8") for path in builtin_prose_files()[:4]]
    texts.append(builtin_chat_file().read_text(encoding="utf-8"))
    tokenizer = train_tokenizer(texts, 400, template="chatml", show_progress=False)
    messages = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]
    ids = torch.tensor([tokenizer.template.encode(tokenizer, messages).input_ids])  # (1, T)
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size, context_length=1024, n_layers=2, d_model=64, n_heads=4, d_ff=128
    )
    model = Transformer(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: a second thread only waits, and on a busy machine spins
    try:
        for _ in range(300):
            logits = model(ids[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    save_model(model.eval(), directory)
    tokenizer.save(directory)
    return directory


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def start_server(model_dir: Path, **options) -> Iterator[str]:
    """Serve `model_dir` (create_app's keyword options) on a free local port; yields the base URL."""
    app = create_app(model_dir, **options)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def post_json(url: str, body: dict | bytes, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    """(status, JSON body) of a POST; error statuses are returned, not raised."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def sse_data(url: str, body: dict) -> list[bytes]:
    """The raw `data:` payloads of a streamed POST, as bytes, exactly as the server sent them."""
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.read().split(b"\n")
    return [line[len(b"data: ") :] for line in lines if line.startswith(b"data: ")]
