"""GGUF exports run in an unpatched llama.cpp (llama-cpp-python): same token ids, same greedy text.

Marked `interop` (make test-interop installs llama-cpp-python); CI does not run these.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import lzma
from pathlib import Path

import numpy as np
import pytest
import torch
from export_helpers import ITALIAN_SAMPLES, architecture_model_dir, random_model, write_model_dir

from fucina.inference.generate import SamplingConfig, generate
from fucina.interop.gguf import export_gguf
from fucina.interop.gguf_weights import load_gguf_weights
from fucina.interop.source import load_source
from fucina.model.transformer import Transformer
from fucina.resources import builtin_chat_file, builtin_prose_files
from fucina.tokenizer import train_tokenizer

pytestmark = pytest.mark.interop
try:
    import llama_cpp
except ImportError:  # never a skip: `make test-interop` installs it, and without it these tests fail
    llama_cpp = None


@pytest.fixture(scope="module", autouse=True)
def _needs_llama_cpp():  # module scope: before the module-scoped exports that load llama.cpp
    if llama_cpp is None:
        pytest.fail("llama-cpp-python is not installed: run `make test-interop` (it installs it)")


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
    with without_weight_repacking():
        return llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=1, verbose=False, **kwargs)


@contextlib.contextmanager
def without_weight_repacking():
    """Load llama.cpp models with use_extra_bufts off: the AMX repacking of q8_0/q4_0 weights in
    llama-cpp-python 0.3.36 built on an AMX CPU crashes on the first decode (llama.cpp then uses its
    plain AVX-512 dot products, which compute the same q8_0/q4_0 products)."""
    module = llama_cpp.llama.llama_cpp
    default = module.llama_model_default_params

    def params():
        value = default()
        value.use_extra_bufts = False
        return value

    module.llama_model_default_params = params
    try:
        yield
    finally:
        module.llama_model_default_params = default


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


@pytest.mark.parametrize("rope_type", ["linear", "ntk", "yarn"])
def test_llama_cpp_computes_fucinas_scaled_rope_from_the_gguf_keys(tmp_path, rope_type):
    # 90 positions, past the 24 the scaling stretches from: every scaling changes the logits there.
    scaling = {"rope_type": rope_type, "factor": 4.0, "original_context_length": 24}
    source = load_source(architecture_model_dir(tmp_path / "model", "llama", rope_scaling=scaling))
    ids = sum((source.tokenizer.encode(text) for text in ITALIAN_SAMPLES), [])[:90]
    llm = _load(
        export_gguf(source, tmp_path / "model.gguf", quant="f32").path, logits_all=True, **F32_KV_CACHE
    )
    try:
        llm.eval(ids)
        theirs = np.array(llm.scores[: len(ids)])
    finally:
        llm.close()
    unscaled = Transformer(dataclasses.replace(source.model.config, rope_scaling=None)).eval()
    unscaled.load_state_dict(source.model.state_dict())
    with torch.no_grad():
        ours = source.model(torch.tensor([ids]))[0].numpy()
        plain = unscaled(torch.tensor([ids]))[0].numpy()
    assert np.abs(plain - ours).max() > 100 * LOGIT_TOLERANCE["llama"]  # the scaling is really there
    assert np.abs(theirs - ours).max() < LOGIT_TOLERANCE["llama"]


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


# --- quantized levels ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_llama(tmp_path_factory):
    """The tiny llama of export_helpers trained briefly on built-in prose: confident, as real models are."""
    from export_helpers import ARCHITECTURES, tiny_tokenizer

    tokenizer = tiny_tokenizer("chatml")
    text = " ".join(path.read_text(encoding="utf-8") for path in builtin_prose_files()[:2])
    ids = torch.tensor(tokenizer.encode(text))
    config = ARCHITECTURES["llama"][0]
    torch.manual_seed(0)
    model = Transformer(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    length, generator = config.context_length, torch.Generator().manual_seed(0)
    for _ in range(300):
        starts = torch.randint(0, len(ids) - length - 1, (16,), generator=generator)
        batch = torch.stack([ids[s : s + length + 1] for s in starts])  # (16, T + 1)
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    root = tmp_path_factory.mktemp("trained")
    return load_source(write_model_dir(root / "model", model.eval(), tokenizer)), root


def _greedy(llm, prompt: list[int], count: int) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    tokens = []
    for _ in range(count):
        tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([tokens[-1]])
    return tokens


def test_llama_cpp_q8_0_greedy_continuation_equals_fucina_on_the_same_q8_0_weights(trained_llama):
    source, root = trained_llama
    path = export_gguf(source, root / "greedy-q8_0.gguf", quant="q8_0").path
    text = builtin_prose_files()[0].read_text(encoding="utf-8")
    prompt = [source.tokenizer.eos_id] + source.tokenizer.encode(text[:120])  # a passage it has learnt
    restored = load_gguf_weights(Transformer(source.model.config), path).eval()
    ours = generate(restored, [prompt], SamplingConfig(max_new_tokens=32, greedy=True))[0]
    llm = _load(path, logits_all=True)
    try:
        assert _greedy(llm, prompt, 32) == ours
    finally:
        llm.close()


@pytest.mark.parametrize("quant", ["q8_0", "q4_0"])
def test_llama_cpp_logits_equal_fucina_logits_on_the_quantized_weights_read_back(trained_llama, quant):
    # Round trip: llama.cpp computes with the q8_0/q4_0 blocks; fucina with the same blocks dequantized.
    source, root = trained_llama
    path = export_gguf(source, root / f"{quant}.gguf", quant=quant).path
    restored = load_gguf_weights(Transformer(source.model.config), path).eval()
    ids = sum((source.tokenizer.encode(text) for text in ITALIAN_SAMPLES), [])[:90]
    llm = _load(path, logits_all=True, **F32_KV_CACHE)
    try:
        llm.reset()
        llm.eval(ids)
        theirs = np.array(llm.scores[: len(ids)])
    finally:
        llm.close()
    with torch.no_grad():
        ours, unquantized = (
            restored(torch.tensor([ids]))[0].numpy(),
            source.model(torch.tensor([ids]))[0].numpy(),
        )
    spread = ours.std()
    # llama.cpp multiplies the blocks by q8_0-rounded activations: close, not equal, to the float product
    assert np.abs(theirs - ours).max() < 0.2 * spread
    if quant == "q4_0":  # 4-bit weight rounding dwarfs the activation rounding: far closer than float
        assert np.abs(theirs - ours).mean() < 0.5 * np.abs(unquantized - ours).mean()
