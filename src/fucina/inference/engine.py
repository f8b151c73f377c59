"""The decoding engine: a fixed number of cache rows that requests join and leave (continuous batching).

Design choices:
- One cache of `max_batch` rows and `max_length` slots, allocated once. Each row holds one request's
  sequence at its own length (model/cache.py), so a request joins a running batch as soon as a row is
  free and leaves it the moment it finishes, without waiting for the others.
- A joining prompt is prefilled alone (batch 1, its own small cache) and its keys/values, latents or
  state-space state are copied into its row (each layer cache's `copy_row`); then it decodes beside the
  others, one token per step. Every mixer (attention, latent attention, Mamba) supports this.
- `add(prompt, sampling)` queues a request and returns its id; `step()` admits queued requests into
  free rows, reports one event per running request (its next token, and why it finished, if it did)
  and runs one batched forward for the requests still running. A request ends on a stop token (not
  output: the event's token is None), when its `max_new_tokens` are out ("length") or when its
  sequence fills the context or the cache ("context").
- Each request samples with its own SamplingConfig and its own torch.Generator seeded with its seed:
  a seeded request yields the same tokens alone or beside others.
- When every running row holds the same length the cache is told so (one common `length`): eager steps
  then slice the filled prefix and attend without a mask, the fast path at batch 1. Rows of different
  lengths use per-row lengths and a mask over every slot.
- Decoding runs the model's decoding view (inference/cpu_kernels.py: packed weights, one-query
  attention kernels), never the model itself, under torch.inference_mode.
- `compile=True` runs each step through torch.compile: the shapes never change (every row, every slot,
  per-row lengths as a tensor), so one compilation serves the whole run. With several rows, a step
  attends only a window of the cache's first slots (the filled ones rounded up to a power of two, from
  max(64, max_length / 64)): attending all of a server's slots would read more keys and values per
  step than the weights of a small model. Each window compiles once (at most 7); at one row the
  cache is a small part of what a step reads, so the whole cache stays one compilation. Prompts are
  still prefilled eagerly. At batch 1 a small model's step is a few hundred tiny kernels whose
  dispatch costs more than their arithmetic; compiled, they fuse into a few dozen, and on CPU the
  one-row products and the one-query attention become inductor's own loops (cpu_kernels.py).
  Compiling takes tens of seconds once per process and shape (inductor's disk cache shortens later
  runs), so it pays off for long generations, chat sessions and servers; a model with a mixer that
  cannot decode at fixed shapes (Mamba) decodes eagerly, with a warning.
- The host learns each step's tokens (it must, to report them), one synchronisation per step.
- `add(..., logprobs=k)` asks for the log-probability of each reported token under the model's own
  distribution (before penalties, temperature and filters, as OpenAI's API reports them) and the `k`
  most likely alternatives; requests that do not ask pay nothing. `cancel(id)` drops a request, waiting
  or running, so its row is free at the next step (a server's client that went away).
"""

from __future__ import annotations

import itertools
import logging
import types
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fucina.errors import FucinaError
from fucina.inference.cpu_kernels import DecodingView, decoding_view
from fucina.inference.sampling import SamplingConfig, choose_next_tokens
from fucina.model.transformer import Transformer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepEvent:
    """What one step did for one request: its new token (None when it stopped on a stop token)."""

    request_id: int
    token: int | None
    finished: str | None = None  # None while running; "stop", "length" or "context" once done
    logprob: float | None = None  # log-probability of `token`, when the request asked for logprobs
    top_logprobs: tuple[tuple[int, float], ...] = ()  # the most likely (token, logprob) at this step


@dataclass
class _Request:
    id: int
    prompt: list[int]
    sampling: SamplingConfig
    budget: int  # tokens it may produce: max_new_tokens, or fewer where the context ends first
    generator: torch.Generator | None = None
    seen: torch.Tensor | None = None  # (1, vocab) tokens so far, for the repetition penalty
    produced: int = 0
    next_token: int | None = None  # sampled, not yet reported
    row: int = -1
    stop_ids: frozenset[int] = field(default_factory=frozenset)
    logprobs: int | None = None  # None: no logprobs; k: the token's and the top k alternatives'
    next_logprobs: tuple[float | None, tuple[tuple[int, float], ...]] = (None, ())


# Without size_asserts the compiled wrapper no longer checks the sizes and strides of its inputs (every
# weight) on each call, which dynamo's guards have already checked: at batch 1 a small model's step is
# short enough for those checks to count (docs/quantize.md).
COMPILE_OPTIONS = {"size_asserts": False}


def compiled_forward(view: DecodingView, model: Transformer) -> Callable | None:
    """torch.compile of the view's forward for fixed-shape steps (one per model, reused).

    None, with a warning, when a mixer cannot decode at fixed shapes.
    """
    unsupported = sorted(
        {type(b.mixer).__name__ for b in model.blocks if not getattr(b.mixer, "fixed_shape_decoding", False)}
    )
    if unsupported:
        log.warning("compiled decoding does not support %s layers: decoding eagerly", ", ".join(unsupported))
        return None
    if view.compiled_forward is None:
        view.compiled_forward = torch.compile(
            forward_of_its_own(view.module), dynamic=False, options=COMPILE_OPTIONS
        )
    return view.compiled_forward


