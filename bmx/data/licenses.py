"""Which licence an article is under, read from its JATS `<permissions>`, and the paper's filter.

BioMistral trained on the PMC Open Access *commercial-use* subset: CC0, CC BY, CC BY-SA and CC BY-ND.
Articles say their licence in several ways, in decreasing order of precision:
`<ali:license_ref>` (a URL), `<license xlink:href>` (a URL), `<license license-type>` (a code such
as "cc-by" or the uninformative "open-access"), and finally prose in `<license-p>` or an old
`<copyright-statement>` ("distributed under the terms of the Creative Commons Attribution License").
The first of these that names a known licence wins.

Public-domain works (US government articles marked with creativecommons.org/publicdomain/mark) carry
no restriction at all, so they count as commercial-use like CC0. A JATS article whose licence cannot
be identified is "unknown" and excluded, as the paper's filter would. Formats that carry no licence
field (PubTator, PubMed citations, plain text) are "not-recorded": the person who passed them vouches
for them, and the manifest counts them separately so that choice stays visible.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from lxml import etree

from bmx.data.safe_xml import local_name

CC0 = "cc0"
PUBLIC_DOMAIN = "public-domain"
UNKNOWN = "unknown"
NOT_RECORDED = "not-recorded"

COMMERCIAL = frozenset({CC0, PUBLIC_DOMAIN, "cc-by", "cc-by-sa", "cc-by-nd", NOT_RECORDED})
LICENSE_FILTERS = ("commercial", "all")

_CC_URL = re.compile(r"creativecommons\.org/licen[cs]es/([a-z-]+)")
_CC_PUBLIC_DOMAIN_URL = re.compile(r"creativecommons\.org/publicdomain/(zero|mark)")
_XLINK_HREF = "{http://www.w3.org/1999/xlink}href"


def _cc_code(elements: Iterable[str]) -> str:
    """'cc-by-nc-sa' from the parts of a CC licence in any order ('by', 'nc', 'sa' / 'nd')."""
    parts = set(elements)
    suffix = "".join(f"-{p}" for p in ("nc", "sa", "nd") if p in parts)
    return "cc-by" + suffix


def license_from_url(url: str) -> str | None:
    """Licence named by a creativecommons.org URL, or None if the URL names none."""
    url = url.lower()
    public_domain = _CC_PUBLIC_DOMAIN_URL.search(url)
    if public_domain:
        return CC0 if public_domain.group(1) == "zero" else PUBLIC_DOMAIN
    match = _CC_URL.search(url)
    if not match or not match.group(1).startswith("by"):
        return None
    return _cc_code(match.group(1).split("-"))


def license_from_type(license_type: str) -> str | None:
    """Licence named by a `license-type` attribute ('cc-by', 'CC BY-NC', 'ccbyncnd', 'cc0', ...)."""
    code = re.sub(r"[^a-z0-9]", "", license_type.lower())
    if code in ("cc0", "cczero"):
        return CC0
    if code == "publicdomain":
        return PUBLIC_DOMAIN
    if code.startswith("ccby"):
        rest = code[len("ccby"):]
        parts = [rest[i:i + 2] for i in range(0, len(rest), 2)]
        if all(p in ("nc", "sa", "nd") for p in parts):
            return _cc_code(parts)
    return None


def license_from_text(text: str) -> str | None:
    """Licence named in prose such as 'the Creative Commons Attribution License'."""
    text = re.sub(r"[\s-]+", " ", text.lower())
    if "cc0" in text or "public domain dedication" in text or "free of all copyright" in text:
        return CC0
    if "creative commons" in text and "attribution" in text:
        parts = ["by"]
        if re.search(r"non ?commercial", text):
            parts.append("nc")
        if re.search(r"share ?alike", text):
            parts.append("sa")
        if re.search(r"no ?deriv", text):
            parts.append("nd")
        return _cc_code(parts)
    if "public domain" in text:
        return PUBLIC_DOMAIN
    return None


def _license_evidence(article_meta: etree._Element) -> Iterable[tuple[str, str]]:
    """(kind, value) pairs that may name the licence, most precise first."""
    licenses = [e for e in article_meta.iter() if local_name(e) == "license"]
    for element in article_meta.iter():
        if local_name(element) == "license_ref":
            yield "url", "".join(element.itertext())
    for element in licenses:
        for attribute in (_XLINK_HREF, "href"):
            if element.get(attribute):
                yield "url", element.get(attribute)
        for link in element.iter():
            if local_name(link) == "ext-link" and link.get(_XLINK_HREF):
                yield "url", link.get(_XLINK_HREF)
    for element in licenses:
        if element.get("license-type"):
            yield "type", element.get("license-type")
    for element in licenses:
        yield "text", " ".join(element.itertext())
    for element in article_meta.iter():
        if local_name(element) == "copyright-statement":
            yield "text", " ".join(element.itertext())


_READERS = {"url": license_from_url, "type": license_from_type, "text": license_from_text}


def detect_license(article_meta: etree._Element | None) -> str:
    """Normalised licence of a JATS article from its `<article-meta>`; UNKNOWN when none is named."""
    if article_meta is None:
        return UNKNOWN
    for kind, value in _license_evidence(article_meta):
        found = _READERS[kind](value)
        if found is not None:
            return found
    return UNKNOWN


def is_allowed(license_id: str, license_filter: str) -> bool:
    """Whether `license_filter` ('commercial' = the paper's subset, or 'all') keeps a document."""
    if license_filter == "all":
        return True
    if license_filter == "commercial":
        return license_id in COMMERCIAL
    raise ValueError(f"licence filter {license_filter!r} is not one of {LICENSE_FILTERS}")
