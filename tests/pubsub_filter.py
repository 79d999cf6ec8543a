"""Pub/Sub's subscription filter language, parsed and evaluated: the emulator ignores filters, real Pub/Sub does not.

What it knows is GCP's documented filter syntax
(https://cloud.google.com/pubsub/docs/subscription-message-filter) for the
forms Poltergust uses or might: `attributes.K = "v"`, `attributes.K != "v"`,
`attributes:K` (has the attribute), `hasPrefix(attributes.K, "p")`, `NOT` (or
`-`), `AND`, `OR` and parentheses. It refuses what Pub/Sub refuses and can be
known without asking it: AND and OR mixed without parentheses, any other
function (there is no suffix or regular-expression match), a filter over 256
bytes, lower-case operators, unquoted values.
"""
from __future__ import annotations

import re
from typing import Callable, Mapping

MAX_BYTES = 256
Attributes = Mapping[str, str]
Predicate = Callable[[Attributes], bool]

_TOKEN = re.compile(r'''
    \s*(?:
      (?P<string>"(?:[^"\\]|\\.)*")
    | (?P<op>!=|=|:|\(|\)|,|-)
    | (?P<word>[A-Za-z_][A-Za-z0-9_.]*)
    )''', re.VERBOSE)


class FilterError(ValueError):
    """A filter Pub/Sub would refuse when creating the subscription."""


def _tokens(text: str) -> list[str]:
    tokens, at = [], 0
    while at < len(text):
        if text[at:].strip() == "":
            break
        match = _TOKEN.match(text, at)
        if not match or match.end() == at:
            raise FilterError(f"unexpected text at {at}: {text[at:at + 20]!r}")
        tokens.append(match.group(match.lastgroup or "word"))
        at = match.end()
    return tokens


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = _tokens(text)
        self.at = 0

    def peek(self) -> str | None:
        return self.tokens[self.at] if self.at < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        token = self.peek()
        if token is None or (expected is not None and token != expected):
            raise FilterError(f"expected {expected or 'more'}, got {token!r}")
        self.at += 1
        return token

    def expression(self) -> Predicate:
        """term (AND term)* or term (OR term)*: GCP refuses a mix of both without parentheses."""
        terms, operator = [self.term()], None
        while self.peek() in ("AND", "OR"):
            word = self.take()
            if operator not in (None, word):
                raise FilterError("AND and OR mixed without parentheses")
            operator = word
            terms.append(self.term())
        if self.peek() in ("and", "or", "not"):
            raise FilterError(f"operators are upper case: {self.peek()!r}")
        if operator == "OR":
            return lambda attrs: any(term(attrs) for term in terms)
        return lambda attrs: all(term(attrs) for term in terms)

    def term(self) -> Predicate:
        token = self.peek()
        if token in ("NOT", "-"):
            self.take()
            inner = self.term()
            return lambda attrs: not inner(attrs)
        if token == "(":
            self.take()
            inner = self.expression()
            self.take(")")
            return inner
        if token == "hasPrefix":
            self.take()
            self.take("(")
            key = self.attribute()
            self.take(",")
            prefix = self.string()
            self.take(")")
            return lambda attrs: key in attrs and attrs[key].startswith(prefix)
        if token is not None and re.fullmatch(r"[A-Za-z_]\w*", token) and self.tokens[self.at + 1:self.at + 2] == ["("]:
            raise FilterError(f"unknown function {token}(): Pub/Sub filters know only hasPrefix")
        if token == "attributes":
            self.take()
            self.take(":")
            key = self.take()
            return lambda attrs: key in attrs
        key = self.attribute()
        operator = self.take()
        if operator not in ("=", "!="):
            raise FilterError(f"expected = or != after attributes.{key}, got {operator!r}")
        value = self.string()
        if operator == "=":
            return lambda attrs: attrs.get(key) == value
        return lambda attrs: attrs.get(key) != value

    def attribute(self) -> str:
        token = self.take()
        if not token.startswith("attributes.") or not re.fullmatch(r"attributes\.[A-Za-z_]\w*", token):
            raise FilterError(f"expected attributes.KEY, got {token!r}")
        return token[len("attributes."):]

    def string(self) -> str:
        token = self.take()
        if not token.startswith('"'):
            raise FilterError(f"expected a quoted string, got {token!r}")
        return re.sub(r"\\(.)", r"\1", token[1:-1])


def compile_filter(text: str) -> Predicate:
    """A predicate over a message's attributes; the empty filter passes everything."""
    if len(text.encode()) > MAX_BYTES:
        raise FilterError(f"filter of {len(text.encode())} bytes: Pub/Sub allows {MAX_BYTES}")
    if not text.strip():
        return lambda attrs: True
    parser = _Parser(text)
    predicate = parser.expression()
    if parser.peek() is not None:
        raise FilterError(f"unexpected {parser.peek()!r} after a complete filter")
    return predicate


def passes(text: str, attributes: Attributes) -> bool:
    return compile_filter(text)(attributes)
