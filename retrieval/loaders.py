"""Turn files into `Document`s: .txt, .md, .html, .pdf and .jsonl.

Each loader returns the documents of one file or raises `LoaderError` with a short reason;
`iter_files` walks the paths given to an ingest and reports what it skips instead of failing.
A document's id is its path relative to the folder that was named (its file name when a file
was named); a .jsonl line uses its own `id` field.
"""

from __future__ import annotations

import json
import re
import warnings
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


# --- JSON lines -----------------------------------------------------------------------------

_TEXT_FIELDS = ("text", "content", "body")
_ID_FIELDS = ("id", "doc_id", "document_id")


@dataclass
class _JsonlResult:
    documents: list[Document] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def _first(obj: dict[str, Any], names: Iterable[str]) -> Any:
    for name in names:
        if obj.get(name) not in (None, ""):
            return obj[name]
    return None


def load_jsonl_lines(path: Path, doc_id: str) -> _JsonlResult:
    """One document per line: a text field (text/content/body) plus optional id, title, source."""
    result = _JsonlResult()
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
        if not isinstance(obj, dict):
            result.skipped.append(Skipped(where, "not a JSON object"))
            continue
        text = _first(obj, _TEXT_FIELDS)
        if not isinstance(text, str) or not text.strip():
            result.skipped.append(Skipped(where, "no text (expected a 'text' field)"))
            continue
        line_id = str(_first(obj, _ID_FIELDS) or f"{doc_id}#{number}")
        title = str(obj.get("title") or line_id)
        source = str(obj.get("source") or obj.get("url") or f"{doc_id}:{number}")
        known = {*_TEXT_FIELDS, *_ID_FIELDS, "title", "source", "url"}
        metadata = {key: value for key, value in obj.items() if key not in known}
        result.documents.append(
            Document(line_id, title, source, tuple(paragraphs(text)), format="jsonl", metadata=metadata)
        )
    if not result.documents and not result.skipped:
        raise LoaderError("empty: no lines")
    return result


def load_jsonl(path: Path, doc_id: str) -> list[Document]:
    return load_jsonl_lines(path, doc_id).documents


Loader = Callable[[Path, str], list[Document]]

LOADERS: dict[str, Loader] = {
    ".txt": load_text,
    ".text": load_text,
    ".md": load_markdown,
    ".markdown": load_markdown,
    ".html": load_html,
    ".htm": load_html,
    ".pdf": load_pdf,
    ".jsonl": load_jsonl,
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
        if loader is load_jsonl:
            lines = load_jsonl_lines(path, doc_id)
            return LoadedFile(path, lines.documents, lines.skipped)
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
