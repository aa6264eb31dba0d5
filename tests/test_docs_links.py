"""Every relative link of the documentation resolves, and the README stays a front page.

Pages: README.md, every .md under docs/ (the study reports included) and benchmarks/README.md.
A relative Markdown link (``[text](path)``, ``[text](path#anchor)``, images too) must name a file
or folder that exists relative to its page; an ``#anchor`` into a .md file must be one of that
file's headings, slugged as GitHub does. Web links (http, https, mailto) and same-page ``#anchor``
links are not checked. Fenced code blocks and inline code are not Markdown, so nothing in them
counts as a link or a heading. Pure text processing: well under a second.
"""

import re
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 300

_FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
# [text](target) or ![alt](target), with an optional "title"; target may be <wrapped>.
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def pages():
    found = [ROOT / "README.md", ROOT / "benchmarks" / "README.md"]
    found += sorted((ROOT / "docs").rglob("*.md"))
    return found


def prose_lines(text):
    """The lines outside fenced code blocks (fences as lines, blank), inline code blanked out."""
    fence = None
    for line in text.splitlines():
        match = _FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)[0] * len(match.group(1))
            yield ""
            continue
        if fence is not None:
            if line.strip().startswith(fence) and set(line.strip()) <= {fence[0]}:
                fence = None
            yield ""
            continue
        # A heading keeps its code (its text makes the anchor); elsewhere code is blanked out.
        yield line if _HEADING.match(line) else _CODE_SPAN.sub(lambda m: " " * len(m.group(0)), line)


def slug(heading):
    """GitHub's anchor for a heading: lowercase, markup and punctuation (but '-' and '_') dropped,
    each space a '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)   # a link in a heading: its text
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path):
    seen, result = {}, set()
    for line in prose_lines(path.read_text(encoding="utf-8")):
        match = _HEADING.match(line)
        if match:
            base = slug(match.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            result.add(base if n == 0 else f"{base}-{n}")
    return result


def links(path):
    for number, line in enumerate(prose_lines(path.read_text(encoding="utf-8")), 1):
        for match in _LINK.finditer(line):
            target = match.group(1).strip("<>")
            if re.match(r"^(https?:|mailto:)", target, re.I) or target.startswith("#"):
                continue
            yield number, target


def broken_links():
    broken, anchor_cache = [], {}
    for page in pages():
        for number, target in links(page):
            file_part, _, anchor = target.partition("#")
            where = (page.parent / unquote(file_part)).resolve()
            name = f"{page.relative_to(ROOT)}:{number}: ({target})"
            if not where.exists():
                broken.append(f"{name}: no such file or folder")
            elif anchor and where.suffix == ".md":
                if where not in anchor_cache:
                    anchor_cache[where] = anchors(where)
                if unquote(anchor).lower() not in anchor_cache[where]:
                    broken.append(f"{name}: no heading '#{anchor}' in {where.relative_to(ROOT)}")
    return broken


def test_every_relative_link_resolves():
    broken = broken_links()
    assert not broken, "broken links (page:line: (link)):\n" + "\n".join(broken)


def test_the_pages_have_links_to_check():
    # A guard against a parser that silently finds nothing.
    assert sum(1 for page in pages() for _ in links(page)) > 20


def test_readme_is_a_front_page():
    lines = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, (f"README.md has {lines} lines (at most {README_MAX_LINES}): move detail "
                                       "to a page under docs/ and link it")


def test_slugs_follow_github():
    assert slug("Training today's models (`apply_prsl`)") == "training-todays-models-apply_prsl"
    assert slug("Measured (GPU)") == "measured-gpu"
    assert slug("C++ (`csrc/prsl_cpu.cpp`, CPU)") == "c-csrcprsl_cpucpp-cpu"
    assert slug("Options: softcap, label smoothing, z-loss, token accuracy") == \
        "options-softcap-label-smoothing-z-loss-token-accuracy"
