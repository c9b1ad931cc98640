"""Turn files into `Document`s: .txt, .md, .rst, .html, .pdf, .docx, .csv/.tsv, .jsonl and .json.

Each loader returns the documents of one file or raises `LoaderError` with a short reason;
`iter_files` walks the paths given to an ingest and reports what it skips instead of failing.
A document's id is its path relative to the folder that was named (its file name when a file
was named); a .jsonl line or a .json record uses its own `id` field.
Only the standard library is used beyond bs4 (HTML) and pypdf (PDF): a .docx is read as the
zip of XML it is, a .csv through the csv module.
"""

from __future__ import annotations

import csv
import json
import re
import warnings
import xml.etree.ElementTree as ET
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retrieval.documents import Block, Document, Skipped
from retrieval.errors import LoaderError

_BLANK_LINES = re.compile(r"\n[ \t]*\n+")
_WHITESPACE = re.compile(r"\s+")


def _collapse(text: str) -> str:
    return _WHITESPACE.sub(" ", text).strip()


def _pretty_stem(path: Path) -> str:
    stem = path.stem.replace("_", " ").replace("-", " ").strip()
    return stem[:1].upper() + stem[1:] if stem else path.name


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LoaderError(f"unreadable: {exc.strerror or exc}") from exc
    if b"\x00" in data[:8192]:
        raise LoaderError("binary content in a text file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise LoaderError(f"not valid UTF-8 (byte {exc.start})") from exc
    return text.replace("\r\n", "\n").replace("\r", "\n")


def paragraphs(text: str, heading_path: tuple[str, ...] = ()) -> list[Block]:
    """Split plain text on blank lines; lines inside a paragraph are joined with spaces."""
    return [Block(p, heading_path) for p in (_collapse(part) for part in _BLANK_LINES.split(text)) if p]


def _require_text(blocks: list[Block]) -> tuple[Block, ...]:
    if not blocks:
        raise LoaderError("empty: no text found")
    return tuple(blocks)


# --- plain text -----------------------------------------------------------------------------


def load_text(path: Path, doc_id: str) -> list[Document]:
    blocks = _require_text(paragraphs(_read_text(path)))
    return [Document(doc_id, _pretty_stem(path), doc_id, blocks, format="text")]


# --- Markdown -------------------------------------------------------------------------------

_ATX = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)[ \t]*#*[ \t]*$")
_SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(```|~~~)")
_IMAGE = re.compile(r"!\[([^\]]*)\]\([^)]*\)")
_LINK = re.compile(r"\[([^\]]+)\]\([^)]*\)")
_EMPHASIS = re.compile(r"(\*\*|__)(.+?)\1")


def _md_inline(text: str) -> str:
    text = _IMAGE.sub(r"\1", text)
    text = _LINK.sub(r"\1", text)
    return _EMPHASIS.sub(r"\2", text)


def parse_markdown(text: str) -> tuple[str | None, list[Block]]:
    """Return (title, blocks). Headings set the heading path of the paragraphs under them."""
    title: str | None = None
    lines = text.split("\n")
    if lines and lines[0].strip() == "---":  # YAML front matter: take its title, drop the rest
        for end in range(1, len(lines)):
            if lines[end].strip() in ("---", "..."):
                for line in lines[1:end]:
                    key, _, value = line.partition(":")
                    if key.strip().lower() == "title" and value.strip():
                        title = value.strip().strip("\"'")
                lines = lines[end + 1 :]
                break

    blocks: list[Block] = []
    stack: list[tuple[int, str]] = []
    para: list[str] = []
    fence: str | None = None

    def path() -> tuple[str, ...]:
        return tuple(heading for _, heading in stack)

    def flush() -> None:
        if para:
            body = _collapse(_md_inline(" ".join(line.strip() for line in para)))
            if body:
                blocks.append(Block(body, path()))
            para.clear()

    def set_heading(level: int, heading: str) -> None:
        nonlocal title
        heading = _collapse(_md_inline(heading))
        if not heading:
            return
        while stack and stack[-1][0] >= level:
            stack.pop()
        stack.append((level, heading))
        if title is None and level == 1:
            title = heading

    code: list[str] = []
    for line in lines:
        if fence is not None:
            if line.strip().startswith(fence):
                body = "\n".join(code).strip("\n")
                if body.strip():
                    blocks.append(Block(body, path()))
                code.clear()
                fence = None
            else:
                code.append(line)
            continue
        if match := _FENCE.match(line):
            flush()
            fence = match.group(1)
            continue
        if match := _ATX.match(line):
            flush()
            set_heading(len(match.group(1)), match.group(2))
            continue
        if (match := _SETEXT.match(line)) and len(para) == 1:
            heading = para.pop()
            set_heading(1 if match.group(1)[0] == "=" else 2, heading)
            continue
        if not line.strip() or _SETEXT.match(line):
            flush()
            continue
        para.append(line)
    flush()
    if fence is not None and any(c.strip() for c in code):  # unterminated fence: keep its text
        blocks.append(Block("\n".join(code).strip("\n"), path()))
    return title, blocks


def load_markdown(path: Path, doc_id: str) -> list[Document]:
    title, blocks = parse_markdown(_read_text(path))
    return [Document(doc_id, title or _pretty_stem(path), doc_id, _require_text(blocks), format="markdown")]


# --- reStructuredText -----------------------------------------------------------------------

# A section adornment: one punctuation character repeated (docutils allows any of these).
_RST_ADORNMENT = re.compile(r"^([!-/:-@\[-`{-~])\1*[ \t]*$")
# A line that draws a table border or a transition, never text: "+----+----+", "=====  =====".
_RST_RULE = re.compile(r"^[ \t]*[-=+|~^*:#_ ]{4,}$")
_RST_EXPLICIT = re.compile(r"^([ \t]*)\.\.(?:[ \t]+(.*))?$")
_RST_DIRECTIVE = re.compile(r"^(?:\|[^|]+\|[ \t]+)?([\w][\w.+:-]*?)::(?:[ \t]+(.*))?$")
_RST_FOOTNOTE = re.compile(r"^\[[^\]]+\][ \t]*(.*)$")
_RST_OPTION = re.compile(r"^[ \t]*:[\w .-]+:")
# Directives whose body is prose a reader needs: the admonitions and their relatives.
_RST_PROSE_DIRECTIVES = {
    "admonition", "attention", "caution", "danger", "error", "hint", "important", "note", "seealso",
    "sidebar", "tip", "topic", "warning",
}  # fmt: skip
_RST_CODE_DIRECTIVES = {"code", "code-block", "sourcecode"}
_RST_INLINE = re.compile(
    r"``(?P<literal>.+?)``"
    r"|:[\w.+:-]+:`(?P<role>[^`]+)`"
    r"|`(?P<ref>[^`]+)`__?"
    r"|`(?P<interpreted>[^`]+)`"
    r"|(?<![\w*])\*\*(?P<strong>[^*\s](?:[^*]*[^*\s])?)\*\*(?![\w*])"
    r"|(?<![\w*])\*(?P<emphasis>[^*\s](?:[^*]*[^*\s])?)\*(?![\w*])"
)
_RST_TARGET = re.compile(r"\s*<([^<>]*)>$")


