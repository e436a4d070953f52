"""A base model's chat template, seen from the API and the dataset report: can the answers of a
conversation be located (so the loss can see only them), and what exactly will the loss see in one row.

The API does not import transformers (tests/test_layers.py); a template is Jinja run in Jinja's
immutable sandbox, with the few globals Hugging Face templates use, and tokens come from the Rust
`tokenizers` library reading the model's own `tokenizer.json`. The trainer child locates the same spans
with the same code (`app/core/chat_spans.py`) through transformers; where this renderer cannot run a
template, the API says nothing and the child decides.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from app.core.chat_spans import (
    FALLBACK_CHAT_TEMPLATE,
    Render,
    SpansNotFound,
    assistant_spans,
    end_spans_before_markers,
    trained_token_mask,
)

SAMPLE_ROWS = 20  # conversations checked at submit


class _Generation(Extension):
    """`{% generation %}...{% endgeneration %}` (trl's assistant markers) render their body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return str(caller())


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, **_: Any) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent)


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _token_text(value: Any) -> str:
    return str(value.get("content", "")) if isinstance(value, dict) else str(value or "")


def load_renderer(model_dir: Path) -> Render | None:
    """The model's template as a renderer (the trainer's fallback when it has none), or None when this
    is not a local model directory the API can read."""
    config_path = model_dir / "tokenizer_config.json"
    if not config_path.is_file():
        return None
    config = json.loads(config_path.read_text(encoding="utf-8"))
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    jinja_file = model_dir / "chat_template.jinja"
    if not template and jinja_file.is_file():
        template = jinja_file.read_text(encoding="utf-8")
    compiled = _compile(template or FALLBACK_CHAT_TEMPLATE)
    special = {name: _token_text(config.get(name)) for name in ("bos_token", "eos_token", "pad_token", "unk_token")}

    def render(messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **special)

    return render


def find_span_problem(model_dir: Path, conversations: Sequence[list[dict[str, Any]]]) -> str | None:
    """Why the answers of these conversations cannot be located with this model's template, or None.
    A template this renderer cannot run is left to the trainer (None)."""
    render = load_renderer(model_dir)
    if render is None:
        return None
    for number, messages in enumerate(conversations[:SAMPLE_ROWS], start=1):
        try:
            assistant_spans(messages, render)
        except SpansNotFound as exc:
            if isinstance(exc.__cause__, jinja2.exceptions.TemplateSyntaxError | jinja2.exceptions.SecurityError):
                return None  # a template feature this renderer lacks: the trainer, with transformers, decides
            return f"row {number}: {exc}"
    return None


def record_preview(model_dir: Path, record: dict[str, Any], *, train_on_prompt: bool) -> dict[str, Any] | None:
    """What the loss sees of one training record (`to_training_record`), as `workers/training/masks.py` builds
    it: chat rows through the template, prompt/completion rows on the completion and EOS, text on all."""
    if "messages" in record:
        return mask_preview(model_dir, record["messages"], train_on_prompt=train_on_prompt)
    config_path = model_dir / "tokenizer_config.json"
    if not config_path.is_file():
        return None
    eos = _token_text(json.loads(config_path.read_text(encoding="utf-8")).get("eos_token"))
    if "prompt" in record:
        prompt, answer = str(record["prompt"]), str(record["completion"]) + eos
        text = prompt + answer
        spans = [(0, len(text))] if train_on_prompt else [(len(prompt), len(text))]
    else:
        text = str(record["text"]) + eos
        spans = [(0, len(text))]
    return {"rendered": text, "trained_spans": [list(s) for s in spans], "trained_text": [text[a:b] for a, b in spans]}


def mask_preview(model_dir: Path, messages: list[dict[str, Any]], *, train_on_prompt: bool) -> dict[str, Any] | None:
    """One conversation as the trainer will see it: the rendered text, the trained character spans, and
    each token with whether the loss sees it (when the model ships a `tokenizer.json`)."""
    render = load_renderer(model_dir)
    if render is None:
        return None
    try:
        text, spans = assistant_spans(messages, render)
    except SpansNotFound as exc:
        return {"rendered": None, "problem": str(exc)}
    if train_on_prompt:
        spans = [(0, len(text))]
    preview: dict[str, Any] = {"rendered": text}
    tokenizer_file = model_dir / "tokenizer.json"
    if tokenizer_file.is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        encoding = tokenizer.encode(text, add_special_tokens=False)
        # special_tokens_mask marks only what a post-processor adds; markers in the text are added tokens
        special_ids = {i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special}
        spans = end_spans_before_markers(spans, encoding.offsets, [token in special_ids for token in encoding.ids])
        flags = trained_token_mask(encoding.offsets, spans)
        pieces = zip(encoding.offsets, flags, strict=True)
        preview["tokens"] = [{"text": text[start:end], "trained": flag} for (start, end), flag in pieces]
        preview["trained_tokens"] = sum(flags)
    preview["trained_spans"] = [list(span) for span in spans]
    preview["trained_text"] = [text[start:end] for start, end in spans]
    return preview
