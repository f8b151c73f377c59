"""`fucina serve` as a user runs it: a subprocess bound to 127.0.0.1, the API key from the environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

from openai import OpenAI
from serving import free_port


def _wait_for_health(url: str, process: subprocess.Popen) -> dict:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read().decode()
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.1)
    raise TimeoutError("fucina serve did not answer /health")


def test_fucina_serve_binds_localhost_and_takes_the_key_from_the_environment(served_model_dir):
    port = free_port()
    command = [sys.executable, "-m", "fucina.cli.main", "serve", "--model", str(served_model_dir)]
    command += ["--port", str(port), "--max-batch", "2", "--model-name", "mio"]
    env = {**os.environ, "FUCINA_API_KEY": "chiave"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        assert _wait_for_health(url, process)["model"] == "mio"
        try:
            urllib.request.urlopen(f"{url}/v1/models", timeout=5)
            raise AssertionError("no key, yet the models were listed")
        except urllib.error.HTTPError as err:
            assert err.code == 401
        client = OpenAI(base_url=f"{url}/v1", api_key="chiave", max_retries=0)
        reply = client.chat.completions.create(
            model="mio", messages=[{"role": "user", "content": "Ciao"}], max_tokens=3, temperature=0
        )
        assert reply.model == "mio" and reply.usage.completion_tokens <= 3
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_the_default_address_is_this_machine_only():
    from fucina.cli.main import build_parser

    args = build_parser().parse_args(["serve", "--model", "runs/x"])
    assert args.host == "127.0.0.1" and args.api_key is None
