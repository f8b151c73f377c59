"""From task items to scored questions: the context string and one continuation string per choice.

Design choices, and why:
- A question is scored the way lm-evaluation-harness scores multiple choice: the context is the
  rendered `prompt` (after any few-shot examples), each continuation is `choice_template` rendered with
  `choice` set to one choice text, and the model's log-likelihood of each continuation given the
  context decides.
- A few-shot example is the same prompt followed by its right continuation, so examples and question
  read alike. Examples are joined by `fewshot_separator` and precede the question after the same
  separator; the task's `preamble` opens the context.
- Few-shot examples are drawn per item with a generator seeded by (seed, task, item file, item line):
  an item gets the same examples whatever `--limit` sample it is in. The evaluated item is never among
  its own examples: the same record (file and line) and any record rendering to the same prompt are
  excluded.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any

from fucina.errors import ConfigError
from fucina.evaluate.task_config import TaskItem, TaskSpec, compile_template, render

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Question:
    """One item ready for scoring: a shared context and one continuation per choice."""

    item: TaskItem
    context: str
    continuations: tuple[str, ...]
    answer: int
    group: str | None
    shots: int


class PromptRenderer:
    """The compiled templates of one task."""

    def __init__(self, spec: TaskSpec):
        self.spec = spec
        self._prompt = compile_template(spec.prompt, f"{spec.source}: key 'prompt'")
        self._choice = compile_template(spec.choice_template, f"{spec.source}: key 'choice_template'")
        self._preamble = compile_template(spec.preamble, f"{spec.source}: key 'preamble'")

    def prompt(self, item: TaskItem) -> str:
        return render(self._prompt, item.record, f"key 'prompt' of {self.spec.source}", item.path, item.line)

    def continuation(self, item: TaskItem, index: int) -> str:
        variables: dict[str, Any] = {**item.record, "choice": item.choices[index], "choice_index": index}
        where = f"key 'choice_template' of {self.spec.source}"
        return render(self._choice, variables, where, item.path, item.line)

    def preamble(self, item: TaskItem) -> str:
        return render(
            self._preamble, item.record, f"key 'preamble' of {self.spec.source}", item.path, item.line
        )

    def example(self, item: TaskItem) -> str:
        """A solved example: the prompt followed by the right continuation."""
        return self.prompt(item) + self.continuation(item, item.answer)


def _identity(item: TaskItem) -> tuple[str, int]:
    return str(item.path.resolve()), item.line


def _draw_examples(
    rng: random.Random, keys: list[tuple[tuple[str, int], str]], own: tuple[tuple[str, int], str], shots: int
) -> list[int]:
    """Indices of `shots` pool items, in the order drawn, none with the item's identity or prompt.

    `keys[i]` is ((file, line), rendered prompt) of pool item i; `own` the same for the evaluated item.
    """

    def allowed(index: int) -> bool:
        return keys[index][0] != own[0] and keys[index][1] != own[1]

    drawn = [i for i in rng.sample(range(len(keys)), min(len(keys), shots + 4)) if allowed(i)]
    if len(drawn) < shots:  # many near-duplicates in a small pool: look at all of it
        candidates = [i for i in range(len(keys)) if allowed(i)]
        drawn = rng.sample(candidates, min(shots, len(candidates)))
    return drawn[:shots]


def build_questions(
    spec: TaskSpec, items: list[TaskItem], pool: list[TaskItem], shots: int = 0, seed: int = 0
) -> list[Question]:
    """Render every item of a task into a Question with `shots` few-shot examples drawn from `pool`."""
    if shots < 0:
        raise ConfigError(f"shots must be >= 0, got {shots}")
    renderer = PromptRenderer(spec)
    pool_keys = [(_identity(example), renderer.prompt(example)) for example in pool] if shots else []
    pool_examples: dict[int, str] = {}
    separator = spec.fewshot_separator
    questions, short = [], 0
    for item in items:
        prompt = renderer.prompt(item)
        parts = []
        if shots:
            rng = random.Random(f"{seed}:{spec.name}:{item.path.name}:{item.line}")
            chosen = _draw_examples(rng, pool_keys, (_identity(item), prompt), shots)
            short += len(chosen) < shots
            for index in chosen:
                if index not in pool_examples:
                    pool_examples[index] = renderer.example(pool[index])
                parts.append(pool_examples[index])
        parts.append(prompt)
        context = renderer.preamble(item) + separator.join(parts)
        continuations = tuple(renderer.continuation(item, i) for i in range(len(item.choices)))
        group = str(item.record.get(spec.group_by, "n/a")) if spec.group_by else None
        questions.append(Question(item, context, continuations, item.answer, group, len(parts) - 1))
    if short:
        logger.warning(
            "%s: %d item(s) got fewer than %d few-shot examples (the pool has %d)",
            spec.name,
            short,
            shots,
            len(pool),
        )
    return questions