_view_numbers = itertools.count()


def forward_of_its_own(module: torch.nn.Module) -> Callable:
    """`module.forward` bound through a copy of its code object, so its compilations are its own.

    Dynamo keeps compiled versions per code object, at most `recompile_limit` (8) of them, and every
    model shares its class's `forward`: a process that decoded a few models or batch sizes (a benchmark,
    a server swapping models) would, from the ninth, silently run the compiled step eagerly (at fixed
    shapes, slower than plain eager decoding). A copy per decoding view gives each model its own eight,
    and they go away with the view.
    """
    function = type(module).forward
    code = function.__code__.replace(co_name=f"{function.__name__}_decoding_{next(_view_numbers)}")
    copy = types.FunctionType(
        code, function.__globals__, code.co_name, function.__defaults__, function.__closure__
    )
    copy.__kwdefaults__ = function.__kwdefaults__
    return types.MethodType(copy, module)


def check_prompt(model: Transformer, prompt: list[int], limit: int, name: str = "the prompt") -> None:
    """Raise FucinaError unless `prompt` is 1..limit tokens of the model's vocabulary."""
    vocab, context = model.config.vocab_size, model.config.context_length
    if len(prompt) == 0:
        raise FucinaError(f"{name} is empty: give at least one token (e.g. BOS)")
    if len(prompt) > limit:
        cache = "" if limit >= context else f" and the cache holds {limit}"
        raise FucinaError(f"{name} has {len(prompt)} tokens but the model's context is {context}{cache}")
    if min(prompt) < 0 or max(prompt) >= vocab:
        raise FucinaError(f"{name} holds token ids outside the model's vocabulary 0..{vocab - 1}")