def _rst_inline_text(match: re.Match[str]) -> str:
    for name in ("literal", "strong", "emphasis"):
        if match.group(name) is not None:
            return match.group(name)
    text = match.group("role") or match.group("ref") or match.group("interpreted") or ""
    target = _RST_TARGET.search(text)
    if target:  # `text <url>`_ and :ref:`text <label>` show the text; `<url>`_ shows the url
        text = text[: target.start()] or target.group(1)
    return text.lstrip("~!")


def _rst_inline(text: str) -> str:
    return _RST_INLINE.sub(_rst_inline_text, text)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _indented_end(lines: list[str], start: int, indent: int) -> int:
    """Index of the first line from `start` that is not blank and not indented past `indent`."""
    end = start
    while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > indent):
        end += 1
    return end


def _dedent(lines: list[str]) -> list[str]:
    margin = min((_indent(line) for line in lines if line.strip()), default=0)
    return [line[margin:] for line in lines]


def parse_rst(text: str) -> tuple[str | None, list[Block]]:
    """Return (title, blocks): paragraphs under the section titles before them.

    Section levels follow the order in which adornment styles first appear, as in docutils.
    Admonitions (note, warning, ...) keep their text and code directives their code; other
    directives, comments and targets are dropped. Anything not recognised stays as text.
    """
    lines = [line.expandtabs(8) for line in text.split("\n")]
    title: str | None = None
    blocks: list[Block] = []
    stack: list[tuple[int, str]] = []
    styles: list[tuple[str, bool]] = []
    para: list[str] = []
    para_indent = 0
    literal_indent: int | None = None  # set after a paragraph ending in "::"

    def path() -> tuple[str, ...]:
        return tuple(heading for _, heading in stack)

    def flush() -> None:
        nonlocal literal_indent
        if not para:
            return
        body = " ".join(para)
        if body.endswith("::"):  # "Text::" shows as "Text:", a lone "::" as nothing
            literal_indent = para_indent
            head = body[:-2]
            body = head.rstrip() if not head or head[-1].isspace() else head + ":"
        body = _collapse(_rst_inline(body))
        if body:
            blocks.append(Block(body, path()))
        para.clear()

    def set_heading(heading: str, style: tuple[str, bool]) -> None:
        nonlocal title
        heading = _collapse(_rst_inline(heading))
        if style not in styles:
            styles.append(style)
        level = styles.index(style) + 1
        while stack and stack[-1][0] >= level:
            stack.pop()
        stack.append((level, heading))
        if title is None and level == 1:
            title = heading

    def adornment(index: int) -> str | None:
        return lines[index].strip() if index < len(lines) and _RST_ADORNMENT.match(lines[index]) else None

    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if not stripped:
            flush()
            i += 1
            continue
        if literal_indent is not None and not para and _indent(line) > literal_indent:
            end = _indented_end(lines, i, literal_indent)
            code = "\n".join(_dedent(lines[i:end])).strip("\n")
            blocks.append(Block(code, path()))
            literal_indent = None
            i = end
            continue
        if not para:
            literal_indent = None
        over, under = adornment(i), adornment(i + 2)
        if not para and over and under and over[0] == under[0] and i + 1 < len(lines):
            heading = lines[i + 1].strip()
            if heading and not adornment(i + 1) and len(under) >= len(heading):
                set_heading(heading, (over[0], True))
                i += 3
                continue
        under = adornment(i + 1)
        if not para and under and _indent(line) == 0 and not adornment(i) and len(under) >= len(stripped):
            set_heading(stripped, (under[0], False))
            i += 2
            continue
        if match := _RST_EXPLICIT.match(line):
            flush()
            indent = len(match.group(1))
            end = _indented_end(lines, i + 1, indent)
            blocks.extend(_rst_explicit(match.group(2) or "", lines[i + 1 : end], path()))
            i = end
            continue
        if _RST_RULE.match(line):
            flush()
            i += 1
            continue
        if not para:
            para_indent = _indent(line)
        para.append(stripped)
        i += 1
    flush()
    return title, blocks


