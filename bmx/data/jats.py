"""A JATS article (PMC `.nxml`, publisher JATS, or one wrapped in OAI-PMH) as plain text.

What a language model should read is the article's prose: the title, the abstracts, and the body's
sections in reading order with their headings, paragraphs, lists, quotes and boxes. Inline formulas
stay as text because they are part of sentences. Everything that is not prose is left out: the
reference list, figures, tables, display formulas, supplementary material, footnotes, the `<back>`
matter and the author/affiliation metadata in `<front>` (only the title and abstracts are read there).

Blocks (title, headings, paragraphs, list items) are separated by a blank line; whitespace inside a
block collapses to single spaces. Tags are matched by local name because PMC's OAI-PMH feed puts
the article in the JATS namespace while PMC's FTP files use none.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from lxml import etree

from bmx.data.licenses import detect_license
from bmx.data.safe_xml import BadDocument, local_name, text_of_entity

# Subtrees that are not prose. `label`s number figures, sections and references ("Figure 1", "2.1").
_LEFT_OUT = frozenset({
    "ref-list", "fig", "fig-group", "table-wrap", "table-wrap-group", "table", "disp-formula",
    "disp-formula-group", "supplementary-material", "fn-group", "fn", "label", "graphic",
    "inline-graphic", "media", "object-id", "caption", "back", "floats-group", "author-notes",
    "alt-text", "long-desc", "processing-meta",
})
# Elements that start a new block of text rather than continuing the sentence around them.
_BLOCKS = frozenset({
    "sec", "p", "title", "list", "list-item", "def-list", "def-item", "disp-quote", "boxed-text",
    "statement", "speech", "verse-group", "verse-line", "abstract", "body", "app", "glossary",
})
_LEFT_OUT_SECTION_TYPES = frozenset({"supplementary-material", "display-objects", "floats"})
# One-line "teaser" abstracts repeat the real one.
_LEFT_OUT_ABSTRACT_TYPES = frozenset({"toc", "teaser", "graphical"})
_MATH_PREFERENCE = ("math", "tex-math")

_SPACES = re.compile(r"\s+")


def _is_left_out(element: etree._Element) -> bool:
    name = local_name(element)
    if name in _LEFT_OUT:
        return True
    return name == "sec" and element.get("sec-type") in _LEFT_OUT_SECTION_TYPES


def _inline_text(element: etree._Element) -> str:
    """Text of an inline element and its children, without the parts that are left out."""
    if isinstance(element, etree._Entity):
        return text_of_entity(element)
    if not isinstance(element.tag, str) or _is_left_out(element):
        return ""
    name = local_name(element)
    if name == "alternatives":
        # One rendering of the formula, not MathML and TeX and an image one after another.
        for preferred in _MATH_PREFERENCE:
            for child in element:
                if local_name(child) == preferred:
                    return _inline_text(child)
        return ""
    if name == "break":
        return " "
    pieces = [element.text or ""]
    for child in element:
        pieces.append(_inline_text(child))
        pieces.append(child.tail or "")
    return "".join(pieces)


def _collapse(text: str) -> str:
    return _SPACES.sub(" ", text).strip()


def _blocks(element: etree._Element, out: list[str], list_depth: int = 0) -> None:
    """Append the text blocks of a block-level `element` to `out`, in reading order."""
    first_block = len(out)
    pending = [element.text or ""]

    def flush() -> None:
        text = _collapse("".join(pending))
        if text:
            out.append(text)
        pending.clear()

    for child in element:
        if _is_left_out(child):
            pass
        elif local_name(child) in _BLOCKS:
            flush()
            depth = list_depth + 1 if local_name(child) in ("list", "def-list") else list_depth
            _blocks(child, out, depth)
        else:
            pending.append(_inline_text(child))
        pending.append(child.tail or "")
    flush()
    if local_name(element) in ("list-item", "def-item") and len(out) > first_block:
        out[first_block] = "  " * max(list_depth - 1, 0) + "- " + out[first_block]


def _first(parent: etree._Element | None, *path: str) -> etree._Element | None:
    """First descendant reached by following child local names `path` (namespace-agnostic)."""
    current = parent
    for step in path:
        if current is None:
            return None
        current = next((c for c in current if local_name(c) == step), None)
    return current


def article_text(article: etree._Element) -> str:
    """The prose of one `<article>` element; BadDocument if it has no abstract and no body text."""
    meta = _first(article, "front", "article-meta")
    title_group = _first(meta, "title-group")
    title_parts = []
    for name in ("article-title", "subtitle"):
        element = _first(title_group, name)
        if element is not None:
            title_parts.append(_collapse(_inline_text(element)))
    title = ": ".join(p for p in title_parts if p)

    content: list[str] = []
    if meta is not None:
        for abstract in meta:
            if local_name(abstract) == "abstract" and abstract.get("abstract-type") not in _LEFT_OUT_ABSTRACT_TYPES:
                _blocks(abstract, content)
    body = _first(article, "body")
    if body is not None:
        _blocks(body, content)
    if not content:
        raise BadDocument("empty article: no abstract or body text")
    return "\n\n".join(([title] if title else []) + content)


def article_license(article: etree._Element) -> str:
    return detect_license(_first(article, "front", "article-meta"))


def articles_in(root: etree._Element) -> Iterator[etree._Element]:
    """The `<article>` elements of a JATS file: the root itself, or each record of an OAI-PMH response.

    An OAI-PMH error response (e.g. `idDoesNotExist`) or a response without articles is a BadDocument.
    """
    name = local_name(root)
    if name == "article":
        yield root
        return
    if name != "OAI-PMH":
        raise BadDocument(f"not a JATS article: root element is <{name}>")
    error = _first(root, "error")
    if error is not None:
        raise BadDocument(f"OAI-PMH error response: {error.get('code')}: {_collapse(''.join(error.itertext()))}")
    found = False
    for record in root.iter():
        if local_name(record) != "record":
            continue
        header = _first(record, "header")
        if header is not None and header.get("status") == "deleted":
            continue
        article = _first(record, "metadata", "article")
        if article is not None:
            found = True
            yield article
    if not found:
        raise BadDocument("OAI-PMH response holds no <record><metadata><article>")
