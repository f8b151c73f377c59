"""Structured pruning: the surgery removes exactly what it says, 0% changes nothing, the ranking is
meaningful on a really trained model, the result exports (HF strict, GGUF), and distillation heals it."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import time
from pathlib import Path

import pytest
import torch

from fucina.compress.prune import PRUNING_FILE, PruneSpec, parameter_count, prune_model, prune_model_dir
from fucina.compress.prune_importance import Importance, activation_importance, magnitude_importance
from fucina.errors import ConfigError
from fucina.evaluate.heldout import heldout_texts, training_texts
from fucina.evaluate.intrinsic import evaluate_texts
from fucina.model.config import ModelConfig
from fucina.model.io import load_model, save_model
from fucina.model.transformer import Transformer
from fucina.tokenizer import FucinaTokenizer, train_tokenizer
from tiny_models import VARIANTS, tiny_model
from train_helpers import run_cli

REPO = Path(__file__).resolve().parents[2]
# A small LLaMA layout with GQA (8 query heads in 4 KV groups): head groups, channels and blocks to rank.
LLAMA = ModelConfig(
    vocab_size=512,
    context_length=64,
    n_layers=4,
    d_model=64,
    n_heads=8,
    n_kv_heads=4,
    d_ff=192,
    positions="rope",
    norm="rmsnorm",
    mlp="swiglu",
    bias=False,
    tie_embeddings=False,
)
TRAIN_SECONDS = 40  # the fixture's training budget: the ranking needs a model that learned something


@dataclasses.dataclass
class Trained:
    """A model trained on real Italian text, with its directory and texts it never trained on."""

    model: Transformer
    tokenizer: FucinaTokenizer
    directory: Path
    calibration: list[str]
    heldout: list[str]
    train_file: Path


def _windows(tokenizer: FucinaTokenizer, texts: list[str], length: int) -> torch.Tensor:
    stream = [i for text in texts for i in [*tokenizer.encode(text), tokenizer.eos_id]]
    count = len(stream) // (length + 1)
    return torch.tensor(stream[: count * (length + 1)]).view(count, length + 1)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread: on a busy 2-core machine two threads per test process run many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(shared_data, tmp_path_factory) -> Trained:
    """A 4-layer LLaMA-style model trained for a few dozen seconds on Italian Wikipedia passages."""
    passages = list(itertools.islice(training_texts(shared_data, "wikipedia"), 1300))
    train, calibration = passages[:1200], passages[1200:]
    tokenizer = train_tokenizer(train[:400], LLAMA.vocab_size, template="chatml", show_progress=False)
    windows = _windows(tokenizer, train, LLAMA.context_length)
    torch.manual_seed(0)
    model = Transformer(LLAMA)
    # Weight decay as the recipes use it: it shrinks what training does not use, which magnitude reads.
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    generator = torch.Generator().manual_seed(0)
    start = time.monotonic()
    for step in range(1000):  # stops at the time budget on a slow machine
        rows = windows[torch.randint(len(windows), (16,), generator=generator)]
        loss = model(rows[:, :-1], labels=rows[:, 1:]) / rows[:, 1:].numel()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step >= 150 and time.monotonic() - start > TRAIN_SECONDS:
            break
    model.eval()
    directory = tmp_path_factory.mktemp("trained") / "model"
    save_model(model, directory)
    tokenizer.save(directory)
    train_file = directory.parent / "train.jsonl"
    train_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in train), encoding="utf-8")
    heldout = heldout_texts(shared_data, "wikipedia")[:80]
    return Trained(model, tokenizer, directory, calibration, heldout, train_file)


def _loss(model: Transformer, trained: Trained) -> float:
    return evaluate_texts(model, trained.tokenizer, trained.heldout, show_progress=False).loss


def _calibration_importance(trained: Trained) -> Importance:
    batches = list(_windows(trained.tokenizer, trained.calibration, LLAMA.context_length)[:, :-1].split(8))
    return activation_importance(trained.model, batches)


# --- the surgery -------------------------------------------------------------------------------------------


def _random_importance(model: Transformer, seed: int) -> Importance:
    """Any ranking will do for the surgery: what matters is that the right things are removed."""
    base = magnitude_importance(model)
    generator = torch.Generator().manual_seed(seed)
    return Importance(
        torch.rand(base.heads.shape, generator=generator, dtype=torch.float64),
        torch.rand(base.channels.shape, generator=generator, dtype=torch.float64),
        torch.rand(base.layers.shape, generator=generator, dtype=torch.float64),
        "random",
    )


@torch.no_grad()
def _silenced(model: Transformer, record) -> Transformer:
    """The unpruned model with what `record` removed made to contribute nothing (zeroed outputs)."""
    silent = Transformer(model.config)
    silent.load_state_dict(model.state_dict())
    config, hd = model.config, model.config.head_size
    rep = 1 if config.kv_heads == 1 else config.n_heads // config.kv_heads
    kept = [i for i in range(config.n_layers) if i not in record.removed_layers]
    for index, block in enumerate(silent.blocks):
        if index in record.removed_layers:
            for linear in (block.mixer.out_proj, block.ffn.down_proj):
                linear.weight.zero_()
                if linear.bias is not None:
                    linear.bias.zero_()
            continue
        position = kept.index(index)
        for unit in record.removed_head_units[position]:
            for head in range(unit * rep, (unit + 1) * rep):
                block.mixer.out_proj.weight[:, head * hd : (head + 1) * hd] = 0
        for channel in record.removed_channels[position]:
            block.ffn.down_proj.weight[:, channel] = 0
    return silent.eval()


SURGERY_VARIANTS = ["gqa-rope-llama", "mqa-rope", "wide-heads-gelu", "sliding-window-some-layers-learned"]


@pytest.mark.parametrize("variant", SURGERY_VARIANTS)
def test_pruned_model_computes_the_unpruned_one_with_the_removed_parts_silenced(variant):
    model = tiny_model(**{**VARIANTS[variant], "n_layers": 3})
    spec = PruneSpec(heads=0.5, ffn=0.25, layers=1)
    pruned, record = prune_model(model, _random_importance(model, seed=1), spec)
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(pruned(ids), _silenced(model, record)(ids), atol=1e-5)
    assert parameter_count(pruned) < parameter_count(model)
    assert pruned.config.n_layers == 2 and pruned.config.ff_size == 48
    assert pruned.config.head_size == model.config.head_size  # heads keep their size


def test_pruning_a_gqa_model_removes_whole_kv_groups():
    model = tiny_model(**{**VARIANTS["gqa-rope-llama"], "n_heads": 8, "n_kv_heads": 4, "d_model": 64})
    pruned, record = prune_model(model, _random_importance(model, seed=2), PruneSpec(heads=0.5))
    assert (pruned.config.n_heads, pruned.config.kv_heads) == (4, 2)  # 2 of 4 groups, 2 query heads each
    assert pruned.config.n_heads % pruned.config.kv_heads == 0
    assert all(len(units) == 2 for units in record.removed_head_units)
    with pytest.raises(ConfigError, match="removes no head group.*smallest step is 0.25"):
        prune_model(model, _random_importance(model, seed=2), PruneSpec(heads=0.2))


def test_pruning_a_gqa_model_down_to_one_group_gives_multi_query_attention():
    model = tiny_model(**VARIANTS["gqa-rope-llama"])  # 4 heads in 2 groups
    pruned, _ = prune_model(model, _random_importance(model, seed=3), PruneSpec(heads=0.5))
    assert (pruned.config.n_heads, pruned.config.kv_heads) == (2, 1)


def test_windowed_layers_follow_their_blocks_when_blocks_are_removed():
    variant = VARIANTS["sliding-window-some-layers-learned"]
    model = tiny_model(**{**variant, "n_layers": 4, "sliding_window_layers": [1, 3]})
    importance = _random_importance(model, seed=0)
    importance.layers = torch.tensor([1.0, 0.0, 2.0, 3.0], dtype=torch.float64)  # block 1 goes
    pruned, record = prune_model(model, importance, PruneSpec(layers=1))
    assert record.removed_layers == [1]
    assert pruned.config.sliding_window_layers == [2]  # old block 3 is now block 2
    importance.layers = torch.tensor([1.0, 0.0, 2.0, -1.0], dtype=torch.float64)  # blocks 1 and 3 go
    pruned, _ = prune_model(model, importance, PruneSpec(layers=2))
    assert pruned.config.sliding_window is None and pruned.config.sliding_window_layers is None


@pytest.mark.parametrize(
    "overrides, part",
    [
        (dict(ffn="moe", moe_num_experts=2, moe_top_k=1), "feed-forward moe"),
        (dict(mixer="mla", positions="rope"), "mixer mla"),
        (dict(mixer="mamba"), "mixer mamba"),
        (dict(linear="bitnet"), "linear 'bitnet'"),
    ],
)
def test_architectures_without_plain_heads_and_channels_are_refused_by_name(overrides, part):
    model = tiny_model(**overrides)
    with pytest.raises(ConfigError, match=f"fucina prune handles attention \\+ MLP.*{part}"):
        prune_model(model, magnitude_importance(tiny_model()), PruneSpec(ffn=0.5))


def test_head_pruning_of_a_gpt2_model_is_refused_but_its_ffn_and_blocks_prune():
    model = tiny_model(**{**VARIANTS["mha-learned-gpt2"], "n_layers": 3})
    importance = _random_importance(model, seed=0)
    with pytest.raises(ConfigError, match="--heads: the pruned model could no longer be exported"):
        prune_model(model, importance, PruneSpec(heads=0.25))
    pruned, _ = prune_model(model, importance, PruneSpec(ffn=0.5, layers=1))
    assert (pruned.config.n_layers, pruned.config.ff_size, pruned.config.n_heads) == (2, 32, 4)


def test_head_counts_hugging_face_cannot_configure_are_refused_with_the_fractions_that_work():
    model = Transformer(LLAMA)  # d_model 64, 8 heads in 4 groups: 6 heads would not divide 64
    with pytest.raises(ConfigError, match="leaves 6 heads.*multiple of the head count.*keep it: 0.5, 0.75$"):
        prune_model(model, magnitude_importance(model), PruneSpec(heads=0.25))


def test_bad_fractions_are_refused_by_option():
    with pytest.raises(ConfigError, match="--heads must be a fraction"):
        PruneSpec(heads=1.0)
    with pytest.raises(ConfigError, match="--method must be one of"):
        PruneSpec(method="random")
    model = tiny_model()
    with pytest.raises(ConfigError, match="--layers 2 would remove every one of the 2 blocks"):
        prune_model(model, magnitude_importance(model), PruneSpec(layers=2))


# --- a really trained model --------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["activation", "magnitude"])
def test_pruning_nothing_keeps_the_config_and_bit_identical_logits(trained, method):
    importance = (
        _calibration_importance(trained) if method == "activation" else magnitude_importance(trained.model)
    )
    pruned, record = prune_model(trained.model, importance, PruneSpec(method=method))
    assert pruned.config == trained.model.config and record.before == record.after
    ids = _windows(trained.tokenizer, trained.heldout[:4], LLAMA.context_length)[:4, :-1]
    with torch.no_grad():
        assert torch.equal(pruned(ids), trained.model(ids))


@pytest.mark.parametrize(
    "spec",
    [PruneSpec(heads=0.5), PruneSpec(ffn=0.5), PruneSpec(layers=1)],
    ids=["head-groups", "ffn-channels", "blocks"],
)
def test_pruning_the_least_important_hurts_less_than_pruning_the_most_important(trained, spec):
    importance = _calibration_importance(trained)
    least, _ = prune_model(trained.model, importance, spec)
    most, _ = prune_model(trained.model, importance.negated(), spec)
    unpruned, after_least, after_most = (_loss(m, trained) for m in (trained.model, least, most))
    assert after_least < after_most
    assert after_most - unpruned > 2 * (after_least - unpruned)  # not a close call


def test_magnitude_ranking_of_ffn_channels_also_beats_its_opposite(trained):
    # Only under weight decay: trained without it, this model's large-norm channels are the idle ones
    # (docs/compression.md, Pruning).
    importance = magnitude_importance(trained.model)
    least, _ = prune_model(trained.model, importance, PruneSpec(ffn=0.5, method="magnitude"))
    most, _ = prune_model(trained.model, importance.negated(), PruneSpec(ffn=0.5, method="magnitude"))
    assert _loss(least, trained) < _loss(most, trained)


# --- the model directory, its exports, the command ---------------------------------------------------------


@pytest.fixture(scope="module")
def pruned_dir(trained, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pruned") / "model"
    prune_model_dir(
        trained.directory,
        out,
        PruneSpec(heads=0.5, ffn=0.5, layers=1, ffn_multiple=32),
        calibration=trained.calibration,
        heldout={"wikipedia": trained.heldout},
    )
    return out


def test_a_pruned_model_directory_is_ordinary_and_records_what_went(trained, pruned_dir):
    model = load_model(pruned_dir)
    config = model.config
    assert (config.n_layers, config.n_heads, config.kv_heads, config.ff_size) == (3, 4, 2, 96)
    assert config.head_size == LLAMA.head_size
    record = json.loads((pruned_dir / PRUNING_FILE).read_text())
    assert record["parameters_after"] == parameter_count(model) < record["parameters_before"]
    assert len(record["removed_layers"]) == 1 and len(record["removed_channels"]) == 3
    bpb = record["bits_per_byte"]["wikipedia"]
    assert bpb["after"] > bpb["before"] > 0
    assert FucinaTokenizer.load(pruned_dir).encode("Roma") == trained.tokenizer.encode("Roma")


def test_pruned_llama_loads_strictly_in_transformers_with_equal_logits(pruned_dir, tmp_path):
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModelForCausalLM

    from fucina.interop.hf_export import export_hf
    from fucina.interop.source import load_source

    source = load_source(pruned_dir)
    export_hf(source, tmp_path / "hf")
    hf_model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert type(hf_model).__name__ == "LlamaForCausalLM"
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    ids = torch.tensor([source.tokenizer.encode("La città di Roma è la capitale d'Italia.")])
    with torch.no_grad():
        assert torch.allclose(hf_model.eval()(ids).logits, source.model(ids), atol=1e-4)


def test_pruned_llama_writes_a_gguf_with_the_pruned_sizes(pruned_dir, tmp_path):
    import gguf

    from fucina.interop.gguf import export_gguf
    from fucina.interop.source import load_source

    source = load_source(pruned_dir)
    config = source.model.config
    reader = gguf.GGUFReader(export_gguf(source, tmp_path / "m.gguf", quant="q8_0").path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    assert fields["llama.block_count"] == 3 and fields["llama.feed_forward_length"] == 96
    assert (fields["llama.attention.head_count"], fields["llama.attention.head_count_kv"]) == (4, 2)
    assert fields["llama.attention.key_length"] == config.head_size  # no longer d_model / n_heads
    shapes = {t.name: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}
    assert shapes["blk.2.attn_q.weight"] == (4 * config.head_size, config.d_model)
    assert shapes["blk.2.attn_k.weight"] == (2 * config.head_size, config.d_model)
    assert shapes["blk.2.ffn_down.weight"] == (config.d_model, 96)
    assert "blk.3.attn_q.weight" not in shapes


def test_pruned_gpt2_exports_strictly_to_hf_and_gguf(tmp_path):
    os.environ["HF_HUB_OFFLINE"] = "1"
    import gguf
    from transformers import AutoModelForCausalLM

    from fucina.interop.gguf import export_gguf
    from fucina.interop.hf_export import export_hf
    from fucina.interop.source import load_source

    model = tiny_model(**{**VARIANTS["mha-learned-gpt2"], "n_layers": 3, "vocab_size": 300})
    source_dir = tmp_path / "gpt2"
    save_model(model, source_dir)
    texts = ["Il gatto dorme sul divano mentre fuori piove."] * 40
    train_tokenizer(texts, 280, template="chatml", show_progress=False).save(source_dir)
    prune_model_dir(source_dir, tmp_path / "pruned", PruneSpec(ffn=0.5, layers=1, method="magnitude"))
    source = load_source(tmp_path / "pruned")
    export_hf(source, tmp_path / "hf")
    _, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    reader = gguf.GGUFReader(export_gguf(source, tmp_path / "m.gguf").path)
    assert {name: field.contents() for name, field in reader.fields.items()}["gpt2.block_count"] == 2


def test_a_quantized_model_directory_is_refused(trained, tmp_path):
    from fucina.compress.quantize import quantize_model_dir

    quantize_model_dir(trained.directory, tmp_path / "int8", bits=8)
    with pytest.raises(ConfigError, match="is a quantized model directory; prune a full-precision model"):
        prune_model_dir(tmp_path / "int8", tmp_path / "out", PruneSpec(ffn=0.5, method="magnitude"))


def test_cli_prunes_and_reports_parameters_and_bits_per_byte(trained, tmp_path):
    calibration = tmp_path / "calibration.txt"
    calibration.write_text("\n\n".join(trained.calibration), encoding="utf-8")
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in trained.heldout[:20]), encoding="utf-8"
    )
    out = tmp_path / "pruned"
    args = ["prune", "--model", str(trained.directory), "--out", str(out), "--ffn", "0.25", "--layers", "1"]
    result = run_cli(*args, "--calibration", str(calibration), "--heldout", str(heldout))
    assert result.returncode == 0, result.stderr
    assert "n_layers: 4 -> 3" in result.stdout and "d_ff: 192 -> 128" in result.stdout
    assert "parameters:" in result.stdout and f"bits per byte on {heldout}" in result.stdout
    assert load_model(out).config.n_layers == 3
    refused = run_cli(*args, "--overwrite", "--heldout", "none")  # activation importance without text
    assert refused.returncode == 2 and "--method activation needs --calibration" in refused.stderr


# --- healing -----------------------------------------------------------------------------------------------


def test_a_few_distillation_steps_of_the_healing_config_lower_the_pruned_loss(trained, pruned_dir, tmp_path):
    from fucina.train.config import load_train_config
    from fucina.train.loop import train

    overrides = [
        f"init_from={pruned_dir}",
        f"distill.teacher={trained.directory}",
        f"data.train=[{trained.train_file}]",
        "data.val_fraction=0.05",
        "data.min_val_docs=1",
        "train.max_steps=20",
        "train.batch_size=8",
        "train.precision=fp32",
        "train.num_threads=1",
        "schedule.warmup_steps=2",
        "optim.lr=1.0e-3",
        "eval.every=20",
        "eval.max_batches=2",
        "checkpoint.every=20",
        "log.progress=false",
        "log.tensorboard=false",
        "log.plot=false",
    ]
    config = load_train_config(REPO / "configs" / "llama-pruned-heal.yaml", overrides)
    assert config.stage == "distill" and config.distill.alpha < 0.5
    train(config, tmp_path / "heal")
    healed = load_model(tmp_path / "heal" / "final")
    assert healed.config == load_model(pruned_dir).config
    assert _loss(healed, trained) < _loss(load_model(pruned_dir), trained)
