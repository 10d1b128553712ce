"""Formats: one record -> an ``Example``, the text split into trained and untrained segments.

The format of each record is detected from its keys (``detect_format``) and counted in the dataset stats:

- chat: ``messages: [{role, content}, ...]``; see "Chat" below
- sharegpt: ``conversations: [{from, value}, ...]``; as chat (human -> user, gpt -> assistant)
- prompt_response: ``prompt`` + ``response`` (or ``completion``); used verbatim
- alpaca: ``instruction`` [+ ``input``] + ``output``; prompt ``ALPACA_PROMPT`` (``ALPACA_PROMPT_NO_INPUT``
  when the input is empty, the Stanford Alpaca templates), response ``output``
- dolly: ``instruction`` [+ ``context``] + ``response``; as Alpaca with the context as input
- gsm8k: ``question`` + ``answer``; prompt ``GSM8K_PROMPT`` ("Question: {q}\\nAnswer:"), response the answer
  verbatim (calculator notes ``<<...>>`` and the final ``#### N`` line kept)

Chat templates (``chat_template``, one of ``CHAT_TEMPLATE_MODES``)
    ``"auto"`` (default): the tokenizer's chat template when it has one, for every format; a single-turn
    record becomes a user turn (its prompt, as above) and an assistant turn (its response). ``"true"``: the
    same, and a tokenizer without a template is an error. ``"false"``: never; single-turn records as above,
    conversations in the plain form below. ``True`` / ``False`` are accepted for ``"true"`` / ``"false"``.

Chat
    Rendered by the template, every assistant turn (the text the template adds for it, end-of-turn marker
    included) is trained on, everything else is masked. Turns are found by rendering growing prefixes; a
    template that does not render prefixes as prefixes of the whole falls back to training the final
    assistant turn only. Without a template a plain form is used (``PLAIN_ROLES``): segments
    ``"System: ...\\nUser: ...\\nAssistant:"`` | ``reply`` | ``"\\nUser: ...\\nAssistant:"`` | ``reply`` ...,
    loss on the replies (and eos after the last); SentencePiece's dummy prefix makes the separately encoded
    reply read as "Assistant: reply". Messages after the last assistant turn are dropped (there is nothing
    to learn from them).
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import DataError

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
GSM8K_PROMPT = "Question: {question}\nAnswer:"
PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                   "assistant": "assistant", "bot": "assistant", "model": "assistant"}
FORMATS = ("chat", "sharegpt", "prompt_response", "alpaca", "dolly", "gsm8k")
CHAT_TEMPLATE_MODES = ("auto", "true", "false")
_FORMAT_HELP = ("expected one of: messages (chat), conversations (ShareGPT), prompt + response/completion, "
                "instruction + output (Alpaca), instruction + response (Dolly), question + answer (GSM8K)")


@dataclass(frozen=True)
class Example:
    """One training example. ``segments`` is the whole text as ``(text, trainable)`` pieces in order; for
    single-turn formats it is ``((prompt, False), (response, True))``. ``prompt`` is everything before the
    final trainable piece and ``response`` that piece, so an evaluator can generate from ``prompt``."""
    prompt: str
    response: str
    fmt: str = "prompt_response"
    segments: tuple[tuple[str, bool], ...] | None = None
    from_template: bool = False  # segments rendered by the tokenizer's chat template

    def as_segments(self) -> tuple[tuple[str, bool], ...]:
        return self.segments if self.segments is not None else ((self.prompt, False), (self.response, True))


def detect_format(record: dict) -> str | None:
    """The record format (one of ``FORMATS``) from its keys, or None when unrecognised."""
    if "messages" in record:
        return "chat"
    if "conversations" in record:
        return "sharegpt"
    if "prompt" in record and ("response" in record or "completion" in record):
        return "prompt_response"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "instruction" in record and "response" in record:
        return "dolly"
    if "question" in record and "answer" in record:
        return "gsm8k"
    return None


def uses_chat_template(tokenizer, chat_template: str | bool = "auto") -> bool:
    """Whether examples are rendered by ``tokenizer``'s chat template in mode ``chat_template`` (see the
    module docstring); ``"true"`` with a tokenizer that has none is a ``DataError``."""
    mode = ("true" if chat_template else "false") if isinstance(chat_template, bool) else chat_template
    if mode not in CHAT_TEMPLATE_MODES:
        raise DataError(f"data.chat_template={chat_template!r} is not one of {', '.join(CHAT_TEMPLATE_MODES)}; "
                        "use auto (the tokenizer's template when it has one), true (require it) or false (never)")
    if mode == "false":
        return False
    has = tokenizer is not None and _has_template(tokenizer)
    if mode == "true" and not has:
        name = getattr(tokenizer, "name", None) or "none given"
        raise DataError(f"data.chat_template=true but the tokenizer ({name}) has no chat template; set "
                        "data.chat_template=false (or auto) for plain prompts, or use a tokenizer that has one "
                        "(data.tokenizer=... pointing at an HF tokenizer dir with a chat_template)")
    return has


def to_example(record: dict, tokenizer=None, *, where: str = "record", chat_template: str | bool = "auto") -> Example:
    """Convert one record to an ``Example``. ``tokenizer`` is needed only for chat templates, which
    ``chat_template`` turns on or off (see the module docstring)."""
    fmt = detect_format(record)
    if fmt is None:
        raise DataError(f"{where}: cannot tell the record format from its keys {sorted(record)}; {_FORMAT_HELP}. "
                        "Rename the fields or convert the file")
    templated = uses_chat_template(tokenizer, chat_template)
    if fmt in ("chat", "sharegpt"):
        messages = _messages(record, fmt, where)
    else:
        prompt, response = _single_turn(record, fmt, where)
        if not templated:
            return Example(prompt, response, fmt)
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    messages = messages[:last + 1]
    segments = _template_segments(messages, tokenizer, where) if templated else _plain_segments(messages)
    prompt = "".join(t for t, _ in segments[:-1])
    return Example(prompt, segments[-1][0], fmt, tuple(segments), from_template=templated)


def _text(record: dict, key: str, where: str, optional: bool = False) -> str:
    value = record.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}; fix the record")
    return value


def _alpaca_prompt(instruction: str, extra: str) -> str:
    if extra.strip():
        return ALPACA_PROMPT.format(instruction=instruction, input=extra)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def _single_turn(record: dict, fmt: str, where: str) -> tuple[str, str]:
    if fmt == "prompt_response":
        response_key = "response" if "response" in record else "completion"
        return _text(record, "prompt", where), _text(record, response_key, where)
    if fmt == "alpaca":
        prompt = _alpaca_prompt(_text(record, "instruction", where), _text(record, "input", where, optional=True))
        return prompt, _text(record, "output", where)
    if fmt == "dolly":
        prompt = _alpaca_prompt(_text(record, "instruction", where), _text(record, "context", where, optional=True))
        return prompt, _text(record, "response", where)
    return GSM8K_PROMPT.format(question=_text(record, "question", where)), _text(record, "answer", where)


def _messages(record: dict, fmt: str, where: str) -> list[dict]:
    if fmt == "chat":
        key, role_key, content_key = "messages", "role", "content"
    else:
        key, role_key, content_key = "conversations", "from", "value"
    raw = record[key]
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{where}: {key!r} must be a non-empty list of turns")
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or not isinstance(m.get(content_key), str):
            raise DataError(f"{where}: {key}[{i}] must be an object with a string {content_key!r}")
        role = _SHAREGPT_ROLES.get(str(m.get(role_key)).lower())
        if role is None:
            raise DataError(f"{where}: {key}[{i}] has {role_key}={m.get(role_key)!r}; use system, user or assistant")
        messages.append({"role": role, "content": m[content_key]})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant turn, so nothing to train on; "
                        "drop the record or add the reply")
    return messages


def _has_template(tokenizer) -> bool:
    known = getattr(tokenizer, "has_chat_template", None)
    if known is not None:
        return bool(known)
    return tokenizer.apply_chat_template([{"role": "user", "content": "x"}]) is not None


def _plain_segments(messages: list[dict]) -> list[tuple[str, bool]]:
    segments, pending = [], ""
    for m in messages:
        if m["role"] == "assistant":
            segments += [(pending + PLAIN_ROLES["assistant"] + ":", False), (m["content"], True)]
            pending = "\n"
        else:
            pending += f"{PLAIN_ROLES[m['role']]}: {m['content']}\n"
    return segments


def _template_segments(messages: list[dict], tokenizer, where: str) -> list[tuple[str, bool]]:
    def render(msgs, gen):
        try:
            return tokenizer.apply_chat_template(msgs, add_generation_prompt=gen)
        except Exception as e:  # templates raise on role orders they do not support
            raise DataError(f"{where}: the chat template of {tokenizer.name} rejected this conversation: {e}") from None

    segments, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        with_prompt = render(messages[:i], True) if i else ""
        full = render(messages[:i + 1], False)
        if not (with_prompt.startswith(done) and full.startswith(with_prompt)):
            break
        segments += [(with_prompt[len(done):], False), (full[len(with_prompt):], True)]
        done = full
    else:
        return _without_bos(segments, tokenizer)
    # Prefix rendering is not stable for this template: train on the final reply only.
    prompt = render(messages[:-1], True)
    full = render(messages, False)
    if not full.startswith(prompt):
        raise DataError(f"{where}: the chat template of {tokenizer.name} does not render the conversation as "
                        "prompt + reply, so the reply cannot be located; set data.chat_template=false")
    return _without_bos([(prompt, False), (full[len(prompt):], True)], tokenizer)


def _without_bos(segments: list[tuple[str, bool]], tokenizer) -> list[tuple[str, bool]]:
    """A template's leading bos text removed: ``tokenize_example`` adds the bos id itself."""
    bos = getattr(tokenizer, "bos_token", None)
    if bos and segments[0][0].startswith(bos):
        segments[0] = (segments[0][0][len(bos):], segments[0][1])
    return segments