def _rst_explicit(markup: str, body: list[str], heading_path: tuple[str, ...]) -> list[Block]:
    """The blocks kept from one explicit markup construct (".. " and its indented body)."""
    if match := _RST_FOOTNOTE.match(markup):
        return paragraphs(_rst_inline("\n".join([match.group(1), *body])), heading_path)
    directive = _RST_DIRECTIVE.match(markup)
    if directive is None:
        return []  # a comment, a hyperlink target or a substitution definition
    name = directive.group(1).lower()
    options = 0
    while options < len(body) and _RST_OPTION.match(body[options]):
        options += 1
    content = _dedent(body[options:])
    if name in _RST_CODE_DIRECTIVES:
        code = "\n".join(content).strip("\n")
        return [Block(code, heading_path)] if code.strip() else []
    if name not in _RST_PROSE_DIRECTIVES:
        return []
    _, inner = parse_rst("\n".join([directive.group(2) or "", *content]))
    return [Block(block.text, heading_path + block.heading_path) for block in inner]


def load_rst(path: Path, doc_id: str) -> list[Document]:
    title, blocks = parse_rst(_read_text(path))
    return [Document(doc_id, title or _pretty_stem(path), doc_id, _require_text(blocks), format="rst")]


# --- HTML -----------------------------------------------------------------------------------

_HEADINGS = {"h1": 1, "h2": 2, "h3": 3, "h4": 4, "h5": 5, "h6": 6}
_BLOCK_TAGS = {"p", "li", "pre", "blockquote", "td", "th", "dd", "dt", "figcaption", "caption", "summary"}
_DROP_TAGS = ["script", "style", "noscript", "template", "svg", "head"]