class Engine:
    """Continuous batching over one model: `max_batch` rows of `max_length` cache slots."""

    def __init__(
        self, model: Transformer, max_batch: int = 1, max_length: int | None = None, compile: bool = False
    ):
        if max_batch < 1:
            raise FucinaError(f"the engine needs at least one row, got max_batch={max_batch}")
        self.model = model
        self.view = decoding_view(model)
        self.context = model.config.context_length
        self.max_length = self.context if max_length is None else max_length
        step = compiled_forward(self.view, model) if compile else None
        self.fixed_shapes = step is not None  # per-row lengths always: the compiled step never reshapes
        self.forward = step if step is not None else self.view.module
        # Compiled steps of several rows attend a window of the cache's first slots, not all of them.
        self.smallest_window = max(64, self.max_length >> 6) if step is not None and max_batch > 1 else None
        self.device = model.token_embedding.weight.device
        with torch.inference_mode():
            self.cache = model.new_cache(max_batch, max_length=self.max_length)
        self.rows: list[_Request | None] = [None] * max_batch
        self.lengths = [0] * max_batch  # filled slots per row, as the host knows them
        self.waiting: deque[_Request] = deque()
        self.ids = itertools.count()
        self.layout_changed = True  # a row joined or left since the cache was last told the lengths

    def add(self, prompt: list[int], sampling: SamplingConfig, logprobs: int | None = None) -> int:
        """Queue a request; it joins the batch at the next step with a free row. Returns its id.

        `logprobs`: report each token's log-probability and the `logprobs` most likely alternatives.
        """
        check_prompt(self.model, prompt, min(self.context, self.max_length))
        # Its sequence must fit the context, and every token but the last must fit the cache.
        room = min(self.context - len(prompt), self.max_length - len(prompt) + 1)
        request = _Request(
            id=next(self.ids),
            prompt=list(prompt),
            sampling=sampling,
            budget=min(sampling.max_new_tokens, room),
            stop_ids=frozenset(sampling.stop_token_ids),
            logprobs=logprobs,
        )
        if sampling.seed is not None:
            request.generator = torch.Generator(device=self.device).manual_seed(sampling.seed)
        self.waiting.append(request)
        return request.id

    def cancel(self, request_id: int) -> bool:
        """Drop a waiting or running request (no further events); whether it was found."""
        for request in self.waiting:
            if request.id == request_id:
                self.waiting.remove(request)
                return True
        for request in self.rows:
            if request is not None and request.id == request_id:
                self._free(request)
                return True
        return False

    @property
    def running(self) -> int:
        """How many rows hold a request."""
        return sum(r is not None for r in self.rows)

    @property
    def idle(self) -> bool:
        """Whether no request is running or waiting."""
        return not self.waiting and all(r is None for r in self.rows)

    def step(self) -> list[StepEvent]:
        """Admit waiting requests, report one event per running request, decode one token for each."""
        with torch.inference_mode():
            self._admit()
            events = []
            feeding = []
            for request in self.rows:
                if request is None:
                    continue
                event = self._report(request)
                events.append(event)
                if event.finished is None:
                    feeding.append(request)
                else:
                    self._free(request)
            if feeding:
                self._decode(feeding)
        return events

    def _admit(self) -> None:
        """Prefill waiting requests alone and copy their caches into free rows."""
        if self.waiting and None in self.rows:
            self.view.refresh()  # a long-lived engine decodes weights changed since it was made
        for row, occupant in enumerate(self.rows):
            if not self.waiting:
                return
            if occupant is not None:
                continue
            request = self.waiting.popleft()
            request.row = row
            self.rows[row] = request
            if request.budget == 0:
                continue  # nothing to produce: reported finished at once
            ids = torch.tensor([request.prompt], dtype=torch.long, device=self.device)
            if request.sampling.repetition_penalty != 1.0:
                request.seen = torch.zeros(
                    (1, self.model.config.vocab_size), dtype=torch.bool, device=self.device
                )
                request.seen[0, ids[0]] = True
            prefill = self.model.new_cache(1, max_length=len(request.prompt))
            logits = self.view.module(ids, prefill, last_only=True)[:, -1]  # (1, vocab)
            for layer, source in zip(self.cache.layers, prefill.layers):
                layer.copy_row(row, source, len(request.prompt))
            self.lengths[row] = len(request.prompt)
            self.layout_changed = True
            request.next_token = self._sample(request, logits)
            if request.logprobs is not None:
                self._note_logprobs(request, logits)

    def _report(self, request: _Request) -> StepEvent:
        """The event for the token `request` sampled last; counts it against its budget."""
        if request.budget == 0:
            return StepEvent(request.id, None, "length")
        token = request.next_token
        if token in request.stop_ids:
            return StepEvent(request.id, None, "stop")
        request.produced += 1
        logprob, top = request.next_logprobs
        reason = None
        if request.produced == request.budget:
            reason = "length" if request.produced == request.sampling.max_new_tokens else "context"
        return StepEvent(request.id, token, reason, logprob, top)

    def _free(self, request: _Request) -> None:
        self.rows[request.row] = None
        self.lengths[request.row] = 0
        self.layout_changed = True

    def _decode(self, feeding: list[_Request]) -> None:
        """One forward over the rows up to the last busy one (free rows below it compute on a dummy
        token; compiled steps take every row, to keep one shape), then sample per request."""
        if self.layout_changed:
            self._tell_cache_the_lengths()
        top = len(self.rows) if self.fixed_shapes else 1 + max(r.row for r in feeding)
        tokens = [0] * top
        for request in feeding:
            tokens[request.row] = request.next_token
            self.lengths[request.row] += 1
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device).unsqueeze(1)  # (top, 1)
        cache = self.cache if top == len(self.rows) else self.cache.first_rows(top)
        if self.smallest_window is not None:
            cache = cache.first_slots(self._window())
        logits = self.forward(ids, cache, last_only=True)[:, -1]  # (top, vocab)
        if cache is not self.cache and cache.length is not None:
            self.cache.length = cache.length  # a common length is a number: copy it back
        if all(r.sampling.is_greedy and r.sampling.repetition_penalty == 1.0 for r in feeding):
            chosen = logits.argmax(dim=-1).tolist()  # one call for the whole batch
            for request in feeding:
                request.next_token = chosen[request.row]
        else:
            for request in feeding:
                request.next_token = self._sample(request, logits[request.row : request.row + 1])
        for request in feeding:
            if request.logprobs is not None:  # most requests never ask: no per-row slicing for them
                self._note_logprobs(request, logits[request.row : request.row + 1])

    def _window(self) -> int:
        """The slots a compiled step attends: the filled ones rounded up to a power of two times the
        smallest window, at most max_length. Each window is one more compilation (at most 7 of them)."""
        window, needed = self.smallest_window, max(self.lengths)
        while window < needed:
            window *= 2
        return min(window, self.max_length)

    def _tell_cache_the_lengths(self) -> None:
        """One common length when the running rows agree (eager only), else per-row lengths."""
        running = [r.row for r in self.rows if r is not None]
        common = {self.lengths[row] for row in running}
        if not self.fixed_shapes and len(common) == 1:
            self.cache.length = common.pop()
        else:
            in_use = [0] * len(self.rows)
            for row in running:
                in_use[row] = 1
            self.cache.set_lengths(
                torch.tensor(self.lengths, device=self.device), torch.tensor(in_use, device=self.device)
            )
        self.layout_changed = False

    def _note_logprobs(self, request: _Request, logits: torch.Tensor) -> None:
        """Keep the log-probability of the token just chosen and the top alternatives."""
        logprobs = logits[0].float().log_softmax(dim=-1)  # (vocab,)
        top = logprobs.topk(request.logprobs) if request.logprobs > 0 else None
        pairs = () if top is None else tuple(zip(top.indices.tolist(), top.values.tolist()))
        request.next_logprobs = (float(logprobs[request.next_token]), pairs)

    def _sample(self, request: _Request, logits: torch.Tensor) -> int:
        token = choose_next_tokens(logits, request.sampling, request.seen, request.generator)
        if request.seen is not None:
            request.seen[0, token] = True
        return int(token[0])
