"""GGUF exports run in an unpatched llama.cpp (llama-cpp-python): same token ids, same greedy text.

Marked `interop` (make test-interop installs llama-cpp-python); CI does not run these.
"""

from __future__ import annotations

import json
import lzma
from pathlib import Path

import numpy as np
import pytest
import torch
from export_helpers import ITALIAN_SAMPLES, architecture_model_dir, random_model, write_model_dir

from fucina.inference.generate import SamplingConfig, generate
from fucina.interop.gguf import export_gguf
from fucina.interop.source import load_source
from fucina.resources import builtin_chat_file, builtin_prose_files
from fucina.tokenizer import train_tokenizer

pytestmark = pytest.mark.interop
llama_cpp = pytest.importorskip("llama_cpp")

F32_KV_CACHE = dict(type_k=0, type_v=0)  # GGML_TYPE_F32: llama.cpp's default f16 cache would round keys
# (architecture name, overrides): tied head, biases (permuted with q/k) and a bias-less GPT-2 included.
MODELS = {
    "llama-gqa": ("llama", {}),
    "llama-tied-biases": ("llama", {"tie_embeddings": True, "bias": True}),
    "gpt2": ("gpt2", {}),
    "gpt2-no-biases-tied": ("gpt2", {"bias": False, "tie_embeddings": True}),
}
# llama.cpp's gpt2 graph computes GELU through an f16 lookup table: logits agree to ~3e-3, not 1e-4.
LOGIT_TOLERANCE = {"llama": 1e-3, "gpt2": 1e-2}


def _load(path: Path, **kwargs):
    return llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=1, verbose=False, **kwargs)


@pytest.fixture(scope="module", params=list(MODELS), ids=list(MODELS))
def exported(request, tmp_path_factory):
    architecture, overrides = MODELS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    source = load_source(architecture_model_dir(root / "model", architecture, **overrides))
    path = export_gguf(source, root / "model.gguf", quant="f32").path
    llm = _load(path, logits_all=True, **F32_KV_CACHE)
    yield architecture, source, llm
    llm.close()


def test_llama_cpp_logits_equal_fucina_logits(exported):
    architecture, source, llm = exported
    ids = sum((source.tokenizer.encode(text) for text in ITALIAN_SAMPLES), [])[:90]
    llm.reset()
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)])
    with torch.no_grad():
        ours = source.model(torch.tensor([ids]))[0].numpy()
    assert np.abs(theirs - ours).max() < LOGIT_TOLERANCE[architecture]


def test_llama_cpp_greedy_continuation_equals_fucina_for_32_tokens(exported):
    _, source, llm = exported
    prompt = [source.tokenizer.eos_id] + source.tokenizer.encode("La cucina italiana è famosa per")
    ours = generate(source.model, [prompt], SamplingConfig(max_new_tokens=32, greedy=True))[0]
    llm.reset()
    llm.eval(prompt)
    theirs = []
    for _ in range(32):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        theirs.append(token)
        llm.eval([token])
    assert theirs == ours


def test_llama_cpp_parses_the_rendered_chat_template_into_fucina_prompt_ids(exported):
    _, source, llm = exported
    tok = source.tokenizer
    messages = [{"role": "user", "content": "Ciao, come stai?"}, {"role": "assistant", "content": "Bene!"}]
    messages.append({"role": "user", "content": "Che si mangia stasera?"})
    rendered = tok.template.render(messages, add_generation_prompt=True)
    assert llm.tokenize(rendered.encode(), add_bos=False, special=True) == tok.template.encode_prompt(
        tok, messages
    )


def _italian_texts(shared_data_root: Path | None) -> list[str]:
    """Built-in prose and chat, hard cases, and (when present) 200 KB of a real novel, cut into lines."""
    texts = [path.read_text(encoding="utf-8") for path in builtin_prose_files()]
    with open(builtin_chat_file(), encoding="utf-8") as handle:
        texts += [m["content"] for line in handle for m in json.loads(line)["messages"]]
    texts += list(ITALIAN_SAMPLES) + [
        "emoji 😀👍🏽 e 中文字符，测试。 हिन्दी। عربي، ok",
        "  doppi  spazi\t\ttab\r\nCRLF  \n\n\n",
        "L’Italia’s «virgolette» “curve” ‘singole’ — trattino – en; x²³ ½ €100,00 1.234.567,89",
        "perché? PERCHÉ! ...!!! ?! (a)(b) [c] a|b a/b a_b a-b a+b=c <tag> @user #hash 100% 3° 5'",
        "e'' l'' 'quoted' ' leading po' d'Italia dell'8 l'80% all'1,5 E\u0300 cosi\u0300",
    ]
    novel = shared_data_root / "eltec-ita" / "eltec_ita.jsonl.xz" if shared_data_root else None
    if novel is not None and novel.is_file():
        with lzma.open(novel, "rt", encoding="utf-8") as handle:
            texts += json.loads(handle.readline())["text"][:200_000].split("\n")
    return texts


@pytest.fixture(scope="module")
def shared_data_root(request) -> Path | None:
    try:
        return request.getfixturevalue("shared_data")
    except pytest.skip.Exception:
        return None


@pytest.mark.parametrize("pretokenizer", ["italian", "bytelevel"])
def test_llama_cpp_tokenizes_italian_text_to_fucina_ids(tmp_path, pretokenizer, shared_data_root):
    texts = _italian_texts(shared_data_root)
    tokenizer = train_tokenizer(
        texts[:60], 2000, template="chatml", pretokenizer=pretokenizer, show_progress=False
    )
    from export_helpers import ARCHITECTURES

    config = ARCHITECTURES["llama"][0]
    config = type(config)(**{**config.to_dict(), "vocab_size": tokenizer.vocab_size})
    model_dir = write_model_dir(tmp_path / "model", random_model(config), tokenizer)
    path = export_gguf(load_source(model_dir), tmp_path / "m.gguf", quant="f16").path
    llm = _load(path, vocab_only=True)
    try:
        mismatches = [
            text
            for text in texts
            if llm.tokenize(text.encode(), add_bos=False, special=False) != tokenizer.encode(text)
        ]
    finally:
        llm.close()
    assert mismatches == []
    assert len(texts) > 400
