"""Row templates: a format string with named placeholders whose last one is the answer."""
from __future__ import annotations

import json
import string
from typing import Any, Optional, Sequence

from ..errors import DataError
from ..text import lone_surrogate

DEFAULT_TEMPLATE = "Вопрос: {question}\n### Ответ: {answer}"


class BadRow(Exception):
    """A row that cannot be used; `reason` is the key it is counted under in meta["skipped"]."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Template:
    """A format string with named placeholders; the last one is the answer and ends the template.

    `fields` maps placeholders to row keys: entries `name` or `name=row_key` (default: each placeholder
    reads the row key of the same name), so other datasets work without changing the template.
    """

    def __init__(self, text: str, fields: Optional[Sequence[str]] = None):
        self.text = text
        self._parsed = _parse(text)
        self.placeholders = [name for _, name, _, _ in self._parsed if name is not None]
        if not self.placeholders or self._parsed[-1][1] is None:
            raise DataError(f"template {text!r} must end with the answer placeholder (e.g. "
                            "'... {answer}'), so that generation stops where the answer ends.")
        self.answer_field = self.placeholders[-1]
        if self.placeholders.count(self.answer_field) > 1:
            raise DataError(f"template {text!r} uses the answer placeholder {{{self.answer_field}}} "
                            "twice; use it once, at the end.")
        self.keys = _field_keys(list(dict.fromkeys(self.placeholders)), fields)

    def values(self, row: Any) -> dict[str, str]:
        """The placeholder values of a source row, or BadRow naming the first problem."""
        if not isinstance(row, dict):
            raise BadRow("not_an_object")
        out = {}
        for name, key in self.keys.items():
            v = row.get(key)
            if v is None:
                raise BadRow(f"missing_field({key})")
            if not isinstance(v, str):
                raise BadRow(f"non_string_field({key})")
            if not v.strip():
                raise BadRow(f"empty_field({key})")
            if lone_surrogate(v) is not None:  # JSON's "\ud800": no tokenizer can encode it
                raise BadRow(f"invalid_unicode({key})")
            out[name] = v
        return out

    def prompt(self, values: dict[str, str]) -> str:
        """Everything before the answer, e.g. "Вопрос: ...\\n### Ответ: "."""
        parts = []
        for literal, name, _, _ in self._parsed:
            parts.append(literal)
            if name is not None and name != self.answer_field:
                parts.append(values[name])
        return "".join(parts)


def _parse(text: str) -> list:
    """string.Formatter's parse of the template, refusing anything but plain named fields."""
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as e:
        raise DataError(f"template {text!r} is not a valid format string ({e}); write literal "
                        "braces as {{ and }}.") from None
    for _, name, spec, conv in parsed:
        if name is not None and (not name.isidentifier() or spec or conv):
            raise DataError(f"template placeholder {{{name}}} in {text!r} must be a plain named "
                            "field like {question}.")
    return parsed


def _field_keys(names: list[str], fields) -> dict[str, str]:
    """Placeholder -> row key, from `fields` entries `name` or `name=row_key`."""
    if fields is None:
        return {n: n for n in names}
    fields = [fields] if isinstance(fields, str) else list(fields)
    pairs = [f.split("=", 1) if "=" in f else [f, f] for f in fields]
    keys = {n.strip(): k.strip() for n, k in pairs}
    if sorted(keys) != sorted(names) or len(keys) != len(fields):
        raise DataError(f"fields {fields} do not match the template placeholders {names}; "
                        "give one entry per placeholder, as `name` or `name=row_key`.")
    return keys


def render_prompt(question: str, template: str = DEFAULT_TEMPLATE) -> str:
    """The template text up to (not including) the answer, e.g. "Вопрос: {q}\\n### Ответ: "."""
    t = Template(template)
    if set(t.placeholders) != {"question", t.answer_field}:
        raise DataError(f"template {template!r} must use exactly the placeholders {{question}} and "
                        f"{{answer}} to render task prompts; got {sorted(set(t.placeholders))}.")
    return t.prompt({"question": question})


def chat_template(template: Optional[str]) -> Optional[str]:
    """`template` as a transformers chat template (Jinja). A user message renders as bos + the
    template up to its last {question}, filled; the generation prompt as the header (the text from
    there to {answer}); an assistant message as header + answer + eos. So
    `apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)` gives
    exactly `prompt_tokens(tok, q, template)`, and answered turns are training rows one after
    another. None for no template (text data) or one render_prompt refuses (placeholders other
    than {question} and {answer}): there is no question to fill."""
    if not template:
        return None
    try:
        render_prompt("", template)
    except DataError:
        return None
    user, text = ["bos_token"], ""
    for literal, name, _, _ in _parse(template):  # escaped braces split literals: join them
        text += literal
        if name == "question":
            user += [_jinja_string(text), "message['content']"] if text else ["message['content']"]
            text = ""
    header = _jinja_string(text)  # what follows the last question: the answer's header
    return "\n".join([
        "{%- for message in messages -%}",
        "{%- if message['role'] == 'user' -%}",
        "{{- " + " + ".join(user) + " -}}",
        "{%- elif message['role'] == 'assistant' -%}",
        "{{- " + header + " + message['content'] + eos_token -}}",
        "{%- else -%}",
        "{{- raise_exception('this model was trained on questions (role user) and answers (role "
        "assistant) only; drop the ' + message['role'] + ' message.') -}}",
        "{%- endif -%}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}{{- " + header + " -}}{%- endif -%}"])


def _jinja_string(text: str) -> str:
    """`text` as a Jinja string literal: Jinja reads the escapes JSON writes."""
    return json.dumps(text, ensure_ascii=False)


def prompt_tokens(tok, question: str, template: str = DEFAULT_TEMPLATE) -> list[int]:
    """The token ids that ask a model trained on `template` rows `question`: bos, then the
    template up to the answer, as every training row starts (bos + template(row) + eos)."""
    return [tok.bos_id] + tok.encode(render_prompt(question, template))