def parse_html(html: str) -> tuple[str | None, list[Block]]:
    """Return (title, blocks): paragraph-like elements under the h1-h6 headings before them."""
    from bs4 import BeautifulSoup, MarkupResemblesLocatorWarning, XMLParsedAsHTMLWarning

    with warnings.catch_warnings():
        # A short document can look like a file name to bs4; that is not a problem here.
        warnings.simplefilter("ignore", MarkupResemblesLocatorWarning)
        warnings.simplefilter("ignore", XMLParsedAsHTMLWarning)
        soup = BeautifulSoup(html, "html.parser")
    title_tag = soup.find("title")
    title = _collapse(title_tag.get_text()) if title_tag else None
    for tag in soup.find_all(_DROP_TAGS):
        tag.decompose()
    root = soup.body or soup

    blocks: list[Block] = []
    stack: list[tuple[int, str]] = []
    first_h1: str | None = None
    for element in root.find_all([*_HEADINGS, *_BLOCK_TAGS]):
        if any(parent.name in _BLOCK_TAGS for parent in element.parents):
            continue  # its text is already part of the enclosing block
        name = str(element.name)
        if name in _HEADINGS:
            heading = _collapse(element.get_text(" "))
            if not heading:
                continue
            level = _HEADINGS[name]
            while stack and stack[-1][0] >= level:
                stack.pop()
            stack.append((level, heading))
            if level == 1 and first_h1 is None:
                first_h1 = heading
            continue
        text = element.get_text().strip("\n") if name == "pre" else _collapse(element.get_text(" "))
        if text.strip():
            blocks.append(Block(text, tuple(h for _, h in stack)))
    if not blocks:  # no paragraph markup at all: fall back to the page's text
        blocks = paragraphs(root.get_text("\n\n"))
    return title or first_h1, blocks


def load_html(path: Path, doc_id: str) -> list[Document]:
    title, blocks = parse_html(_read_text(path))
    return [Document(doc_id, title or _pretty_stem(path), doc_id, _require_text(blocks), format="html")]


# --- PDF ------------------------------------------------------------------------------------


def _pdf_paragraph_breaks(text: str) -> str:
    """Mark paragraph ends in PDF text, which pypdf returns without blank lines.

    A line that ends a sentence and is clearly shorter than the page's longest line is taken
    as the last line of a paragraph.
    """
    if _BLANK_LINES.search(text):
        return text
    lines = text.split("\n")
    longest = max((len(line.rstrip()) for line in lines), default=0)
    out: list[str] = []
    for line in lines:
        out.append(line)
        stripped = line.rstrip()
        if stripped.endswith((".", "!", "?", ":")) and len(stripped) < 0.8 * longest:
            out.append("")
    return "\n".join(out)


def load_pdf(path: Path, doc_id: str) -> list[Document]:
    import logging

    from pypdf import PdfReader

    pypdf_logger = logging.getLogger("pypdf")
    previous_level = pypdf_logger.level
    pypdf_logger.setLevel(logging.ERROR)  # pypdf logs every recoverable oddity as a warning
    try:
        # pypdf raises many exception types on malformed input (PdfReadError, ValueError,
        # KeyError, ...); any of them means "this file cannot be read", which ingest reports.
        try:
            reader = PdfReader(str(path))
            if reader.is_encrypted and not reader.decrypt(""):
                raise LoaderError("encrypted PDF")
            pages = [page.extract_text() or "" for page in reader.pages]
            meta_title = reader.metadata.title if reader.metadata else None
        except LoaderError:
            raise
        except Exception as exc:
            raise LoaderError(f"unreadable PDF: {type(exc).__name__}: {exc}") from exc
    finally:
        pypdf_logger.setLevel(previous_level)
    blocks: list[Block] = []
    for page_text in pages:
        blocks.extend(paragraphs(_pdf_paragraph_breaks(page_text)))
    title = _collapse(str(meta_title)) if meta_title else ""
    return [Document(doc_id, title or _pretty_stem(path), doc_id, _require_text(blocks), format="pdf")]


# --- Word (.docx) ---------------------------------------------------------------------------

_W = "{http://schemas.openxmlformats.org/wordprocessingml/2006/main}"
_DC_TITLE = "{http://purl.org/dc/elements/1.1/}title"
_MC_FALLBACK = "{http://schemas.openxmlformats.org/markup-compatibility/2006}Fallback"
_DOCX_PART_LIMIT = 50 * 1024 * 1024  # uncompressed bytes: a larger part is taken for a zip bomb
_DOCX_HEADING_STYLE = re.compile(r"^heading ?([1-6])$")


