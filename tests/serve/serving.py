"""Test helpers: a tiny model directory that answers one Italian question by heart, and servers of it on free ports.

The model (d_model 64, 2 layers, context 128) is trained for a few hundred steps on one conversation, so
its greedy reply is known text with accents (two-byte characters split across byte-level tokens); a
real tokenizer trained on the built-in corpus is saved beside it, as `fucina train` would.
`start_server(model_dir, **create_app_options)` runs uvicorn in a thread and yields the base URL.
"""

from __future__ import annotations

import socket
import threading
import time
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
        vocab_size=tokenizer.vocab_size, context_length=128, n_layers=2, d_model=64, n_heads=4, d_ff=128
    )
    model = Transformer(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
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
