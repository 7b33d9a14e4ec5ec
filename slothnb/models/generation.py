"""Streaming text generation shared by the CLI and the notebook layer.

    for piece in stream(model, tokenizer, "The capital of France is"):
        print(piece, end="")
    stream.last_stats          # GenerationStats(prompt_tokens, new_tokens, seconds, ...)
    text = generate(model, tokenizer, "Hi!", max_new_tokens=64)

``model.generate`` runs in a worker thread (so every generation option and cache type of
transformers works) and hands token ids to the caller through a queue. Text is decoded from the
whole generated sequence each step and only the new suffix is yielded, so multi-byte characters
and tokenizer clean-ups come out right; a tail that may be the start of a stop string is held
back until it is known not to be one.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass

import torch

from slothnb.errors import ConfigError


@dataclass
class GenerationStats:
    prompt_tokens: int
    new_tokens: int
    seconds: float
    first_token_seconds: float | None
    stop_reason: str  # "eos" | "length" | "stop" | "interrupted"

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        return (f"{self.new_tokens} tokens in {self.seconds:.2f} s ({self.tokens_per_second:.1f} tok/s), "
                f"prompt {self.prompt_tokens} tokens, stopped by {self.stop_reason}")


def build_prompt_ids(tokenizer, prompt, chat=None, system=None) -> torch.Tensor:
    """Token ids ``[1, S]`` for a prompt: a string, or a list of ``{"role", "content"}`` messages.

    ``chat=None`` applies the chat template when the tokenizer has one (always for message lists).
    """
    if isinstance(prompt, (list, tuple)):
        if chat is False:
            raise ConfigError("a list of messages needs the chat template: pass chat=None or True, or a string.")
        messages, chat = list(prompt), True
    elif isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
        if chat is None:
            chat = bool(getattr(tokenizer, "chat_template", None))
    else:
        raise ConfigError(f"prompt must be a string or a list of chat messages, got {type(prompt).__name__}.")
    if not chat:
        if system:
            raise ConfigError("system= needs the chat template (chat=True).")
        return tokenizer(prompt, return_tensors="pt")["input_ids"]
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("this tokenizer has no chat template: pass chat=False to generate from raw text.")
    if system:
        messages = [{"role": "system", "content": system}] + [m for m in messages if m.get("role") != "system"]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token
    # The template may already write BOS; never let the tokenizer add a second one.
    add_special = not (bos and text.startswith(bos))
    return tokenizer(text, return_tensors="pt", add_special_tokens=add_special)["input_ids"]


class _QueueStreamer:
    """The streamer protocol of ``model.generate``: the first ``put`` is the prompt, then one per step."""

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()
        self._prompt_seen = False

    def put(self, value):
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.queue.put(("ids", value.reshape(-1).tolist()))

    def end(self):
        self.queue.put(("end", None))


def _stop_flag_criteria(flag: threading.Event):
    from transformers import StoppingCriteria

    class _Flag(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), flag.is_set(), dtype=torch.bool, device=input_ids.device)

    return _Flag()


def _holdback(text: str, stops: list[str]) -> int:
    """Length of the longest tail of ``text`` that could begin a stop string."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if s.startswith(text[-n:]):
                longest = n
                break
    return longest


def _eos_ids(model, tokenizer) -> list[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _model_device(model) -> torch.device:
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


def stream(model, tokenizer, prompt, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
           chat=None, system=None, stop=None, **gen_kw):
    """Yield the generated text piece by piece; the stats are returned and kept in ``stream.last_stats``.

    ``temperature=0`` is greedy; ``stop`` is a string or list of strings that end the text (not included).
    Extra keywords go to ``model.generate`` (``repetition_penalty``, ``top_k``...).
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ConfigError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {temperature}.")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}.")
    stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
    input_ids = build_prompt_ids(tokenizer, prompt, chat=chat, system=system).to(_model_device(model))
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_ids[0] if eos_ids else None)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else \
        dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    streamer, flag = _QueueStreamer(), threading.Event()
    from transformers import StoppingCriteriaList

    kwargs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                  streamer=streamer, eos_token_id=eos_ids or None, pad_token_id=pad_id, use_cache=True,
                  stopping_criteria=StoppingCriteriaList([_stop_flag_criteria(flag)]), **sampling)
    kwargs.update(gen_kw)

    def work():
        try:
            model.generate(**kwargs)
        except BaseException as error:  # surfaced in the caller's thread
            streamer.queue.put(("error", error))
            streamer.end()

    was_training = model.training
    model.eval()
    start = time.perf_counter()
    worker = threading.Thread(target=work, name="slothnb-generate", daemon=True)
    worker.start()
    ids: list[int] = []
    emitted, first, reason = "", None, "interrupted"
    try:
        while True:
            kind, value = streamer.queue.get()
            if kind == "error":
                raise value
            if kind == "end":
                if reason != "stop":
                    reason = "eos" if ids and ids[-1] in eos_ids else ("length" if len(ids) >= max_new_tokens else reason)
                text = tokenizer.decode(ids, skip_special_tokens=True)
                if text.startswith(emitted) and len(text) > len(emitted) and reason != "stop":
                    yield text[len(emitted):]
                    emitted = text
                break
            if flag.is_set():
                continue  # stop string seen: drain what generate still produces
            ids.extend(value)
            first = first if first is not None else time.perf_counter() - start
            text = tokenizer.decode(ids, skip_special_tokens=True)
            cut = min((text.find(s) for s in stops if s in text), default=-1)
            if cut >= 0:
                text, reason = text[:cut], "stop"
                flag.set()
            elif text.endswith("\ufffd"):
                continue  # half of a multi-byte character
            else:
                text = text[: len(text) - _holdback(text, stops)]
            if text.startswith(emitted) and len(text) > len(emitted):
                yield text[len(emitted):]
                emitted = text
    finally:
        flag.set()
        worker.join()
        if was_training:
            model.train()
    stats = GenerationStats(prompt_tokens=input_ids.shape[1], new_tokens=len(ids),
                            seconds=time.perf_counter() - start, first_token_seconds=first, stop_reason=reason)
    stream.last_stats = stats
    return stats


stream.last_stats = None


def generate(model, tokenizer, prompt, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
             chat=None, system=None, stop=None, **gen_kw) -> str:
    """The whole generated text (``stream`` joined); stats in ``stream.last_stats``."""
    return "".join(stream(model, tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                          top_p=top_p, chat=chat, system=system, stop=stop, **gen_kw))