def _docx_part(archive: zipfile.ZipFile, name: str) -> ET.Element | None:
    """Parse one XML part of the archive, or None when it is absent."""
    try:
        info = archive.getinfo(name)
    except KeyError:
        return None
    if info.file_size > _DOCX_PART_LIMIT:
        raise LoaderError(f"{name} is {info.file_size} bytes uncompressed (limit {_DOCX_PART_LIMIT})")
    with archive.open(info) as part:
        data = part.read(_DOCX_PART_LIMIT + 1)  # the sizes in a zip's directory can lie
    if len(data) > _DOCX_PART_LIMIT:
        raise LoaderError(f"{name} is over {_DOCX_PART_LIMIT} bytes uncompressed")
    if b"<!DOCTYPE" in data:  # Word never writes one; refusing it rules out entity tricks
        raise LoaderError(f"{name} has a DOCTYPE")
    try:
        return ET.fromstring(data)
    except ET.ParseError as exc:
        raise LoaderError(f"{name} is not valid XML ({exc})") from exc


def _docx_text(element: ET.Element, out: list[str]) -> None:
    """Append the visible text under `element`: runs' text, tabs and breaks as spaces."""
    for child in element:
        tag = child.tag
        if tag == _W + "t":
            out.append(child.text or "")
        elif tag in (_W + "tab", _W + "br", _W + "cr"):
            out.append(" ")
        elif tag not in (_W + "pPr", _W + "rPr", _MC_FALLBACK):  # formatting; a drawing's copy
            _docx_text(child, out)
            if tag == _W + "p":
                out.append(" ")


def _docx_style_kinds(styles: ET.Element | None) -> dict[str, str]:
    """Style id -> its built-in name ("title", "heading 1", ...): ids are localised, names not."""
    kinds: dict[str, str] = {}
    if styles is None:
        return kinds
    for style in styles.iter(_W + "style"):
        name = style.find(_W + "name")
        style_id = style.get(_W + "styleId")
        if style_id and name is not None and name.get(_W + "val"):
            kinds[style_id] = str(name.get(_W + "val")).lower()
    return kinds


def parse_docx(path: Path) -> tuple[str | None, list[Block]]:
    """Return (title, blocks): paragraphs and table rows of word/document.xml.

    The Title-style paragraph gives the title, Heading 1-6 paragraphs the heading path; a
    table row is one block, its cells joined with " | ".
    """
    try:
        with zipfile.ZipFile(path) as archive:
            document = _docx_part(archive, "word/document.xml")
            if document is None:
                raise LoaderError("not a Word document: no word/document.xml")
            core = _docx_part(archive, "docProps/core.xml")
            kinds = _docx_style_kinds(_docx_part(archive, "word/styles.xml"))
    except zipfile.BadZipFile as exc:
        raise LoaderError("not a .docx: not a zip archive") from exc
    except (zlib.error, EOFError, NotImplementedError, RuntimeError) as exc:
        raise LoaderError(f"damaged .docx: {exc}") from exc

    title: str | None = None
    blocks: list[Block] = []
    stack: list[tuple[int, str]] = []

    def text_of(element: ET.Element) -> str:
        out: list[str] = []
        _docx_text(element, out)
        return _collapse("".join(out))

    def paragraph(element: ET.Element) -> None:
        nonlocal title
        text = text_of(element)
        if not text:
            return
        style = element.find(f"{_W}pPr/{_W}pStyle")
        style_id = style.get(_W + "val", "") if style is not None else ""
        kind = kinds.get(style_id, style_id).lower()
        if kind == "title" and title is None:
            title = text
            return
        if heading := _DOCX_HEADING_STYLE.match(kind):
            level = int(heading.group(1))
            while stack and stack[-1][0] >= level:
                stack.pop()
            stack.append((level, text))
            return
        blocks.append(Block(text, tuple(h for _, h in stack)))

    def walk(container: ET.Element) -> None:
        for child in container:
            if child.tag == _W + "p":
                paragraph(child)
            elif child.tag == _W + "tbl":
                for row in child.iter(_W + "tr"):
                    cells = [text_of(cell) for cell in row.findall(_W + "tc")]
                    if row_text := " | ".join(cell for cell in cells if cell):
                        blocks.append(Block(row_text, tuple(h for _, h in stack)))
            elif child.tag in (_W + "sdt", _W + "sdtContent", _W + "customXml", _W + "body"):
                walk(child)  # content controls and custom XML wrap ordinary paragraphs

    walk(document)
    if title is None and core is not None:
        core_title = core.find(_DC_TITLE)
        title = _collapse(core_title.text or "") if core_title is not None else None
    return title or None, blocks


