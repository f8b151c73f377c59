"""DPO: ln 2 at the first step, parity with TRL's DPOTrainer, learning a preference, runs and resume."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from test_resume import RESUME_SETTINGS, _assert_identical_runs, _kill_and_resume

from fucina.data.preferences import read_preference_pairs
from fucina.errors import ConfigError
from fucina.model.loss import IGNORE_INDEX
from fucina.train.config import config_from_dict
from fucina.train.dpo import REFERENCE_LOGPS_FILE, DPOObjective
from fucina.train.loop import train
from tiny_models import tiny_model
from train_helpers import merge, run_cli, tiny_config, write_config

PROMPTS = [
    "Qual è la capitale d'Italia?",
    "Come si dice grazie in inglese?",
    "Di che colore è il cielo?",
    "Quanti giorni ha una settimana?",
    "Chi ha scritto la Divina Commedia?",
    "Qual è il fiume più lungo d'Italia?",
]


def _pair_batch(vocab: int, pairs: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random pairs: a shared prompt of 4 tokens, answers of different lengths, padded; (2B, T)."""
    generator = torch.Generator().manual_seed(seed)
    rows, labels = [], []
    width = 12
    for side in range(2):
        for pair in range(pairs):
            prompt = torch.randint(3, vocab, (4,), generator=torch.Generator().manual_seed(seed * 100 + pair))
            answer = torch.randint(3, vocab, (3 + pair + side,), generator=generator)
            ids = torch.cat([prompt, answer])
            row = torch.zeros(width, dtype=torch.long)
            row[: len(ids)] = ids
            label = torch.full((width,), IGNORE_INDEX)
            label[len(prompt) - 1 : len(ids) - 1] = answer  # shifted: position t predicts t + 1
            rows.append(row)
            labels.append(label)
    return {"input_ids": torch.stack(rows), "labels": torch.stack(labels)}


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_policy_equal_to_reference_gives_ln2_sigmoid_and_zero_rewards(loss_type):
    model = tiny_model()
    objective = DPOObjective(copy.deepcopy(model), loss_type, beta=0.1)
    batch = _pair_batch(model.config.vocab_size)
    output = objective(model, batch)
    assert output.count == 3
    expected = {"sigmoid": math.log(2), "ipo": (1 / (2 * 0.1)) ** 2, "hinge": 1.0}[loss_type]
    assert float(output.loss_sum.detach()) / output.count == pytest.approx(expected, abs=1e-6)
    assert output.unit_sums["rewards/margin"] == pytest.approx(0.0, abs=1e-6)
    assert output.unit_sums["kl_proxy"] == pytest.approx(0.0, abs=1e-6)


def test_prompt_and_padding_tokens_do_not_change_the_loss():
    model, reference = tiny_model(seed=0), tiny_model(seed=1)
    objective = DPOObjective(reference, "sigmoid", beta=0.5)
    batch = _pair_batch(model.config.vocab_size)
    other = {k: v.clone() for k, v in batch.items()}
    padding = other["labels"] == IGNORE_INDEX
    other["input_ids"][:, -1] = 7  # padding beyond every sequence: unseen by earlier positions
    assert padding[:, -1].all()
    assert torch.equal(objective(model, batch).loss_sum, objective(model, other).loss_sum)


# --- parity with TRL ------------------------------------------------------------------------------------


