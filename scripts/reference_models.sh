#!/usr/bin/env bash
# Train, evaluate and document the reference models (issue 6, part 5):
#   PicoDAC-IT size (4.6M) and LLaMA-style 30M, each pretrained on ELTeC + Wikipedia (held-out documents
#   of shared/data/splits.json left out) and chat fine-tuned on XPersona-it (valid), JILDA, ChatterBot.
# On a quiet 2-core CPU the pretrainings take ~30 and ~35 min, the chat fine-tunings 1.5 and 3.5 min, the
# evaluations ~25 min in all: about 1.5 h for the whole script (measured 2026-11-25; see docs/results.md).
# Reruns resume: finished stages are skipped by the training loop, evaluations redone.
#   scripts/reference_models.sh                    # everything
#   EVAL_LIMIT=200 scripts/reference_models.sh     # quicker evaluation (seeded 200-item samples)
set -euo pipefail
cd "$(dirname "$0")/.."
FUCINA="${FUCINA:-.venv/bin/fucina}"
PYTHON="${PYTHON:-.venv/bin/python}"
ROOT=runs/reference
LIMIT_ARGS=()
if [[ -n "${EVAL_LIMIT:-}" ]]; then LIMIT_ARGS=(--limit "$EVAL_LIMIT"); fi

record_machine() {  # where a stage ran, for docs/results.md
  "$PYTHON" - "$1" <<'PY'
import json, os, platform, sys, torch
device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores ({platform.machine()})"
json.dump({"device": device, "threads": torch.get_num_threads()}, open(sys.argv[1] + "/machine.json", "w"))
PY
}

[[ -f $ROOT/data/wikipedia_train.jsonl ]] || "$FUCINA" study prepare-data --out "$ROOT/data"

for name in picodac-it llama-30m; do
  for stage in pretrain sft; do
    run=$ROOT/$name-$stage
    "$FUCINA" train "configs/reference-$name-$stage.yaml" --out "$run"
    record_machine "$run"
  done
  # Held-out bpb (ELTeC, Wikipedia, XPersona-it test) and the five benchmarks of the pretrained model;
  # held-out bpb (and XPersona-it assistant turns) of the chat model.
  "$FUCINA" eval --model "$ROOT/$name-pretrain" --tasks bpb,italic,exams,xcopa,itacola,fever \
    "${LIMIT_ARGS[@]}" --no-progress --out "$ROOT/$name-pretrain/eval.json"
  "$FUCINA" eval --model "$ROOT/$name-sft" --tasks bpb "${LIMIT_ARGS[@]}" --no-progress \
    --out "$ROOT/$name-sft/eval.json"
  {
    for prompt in "C'era una volta" "La città di Firenze" "Il giorno dopo, Maria"; do
      echo "--- raw, prompt: $prompt"
      "$FUCINA" generate --model "$ROOT/$name-pretrain" --raw "$prompt" --max-new-tokens 60 --seed 0
    done
  } > "$ROOT/$name-pretrain/generations.txt"
  {
    for prompt in "Ciao! Come stai?" "Che lavoro fai?" "Mi consigli un libro da leggere?"; do
      echo "--- chat, user: $prompt"
      "$FUCINA" generate --model "$ROOT/$name-sft" --chat "$prompt" --max-new-tokens 60 --seed 0
    done
  } > "$ROOT/$name-sft/generations.txt"
done

"$FUCINA" study results --reference-dir "$ROOT" --out docs/results.md