def load_docx(path: Path, doc_id: str) -> list[Document]:
    title, blocks = parse_docx(path)
    return [Document(doc_id, title or _pretty_stem(path), doc_id, _require_text(blocks), format="docx")]


# --- CSV / TSV ------------------------------------------------------------------------------


def _csv_dialect(path: Path, text: str) -> type[csv.Dialect] | csv.Dialect:
    if path.suffix.lower() == ".tsv":
        return csv.excel_tab
    sample = text[:65536]
    if "\n" in sample:  # a cut line would mislead the sniffer
        sample = sample[: sample.rindex("\n")]
    try:
        return csv.Sniffer().sniff(sample, delimiters=",;\t|")
    except csv.Error:
        return csv.excel


def load_csv(path: Path, doc_id: str) -> list[Document]:
    """One block per data row, "column: value; ..." with the header's names; empty cells left out."""
    text = _read_text(path)
    rows = csv.reader(text.split("\n"), _csv_dialect(path, text))
    blocks: list[Block] = []
    header: list[str] | None = None
    try:
        for row in rows:
            values = [_collapse(value) for value in row]
            if not any(values):
                continue
            if header is None:
                header = [name or f"column {n}" for n, name in enumerate(values, start=1)]
                continue
            names = header + [f"column {n}" for n in range(len(header) + 1, len(values) + 1)]
            if pairs := "; ".join(f"{name}: {value}" for name, value in zip(names, values, strict=False) if value):
                blocks.append(Block(pairs))
    except csv.Error as exc:
        raise LoaderError(f"unreadable CSV at line {rows.line_num}: {exc}") from exc
    return [Document(doc_id, _pretty_stem(path), doc_id, _require_text(blocks), format="csv")]


# --- JSON lines -----------------------------------------------------------------------------

_TEXT_FIELDS = ("text", "content", "body")
_ID_FIELDS = ("id", "doc_id", "document_id")


@dataclass
class _Records:
    """The documents of a file of records (.jsonl, .json) and the records it skipped."""

    documents: list[Document] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def _first(obj: dict[str, Any], names: Iterable[str]) -> Any:
    for name in names:
        if obj.get(name) not in (None, ""):
            return obj[name]
    return None


def _record_document(obj: Any, record_id: str, source: str, fmt: str, title: str | None = None) -> Document:
    """One JSON object as a document: a text field (text/content/body) plus optional id, title,
    source/url; other fields become metadata. `record_id`, `source` and `title` are defaults
    (the title defaults to the id). Raises `LoaderError` when the object holds no text.
    """
    if not isinstance(obj, dict):
        raise LoaderError("not a JSON object")
    text = _first(obj, _TEXT_FIELDS)
    if not isinstance(text, str) or not text.strip():
        raise LoaderError("no text (expected a 'text' field)")
    record_id = str(_first(obj, _ID_FIELDS) or record_id)
    known = {*_TEXT_FIELDS, *_ID_FIELDS, "title", "source", "url"}
    return Document(
        record_id,
        str(obj.get("title") or title or record_id),
        str(obj.get("source") or obj.get("url") or source),
        tuple(paragraphs(text)),
        format=fmt,
        metadata={key: value for key, value in obj.items() if key not in known},
    )


