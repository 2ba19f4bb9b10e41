"""PubMed abstracts: MEDLINE/PubMed citation XML and PubTator files, as title + abstract texts.

A citation record is the title followed by its abstract; a structured abstract keeps its section
labels ("BACKGROUND", "METHODS", ...) as headings, the same layout JATS articles get. PubTator files
(`PMID|t|title`, `PMID|a|abstract`, annotation lines, blank line) give the same two parts; the
annotation lines are entity mentions, not text, and are ignored.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

from lxml import etree

from bmx.data.safe_xml import BadDocument, local_name, text_of_entity

_SPACES = re.compile(r"\s+")
_PUBTATOR_LINE = re.compile(r"^(\d+)\|([ta])\|(.*)$")


def _raw_text(element: etree._Element) -> str:
    if isinstance(element, etree._Entity):
        return text_of_entity(element)
    if not isinstance(element.tag, str):  # comment or processing instruction
        return ""
    pieces = [element.text or ""]
    for child in element:
        pieces.append(_raw_text(child))
        pieces.append(child.tail or "")
    return "".join(pieces)


def _text(element: etree._Element) -> str:
    return _SPACES.sub(" ", _raw_text(element)).strip()


def _child(parent: etree._Element | None, name: str) -> etree._Element | None:
    if parent is None:
        return None
    return next((c for c in parent if local_name(c) == name), None)


def citation_text(pubmed_article: etree._Element) -> str:
    """Title and abstract of one `<PubmedArticle>`; BadDocument if it has no abstract."""
    article = _child(_child(pubmed_article, "MedlineCitation"), "Article")
    title_element = _child(article, "ArticleTitle")
    blocks = [_text(title_element)] if title_element is not None else []
    abstract = _child(article, "Abstract")
    paragraphs = [] if abstract is None else [c for c in abstract if local_name(c) == "AbstractText"]
    for paragraph in paragraphs:
        label = paragraph.get("Label")
        if label:
            blocks.append(label)
        blocks.append(_text(paragraph))
    blocks = [b for b in blocks if b]
    if not paragraphs or len(blocks) <= 1:
        raise BadDocument("PubMed citation without an abstract")
    return "\n\n".join(blocks)


def citations_in(root: etree._Element) -> Iterator[etree._Element]:
    """The `<PubmedArticle>` records of a `<PubmedArticleSet>` root."""
    if local_name(root) not in ("PubmedArticleSet", "MedlineCitationSet"):
        raise BadDocument(f"not a PubMed citation set: root element is <{local_name(root)}>")
    for element in root:
        if local_name(element) in ("PubmedArticle", "MedlineCitation"):
            yield element if local_name(element) == "PubmedArticle" else _wrap(element)


def _wrap(citation: etree._Element) -> etree._Element:
    """A bare `<MedlineCitation>` (MEDLINE baseline format) in the `<PubmedArticle>` shape."""
    wrapper = etree.Element("PubmedArticle")
    wrapper.append(citation)
    return wrapper


def looks_like_pubtator(first_line: str) -> bool:
    return _PUBTATOR_LINE.match(first_line.rstrip("\r\n")) is not None


def pubtator_documents(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    """(PMID, 'title\\n\\nabstract') for each document of a PubTator file's lines, in file order."""
    pmid, title, abstract = None, "", ""
    for line in lines:
        match = _PUBTATOR_LINE.match(line)
        if match is None:
            continue  # annotation or blank line
        if match.group(1) != pmid and pmid is not None:
            yield pmid, _join(title, abstract)
            title, abstract = "", ""
        pmid = match.group(1)
        if match.group(2) == "t":
            title = match.group(3).strip()
        else:
            abstract = match.group(3).strip()
    if pmid is not None:
        yield pmid, _join(title, abstract)


def _join(title: str, abstract: str) -> str:
    return "\n\n".join(part for part in (title, abstract) if part)