def _trl_trainer(loss_types: list[str], weights: list[float] | None, beta: float, tmp_path):
    """A tiny DPOTrainer on a random Llama (policy seed 0, reference seed 1): what TRL computes."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(64)}, unk_token="t1"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="t0", eos_token="t2", unk_token="t1"
    )
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    policy = LlamaForCausalLM(config)
    torch.manual_seed(1)
    reference = LlamaForCausalLM(config)
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        loss_type=loss_types,
        loss_weights=weights,
        beta=beta,
        report_to=[],
        use_cpu=True,
        dataset_num_proc=None,
    )
    dataset = Dataset.from_list([{"prompt": "t5 t6", "chosen": "t7", "rejected": "t8"}])
    return DPOTrainer(
        model=policy, ref_model=reference, args=args, train_dataset=dataset, processing_class=tokenizer
    )


PAIRS = [
    {"prompt_ids": [3, 5, 6], "chosen_ids": [7, 9, 2], "rejected_ids": [8, 2]},
    {"prompt_ids": [4], "chosen_ids": [10, 11, 2], "rejected_ids": [11, 12, 13, 2]},
    {"prompt_ids": [20, 21, 22, 23], "chosen_ids": [30, 31, 2], "rejected_ids": [40, 41, 42, 43, 44, 2]},
]


def _fucina_batch(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """TRL's collated pairs in fucina's convention: labels shifted, -100 off the completions."""
    ids, completion = inputs["input_ids"], inputs["completion_mask"]
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, :-1] = ids[:, 1:].masked_fill(completion[:, 1:] == 0, IGNORE_INDEX)
    return {"input_ids": ids, "labels": labels}


@pytest.mark.parametrize(
    ("loss_types", "weights", "rpo_alpha", "fucina_loss"),
    [
        (["sigmoid"], None, None, "sigmoid"),
        (["ipo"], None, None, "ipo"),
        (["hinge"], None, None, "hinge"),
        (["sigmoid", "sft"], [1.0, 0.7], 0.7, "sigmoid"),  # RPO
    ],
)
def test_dpo_loss_matches_trl(tmp_path, loss_types, weights, rpo_alpha, fucina_loss):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    beta = 0.3
    trainer = _trl_trainer(loss_types, weights, beta, tmp_path)
    pairs = PAIRS
    if rpo_alpha is not None:
        # TRL's SFT term is a token mean over the batch, fucina's a mean of per-answer means: equal
        # when the chosen answers have one length.
        pairs = [p for p in PAIRS if len(p["chosen_ids"]) == 3]
    inputs = DataCollatorForPreference(pad_token_id=0)(pairs)
    expected = trainer._compute_loss(trainer.model, inputs, False)

    policy, reference = trainer.model, trainer.ref_model

    def logits_of(model):
        return lambda input_ids: model(input_ids).logits

    objective = DPOObjective(logits_of(reference), fucina_loss, beta, rpo_alpha=rpo_alpha)
    output = objective(logits_of(policy), _fucina_batch(inputs))
    assert output.count == len(pairs)
    assert float(output.loss_sum.detach()) / output.count == pytest.approx(float(expected.detach()), abs=1e-5)
    assert float(expected.detach()) != pytest.approx(math.log(2), abs=1e-3)  # the models really differ


# --- training runs --------------------------------------------------------------------------------------


def _write_pairs(path, count: int) -> None:
    """Pairs whose chosen answer always says 'sì' and the rejected one 'no': learnable from any prompt."""
    lines = [
        json.dumps({"prompt": PROMPTS[i % len(PROMPTS)], "chosen": "Sì, certo.", "rejected": "No, mai."})
        for i in range(count)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _dpo_config(init_from, prefs, **changes):
    base = tiny_config(
        None,
        stage="dpo",
        init_from=str(init_from),
        data={"train": [str(prefs)], "val_fraction": 0.25},
        dpo={"beta": 0.5},
        train={"max_steps": 12, "batch_size": 4},
        eval={"every": 12},
        log={"every": 1},
    )
    del base["model"], base["tokenizer"]
    return merge(base, changes)


def _records(run, kind):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_dpo_run_starts_at_ln2_and_learns_the_preference(tmp_path, pretrained_run):
    prefs = tmp_path / "prefs.jsonl"
    _write_pairs(prefs, 24)
    run = tmp_path / "dpo"
    train(config_from_dict(_dpo_config(pretrained_run, prefs, optim={"lr": 1.0e-2})), run)
    steps = _records(run, "train")
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 1
    assert steps[-1]["loss"] < 0.5 * math.log(2)
    assert steps[-1]["rewards/accuracy"] == 1.0 and steps[-1]["rewards/margin"] > 0
    evaluation = _records(run, "eval")[-1]
    assert evaluation["rewards/accuracy"] == 1.0  # held-out pairs
    assert evaluation["val_loss"] < math.log(2)


def test_precomputed_reference_scores_train_like_the_live_reference(tmp_path, pretrained_run):
    prefs = tmp_path / "prefs.jsonl"
    _write_pairs(prefs, 24)
    live, stored = tmp_path / "live", tmp_path / "stored"
    train(config_from_dict(_dpo_config(pretrained_run, prefs, train={"max_steps": 4})), live)
    precomputed = _dpo_config(
        pretrained_run, prefs, train={"max_steps": 4}, dpo={"precompute_reference": True}
    )
    train(config_from_dict(precomputed), stored)
    scores = load_file(stored / REFERENCE_LOGPS_FILE)
    assert scores["train"].shape[1] == 2 and (scores["train"] < 0).all()
    a, b = load_file(live / "final/model.safetensors"), load_file(stored / "final/model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert _records(stored, "train")[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert _records(stored, "eval")[-1]["val_loss"] == pytest.approx(
        _records(live, "eval")[-1]["val_loss"], abs=1e-5
    )


def test_dpo_needs_a_model_to_start_from():
    with pytest.raises(ConfigError, match="stage dpo needs init_from"):
        config_from_dict(tiny_config(None, stage="dpo"))
    with pytest.raises(ConfigError, match="dpo.beta must be > 0"):
        config_from_dict(tiny_config(None, dpo={"beta": 0}))


def test_killed_dpo_resumes_bit_identically(tmp_path, pretrained_run):
    prefs = tmp_path / "prefs.jsonl"
    _write_pairs(prefs, 24)
    data = _dpo_config(pretrained_run, prefs, model={"dropout": 0.1}, **RESUME_SETTINGS)
    config = write_config(tmp_path, data)
    straight = run_cli("train", str(config), "--out", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr
    _kill_and_resume(config, tmp_path / "resumed")
    _assert_identical_runs(tmp_path / "straight", tmp_path / "resumed")


# --- on-policy pairs and the pair viewer ----------------------------------------------------------------


def test_make_preferences_pairs_reference_answers_with_seeded_samples(tmp_path, pretrained_run):
    chats = tmp_path / "chat.jsonl"
    records = [
        {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": "Sì."}]}
        for p in PROMPTS[:4]
    ]
    greeting = [
        {"role": "system", "content": "Sei gentile."},
        {"role": "assistant", "content": "Buongiorno."},
    ]
    records.append({"messages": greeting})  # no user turn before the answer: no prompt to pair
    chats.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    outputs = []
    for name in ("a.jsonl", "b.jsonl"):
        args = ["--model", str(pretrained_run), "--input", str(chats), "--out", str(tmp_path / name)]
        made = run_cli("data", "make-preferences", *args, "--seed", "3", "--max-new-tokens", "8")
        assert made.returncode == 0, made.stderr
        assert "without a user-assistant turn" in made.stdout and "1 without" in made.stdout
        outputs.append((tmp_path / name).read_text(encoding="utf-8"))
    assert outputs[0] == outputs[1]  # seeded
    pairs = list(read_preference_pairs([tmp_path / "a.jsonl"]))
    assert 1 <= len(pairs) <= 4
    for pair in pairs:
        assert pair.chosen == "Sì." and pair.rejected != pair.chosen
        assert pair.prompt[-1]["role"] == "user" and pair.prompt[-1]["content"] in PROMPTS
    shown = run_cli(
        "data", "show-pair", "--tokenizer", str(pretrained_run), "--input", str(tmp_path / "a.jsonl")
    )
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.count("⟦") == 2 and "== chosen:" in shown.stdout and "== rejected:" in shown.stdout
    assert "⟦Sì.<EOS>⟧" in shown.stdout  # the answer and its end marker, nothing of the prompt