def load_jsonl_lines(path: Path, doc_id: str) -> _Records:
    """One document per line (see `_record_document`); bad lines are skipped with a reason."""
    result = _Records()
    lines = _read_text(path).split("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            result.skipped.append(Skipped(where, f"invalid JSON: {exc.msg}"))
            continue
        try:
            result.documents.append(_record_document(obj, f"{doc_id}#{number}", f"{doc_id}:{number}", "jsonl"))
        except LoaderError as exc:
            result.skipped.append(Skipped(where, exc.reason))
    if not result.documents and not result.skipped:
        raise LoaderError("empty: no lines")
    return result


def load_jsonl(path: Path, doc_id: str) -> list[Document]:
    return load_jsonl_lines(path, doc_id).documents


# --- JSON -----------------------------------------------------------------------------------

_LIST_FIELDS = ("documents", "items", "data")


def load_json_records(path: Path, doc_id: str) -> _Records:
    """An array of records, an object with one under documents/items/data, or one record.

    Records are read as .jsonl lines are; record N (counted from 1) defaults to the id and
    source `FILE.json#N`, and a record without text is skipped with a reason.
    """
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise LoaderError(f"invalid JSON: {exc.msg} (line {exc.lineno})") from exc
    if isinstance(data, dict) and _first(data, _TEXT_FIELDS) is None:
        data = next((data[name] for name in _LIST_FIELDS if isinstance(data.get(name), list)), data)
    if isinstance(data, dict):  # one record: the file is the document
        return _Records([_record_document(data, doc_id, doc_id, "json", _pretty_stem(path))])
    if not isinstance(data, list):
        raise LoaderError("expected a JSON object or array")
    if not data:
        raise LoaderError("empty: no records")
    result = _Records()
    for number, obj in enumerate(data, start=1):
        where = f"{doc_id}#{number}"
        try:
            result.documents.append(_record_document(obj, where, where, "json"))
        except LoaderError as exc:
            result.skipped.append(Skipped(f"{path}#{number}", exc.reason))
    return result


def load_json(path: Path, doc_id: str) -> list[Document]:
    return load_json_records(path, doc_id).documents


Loader = Callable[[Path, str], list[Document]]

LOADERS: dict[str, Loader] = {
    ".txt": load_text,
    ".text": load_text,
    ".md": load_markdown,
    ".markdown": load_markdown,
    ".rst": load_rst,
    ".html": load_html,
    ".htm": load_html,
    ".pdf": load_pdf,
    ".docx": load_docx,
    ".csv": load_csv,
    ".tsv": load_csv,
    ".jsonl": load_jsonl,
    ".json": load_json,
}

# Loaders of files of records, which report the records they skip next to the documents.
_RECORD_LOADERS: dict[Loader, Callable[[Path, str], _Records]] = {
    load_jsonl: load_jsonl_lines,
    load_json: load_json_records,
}


# --- walking the paths given to an ingest ---------------------------------------------------


@dataclass(frozen=True)
class LoadedFile:
    """What one file gave: its documents and anything skipped (the file itself or some lines)."""

    path: Path
    documents: list[Document]
    skipped: list[Skipped]


def document_files(paths: Iterable[Path]) -> Iterator[tuple[Path, str] | Skipped]:
    """Yield (file, document id) for each file under the paths, or a `Skipped` for a bad path.

    Folders are walked recursively in sorted order; hidden files and folders are left out.
    """
    for given in paths:
        if given.is_file():
            yield given, given.name
        elif given.is_dir():
            for file in sorted(p for p in given.rglob("*") if p.is_file()):
                relative = file.relative_to(given)
                if any(part.startswith(".") for part in relative.parts):
                    continue
                yield file, relative.as_posix()
        else:
            yield Skipped(str(given), "not found")


def load_file(path: Path, doc_id: str) -> LoadedFile:
    """Load one file; never raises for a bad file, it reports it in `skipped` instead."""
    suffix = path.suffix.lower()
    loader = LOADERS.get(suffix)
    if loader is None:
        return LoadedFile(path, [], [Skipped(str(path), f"unsupported file type {suffix or '(none)'}")])
    try:
        if path.stat().st_size == 0:
            raise LoaderError("empty file")
        if (load_records := _RECORD_LOADERS.get(loader)) is not None:
            records = load_records(path, doc_id)
            return LoadedFile(path, records.documents, records.skipped)
        return LoadedFile(path, loader(path, doc_id), [])
    except LoaderError as exc:
        return LoadedFile(path, [], [Skipped(str(path), exc.reason)])
    except OSError as exc:
        return LoadedFile(path, [], [Skipped(str(path), f"unreadable: {exc.strerror or exc}")])


def iter_files(paths: Iterable[Path]) -> Iterator[LoadedFile]:
    """Load every file under `paths`, one `LoadedFile` per file (or per missing path)."""
    for item in document_files(paths):
        if isinstance(item, Skipped):
            yield LoadedFile(Path(item.path), [], [item])
        else:
            yield load_file(*item)
