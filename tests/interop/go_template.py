"""A Python reading of the small Go text/template subset that fucina's Ollama Modelfiles use.

Supported, with Go's meaning: text; `{{ range .Messages }}...{{ end }}`; `{{ if C }}`, `{{ else if C }}`,
`{{ else }}`, `{{ end }}`; `{{ .Role }}`, `{{ .Content }}`; `{{ $v := "lit" }}` and `{{ $v = .Role }}`
(assignment reaches the variable declared outside the range, as in Go 1.11+); conditions `eq A B` and
`ne A B` over `.Role`, `$v` and "string literals". Anything else (trim markers, pipelines, other fields or
functions) raises, so a Modelfile that leaves the subset fails its test instead of being half-read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_ACTION = re.compile(r"\{\{(.*?)\}\}", re.S)
_OPERAND = r'(\.Role|\.Content|\$\w+|"[^"\\]*")'
_CONDITION = re.compile(rf"(eq|ne) {_OPERAND} {_OPERAND}")
_ASSIGN = re.compile(rf"(\$\w+) (:=|=) {_OPERAND}")


class GoTemplateError(ValueError):
    """The template uses something outside the supported subset, or is malformed."""


@dataclass
class _Node:
    kind: str  # "text", "value", "assign", "range", "if"
    argument: str = ""
    body: list[_Node] = field(default_factory=list)
    branches: list[tuple[str | None, list[_Node]]] = field(default_factory=list)  # if: (condition, body)


def _parse(template: str) -> list[_Node]:
    tokens: list[tuple[bool, str]] = []
    position = 0
    for match in _ACTION.finditer(template):
        tokens.append((False, template[position : match.start()]))
        action, inner = match.group(1), match.group(1)[1:-1]
        if not (action.startswith(" ") and action.endswith(" ")) or inner != inner.strip():
            raise GoTemplateError(
                f"only `{{{{ action }}}}`, no trim markers, is supported: {match.group(0)!r}"
            )
        tokens.append((True, inner))
        position = match.end()
    tokens.append((False, template[position:]))
    return _parse_list(tokens, 0, top=True)[0]


def _parse_list(tokens, index, top=False):
    """Nodes until an `end`/`else` at this level; returns them and the index of that closing token."""
    nodes: list[_Node] = []
    while index < len(tokens):
        is_action, text = tokens[index]
        if not is_action:
            if text:
                nodes.append(_Node("text", text))
            index += 1
        elif text == "end" or text == "else" or text.startswith("else if "):
            if top:
                raise GoTemplateError(f"unexpected {{{{ {text} }}}}")
            return nodes, index
        elif text == "range .Messages":
            body, index = _parse_list(tokens, index + 1)
            if tokens[index][1] != "end":
                raise GoTemplateError("range ... else is not supported")
            nodes.append(_Node("range", body=body))
            index += 1
        elif text.startswith("if "):
            node = _Node("if")
            condition: str | None = text[3:]
            while True:
                body, index = _parse_list(tokens, index + 1)
                node.branches.append((condition, body))
                closing = tokens[index][1]
                if closing == "end":
                    break
                if condition is None:
                    raise GoTemplateError("nothing may follow {{ else }} but {{ end }}")
                condition = closing[len("else if ") :] if closing.startswith("else if ") else None
            nodes.append(node)
            index += 1
        elif text in (".Role", ".Content"):
            nodes.append(_Node("value", text))
            index += 1
        elif _ASSIGN.fullmatch(text):
            nodes.append(_Node("assign", text))
            index += 1
        else:
            raise GoTemplateError(f"unsupported action {{{{ {text} }}}}")
    if not top:
        raise GoTemplateError("missing {{ end }}")
    return nodes, index


def render_go_template(template: str, messages: list[dict[str, str]]) -> str:
    """The text Ollama would render from `template` for `messages` (each with "role" and "content")."""
    variables: dict[str, str] = {}
    out: list[str] = []

    def operand(text: str, message: dict | None) -> str:
        if text.startswith('"'):
            return text[1:-1]
        if text.startswith("$"):
            if text not in variables:
                raise GoTemplateError(f"undefined variable {text}")
            return variables[text]
        if message is None:
            raise GoTemplateError(f"{text} outside range .Messages")
        return message[text[1:].lower()]

    def condition(text: str, message: dict | None) -> bool:
        match = _CONDITION.fullmatch(text)
        if match is None:
            raise GoTemplateError(f"unsupported condition {text!r}")
        equal = operand(match.group(2), message) == operand(match.group(3), message)
        return equal if match.group(1) == "eq" else not equal

    def run(nodes: list[_Node], message: dict | None) -> None:
        for node in nodes:
            if node.kind == "text":
                out.append(node.argument)
            elif node.kind == "value":
                out.append(operand(node.argument, message))
            elif node.kind == "assign":
                name, op, value = _ASSIGN.fullmatch(node.argument).groups()
                if (op == ":=") == (name in variables):
                    raise GoTemplateError(f"{name} {'redeclared' if op == ':=' else 'not declared'}")
                variables[name] = operand(value, message)
            elif node.kind == "range":
                for item in messages:
                    run(node.body, item)
            else:
                for branch_condition, body in node.branches:
                    if branch_condition is None or condition(branch_condition, message):
                        run(body, message)
                        break

    run(_parse(template), None)
    return "".join(out)


def parse_modelfile(text: str) -> dict[str, list[str]]:
    """Modelfile instructions -> their arguments, in order (TEMPLATE's triple-quoted value kept verbatim)."""
    instructions: dict[str, list[str]] = {}
    position = 0
    pattern = re.compile(r'([A-Z]+) ("""(.*?)"""|[^\n]*)\n', re.S)
    while position < len(text):
        if text[position] == "\n":
            position += 1
            continue
        match = pattern.match(text, position)
        if match is None:
            raise ValueError(f"unreadable Modelfile line at {text[position : position + 40]!r}")
        value = match.group(3) if match.group(3) is not None else match.group(2)
        instructions.setdefault(match.group(1), []).append(value)
        position = match.end()
    return instructions
