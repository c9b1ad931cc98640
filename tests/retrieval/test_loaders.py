from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from retrieval.documents import Document, Skipped
from retrieval.loaders import LoadedFile, iter_files, load_file, parse_html, parse_markdown, parse_rst
from tests.retrieval.pdfgen import write_pdf


def _load_all(*paths: Path) -> tuple[list[LoadedFile], list[Document], list[Skipped]]:
    files = list(iter_files(paths))
    documents = [d for f in files for d in f.documents]
    skipped = [s for f in files for s in f.skipped]
    return files, documents, skipped


def test_markdown_headings_become_heading_paths() -> None:
    title, blocks = parse_markdown(
        "---\ntitle: Front Matter Title\n---\n# Guide\n\nIntro text.\n\n## Setup\n\nStep one\ncontinues here.\n\n"
        "### Details\n\nDeep text.\n\n## Usage\n\nUse it [like this](http://x).\n\n```\ncode # not a heading\n```\n"
    )
    assert title == "Front Matter Title"
    assert [(b.heading_path, b.text) for b in blocks] == [
        (("Guide",), "Intro text."),
        (("Guide", "Setup"), "Step one continues here."),
        (("Guide", "Setup", "Details"), "Deep text."),
        (("Guide", "Usage"), "Use it like this."),
        (("Guide", "Usage"), "code # not a heading"),
    ]


def test_markdown_setext_headings() -> None:
    title, blocks = parse_markdown("Title Here\n==========\n\nBody.\n\nPart\n----\n\nMore.\n")
    assert title == "Title Here"
    assert [b.heading_path for b in blocks] == [("Title Here",), ("Title Here", "Part")]


def test_html_blocks_follow_headings_and_drop_scripts() -> None:
    title, blocks = parse_html(
        "<html><head><title>Page</title><script>var secret = 1;</script></head><body>"
        "<h1>Top</h1><p>First <b>para</b>.</p><h2>Sub</h2><ul><li>Item <p>nested</p></li></ul>"
        "<h2>Other</h2><p>Last.</p></body></html>"
    )
    assert title == "Page"
    assert [(b.heading_path, b.text) for b in blocks] == [
        (("Top",), "First para ."),
        (("Top", "Sub"), "Item nested"),
        (("Top", "Other"), "Last."),
    ]
    assert all("secret" not in b.text for b in blocks)


def test_each_format_loads_with_ids_relative_to_the_folder(tmp_path: Path) -> None:
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("Plain paragraph one.\n\nParagraph two.\n")
    (root / "sub" / "b.md").write_text("# Bee\n\nMarkdown body.\n")
    (root / "c.html").write_text("<h1>See</h1><p>HTML body.</p>")
    write_pdf(root / "d.pdf", ["The PDF paragraph about walruses."], title="Dee")
    (root / "e.jsonl").write_text(
        json.dumps({"id": "faq-1", "title": "Q1", "text": "Answer one.", "source": "http://x/1", "lang": "en"})
        + "\n"
        + json.dumps({"text": "Answer two without id."})
        + "\n"
    )
    _, documents, skipped = _load_all(root)
    assert skipped == []
    by_id = {d.id: d for d in documents}
    assert set(by_id) == {"a.txt", "sub/b.md", "c.html", "d.pdf", "faq-1", "e.jsonl#2"}
    assert by_id["sub/b.md"].title == "Bee"
    assert by_id["c.html"].title == "See"
    assert by_id["d.pdf"].title == "Dee"
    assert "walruses" in by_id["d.pdf"].text
    assert by_id["faq-1"].source == "http://x/1"
    assert by_id["faq-1"].metadata == {"lang": "en"}
    assert by_id["a.txt"].text == "Plain paragraph one.\n\nParagraph two."


def test_bad_files_are_reported_and_skipped(tmp_path: Path) -> None:
    root = tmp_path / "docs"
    root.mkdir()
    (root / "good.md").write_text("# Good\n\nThis one is fine.\n")
    (root / "empty.txt").write_text("")
    (root / "blank.md").write_text("\n\n   \n")
    (root / "broken.pdf").write_bytes(b"%PDF-1.4\nthis is not really a pdf\n")
    (root / "binary.txt").write_bytes(b"\x00\x01\x02garbage")
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (root / "image.png").write_bytes(b"\x89PNG....")
    (root / "lines.jsonl").write_text('{"id": "ok", "text": "fine"}\nnot json\n{"id": "no-text"}\n')
    (root / ".hidden.md").write_text("# Hidden\n\nnot ingested")
    files, documents, skipped = _load_all(root, tmp_path / "missing")
    assert sorted(d.id for d in documents) == ["good.md", "ok"]
    reasons = {Path(s.path).name: s.reason for s in skipped}
    assert reasons["empty.txt"] == "empty file"
    assert reasons["blank.md"].startswith("empty")
    assert reasons["broken.pdf"].startswith("unreadable PDF")
    assert reasons["binary.txt"].startswith("binary")
    assert reasons["latin1.txt"].startswith("not valid UTF-8")
    assert reasons["image.png"] == "unsupported file type .png"
    assert reasons["missing"] == "not found"
    assert reasons["lines.jsonl:2"].startswith("invalid JSON")
    assert reasons["lines.jsonl:3"].startswith("no text")
    assert not any("hidden" in s.path for s in skipped)
    assert len(files) == 9  # eight visible files plus the missing path


def test_unsupported_single_file(tmp_path: Path) -> None:
    path = tmp_path / "slides.pptx"
    path.write_bytes(b"PK\x03\x04")
    loaded = load_file(path, path.name)
    assert loaded.documents == []
    assert loaded.skipped[0].reason == "unsupported file type .pptx"


def test_multi_page_pdf_keeps_all_pages(tmp_path: Path) -> None:
    # wrapped paragraphs of two to three lines, as in a real document
    paragraphs = [
        f"Paragraph number {i} talks about topic {i}. " + "It goes on for a while. " * (3 + i % 3) for i in range(40)
    ]
    path = write_pdf(tmp_path / "long.pdf", paragraphs, lines_per_page=30)
    loaded = load_file(path, "long.pdf")
    document = loaded.documents[0]
    assert "topic 0." in document.text and "topic 39." in document.text
    # paragraph ends are recovered from the line layout (pypdf gives no blank lines)
    assert len(document.blocks) == 40
    assert all(block.text.startswith("Paragraph number") for block in document.blocks)


# --- .docx, .rst, .csv/.tsv, .json -----------------------------------------------------------

_W_NS = "http://schemas.openxmlformats.org/wordprocessingml/2006/main"


def _w_paragraph(*runs: str, style: str | None = None) -> str:
    """A w:p; each run is XML for the run's content (w:t, w:tab, w:br)."""
    properties = f'<w:pPr><w:pStyle w:val="{style}"/></w:pPr>' if style else ""
    return f"<w:p>{properties}" + "".join(f"<w:r>{run}</w:r>" for run in runs) + "</w:p>"


def _t(text: str) -> str:
    return f'<w:t xml:space="preserve">{text}</w:t>'


def _write_docx(path: Path, body: str, core_title: str | None = None, parts: dict[str, bytes] | None = None) -> Path:
    document = (
        f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?><w:document xmlns:w="{_W_NS}">'
        f"<w:body>{body}<w:sectPr/></w:body></w:document>"
    )
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("[Content_Types].xml", '<?xml version="1.0"?><Types/>')
        archive.writestr("word/document.xml", document)
        if core_title is not None:
            archive.writestr(
                "docProps/core.xml",
                '<?xml version="1.0"?><cp:coreProperties xmlns:cp="http://schemas.openxmlformats.org/package/2006/'
                'metadata/core-properties" xmlns:dc="http://purl.org/dc/elements/1.1/">'
                f"<dc:title>{core_title}</dc:title></cp:coreProperties>",
            )
        for name, data in (parts or {}).items():
            archive.writestr(name, data)
    return path


_DOCX_BODY = (
    _w_paragraph(_t("Employee Handbook"), style="Title")
    + _w_paragraph(_t("Welcome to the "), _t("company."))
    + _w_paragraph(_t("Leave"), style="Heading1")
    + _w_paragraph(_t("Staff get"), "<w:tab/>", _t("25 days"), "<w:br/>", _t("of paid leave."))
    + _w_paragraph(_t("Carry-over"), style="Heading2")
    + _w_paragraph(_t("Five days carry over."))
    + _w_paragraph(_t("Equipment"), style="Heading1")
    + "<w:tbl><w:tr><w:tc>"
    + _w_paragraph(_t("Item"))
    + "</w:tc><w:tc>"
    + _w_paragraph(_t("Owner"))
    + "</w:tc></w:tr><w:tr><w:tc>"
    + _w_paragraph(_t("Laptop"))
    + "</w:tc><w:tc>"
    + _w_paragraph(_t("IT"))
    + _w_paragraph(_t("desk"))
    + "</w:tc></w:tr></w:tbl>"
)


def test_docx_paragraphs_headings_and_tables(tmp_path: Path) -> None:
    path = _write_docx(tmp_path / "handbook.docx", _DOCX_BODY, core_title="Core Title")
    document = load_file(path, "handbook.docx").documents[0]
    assert document.title == "Employee Handbook"  # the Title paragraph wins over core.xml
    assert document.format == "docx"
    assert [(b.heading_path, b.text) for b in document.blocks] == [
        ((), "Welcome to the company."),
        (("Leave",), "Staff get 25 days of paid leave."),
        (("Leave", "Carry-over"), "Five days carry over."),
        (("Equipment",), "Item | Owner"),
        (("Equipment",), "Laptop | IT desk"),
    ]


def test_docx_title_falls_back_to_core_properties_then_file_name(tmp_path: Path) -> None:
    body = _w_paragraph(_t("Only a paragraph."))
    with_core = _write_docx(tmp_path / "a.docx", body, core_title="Core Title")
    without = _write_docx(tmp_path / "travel_policy.docx", body)
    assert load_file(with_core, "a.docx").documents[0].title == "Core Title"
    assert load_file(without, "travel_policy.docx").documents[0].title == "Travel policy"


def test_docx_localised_heading_styles_resolve_through_styles_xml(tmp_path: Path) -> None:
    styles = (
        f'<?xml version="1.0"?><w:styles xmlns:w="{_W_NS}">'
        '<w:style w:styleId="berschrift1"><w:name w:val="heading 1"/></w:style></w:styles>'
    ).encode()
    body = _w_paragraph(_t("Urlaub"), style="berschrift1") + _w_paragraph(_t("Text."))
    path = _write_docx(tmp_path / "de.docx", body, parts={"word/styles.xml": styles})
    assert load_file(path, "de.docx").documents[0].blocks[0].heading_path == ("Urlaub",)


def test_bad_docx_files_are_skipped_with_a_reason(tmp_path: Path) -> None:
    not_zip = tmp_path / "corrupt.docx"
    not_zip.write_bytes(b"this is not a zip archive at all")
    no_document = tmp_path / "nodoc.docx"
    with zipfile.ZipFile(no_document, "w") as archive:
        archive.writestr("word/other.xml", "<x/>")
    bad_xml = _write_docx(tmp_path / "badxml.docx", "<w:p><w:r>")
    doctype = tmp_path / "doctype.docx"
    with zipfile.ZipFile(doctype, "w") as archive:
        archive.writestr("word/document.xml", '<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><x>&a;</x>')
    reasons = {}
    for path in (not_zip, no_document, bad_xml, doctype):
        loaded = load_file(path, path.name)
        assert loaded.documents == []
        reasons[path.name] = loaded.skipped[0].reason
    assert reasons["corrupt.docx"] == "not a .docx: not a zip archive"
    assert reasons["nodoc.docx"] == "not a Word document: no word/document.xml"
    assert reasons["badxml.docx"].startswith("word/document.xml is not valid XML")
    assert reasons["doctype.docx"] == "word/document.xml has a DOCTYPE"


def test_docx_zip_bomb_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("retrieval.loaders._DOCX_PART_LIMIT", 1000)  # 50 MB in production
    path = _write_docx(tmp_path / "bomb.docx", _w_paragraph(_t("x" * 5000)))
    loaded = load_file(path, "bomb.docx")
    assert loaded.documents == []
    assert "uncompressed (limit 1000)" in loaded.skipped[0].reason


def test_rst_headings_directives_and_inline_markup() -> None:
    title, blocks = parse_rst(
        ".. _top:\n\n=======\n Guide\n=======\n\n"
        "Intro with ``pip``, *soft*, **hard** and `the site <http://x>`_ and :ref:`setup <setup-label>`.\n\n"
        "Setup\n=====\n\nRun this::\n\n    pip install thing\n\n"
        ".. note:: Keep the **key** safe.\n   It matters.\n\n"
        ".. image:: pic.png\n   :alt: A hidden picture\n\n"
        ".. this comment is dropped\n   with its body\n\n"
        "Details\n-------\n\nDeep text\non two lines.\n\n"
        "Usage\n=====\n\n.. warning::\n   :class: big\n\n   Do not run as root.\n"
    )
    assert title == "Guide"
    assert [(b.heading_path, b.text) for b in blocks] == [
        (("Guide",), "Intro with pip, soft, hard and the site and setup."),
        (("Guide", "Setup"), "Run this:"),
        (("Guide", "Setup"), "pip install thing"),
        (("Guide", "Setup"), "Keep the key safe. It matters."),
        (("Guide", "Setup", "Details"), "Deep text on two lines."),
        (("Guide", "Usage"), "Do not run as root."),
    ]


def test_rst_that_parses_badly_still_gives_its_text() -> None:
    title, blocks = parse_rst("Too long a title\n---\n\n.. unknown\n\nplain text *unclosed and `odd\n")
    assert title is None
    assert [b.text for b in blocks] == ["Too long a title ---", "plain text *unclosed and `odd"]


def test_csv_and_tsv_rows_become_blocks_named_by_the_header(tmp_path: Path) -> None:
    (tmp_path / "prices.csv").write_text('product;price;note\nWidget;"3,50";\n;;\nGadget;;"big, red"\n')
    (tmp_path / "people.tsv").write_text("name\tteam\temail\nAda\t\tada@x\nBob\tOps\t\n")
    documents = {d.id: d for f in iter_files([tmp_path]) for d in f.documents}
    prices = documents["prices.csv"]
    assert prices.title == "Prices" and prices.format == "csv"
    assert [b.text for b in prices.blocks] == ["product: Widget; price: 3,50", "product: Gadget; note: big, red"]
    assert [b.text for b in documents["people.tsv"].blocks] == ["name: Ada; email: ada@x", "name: Bob; team: Ops"]


def test_csv_with_only_a_header_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "header.csv"
    path.write_text("a,b,c\n")
    assert load_file(path, path.name).skipped[0].reason.startswith("empty")


def test_json_array_documents_object_and_single_record(tmp_path: Path) -> None:
    (tmp_path / "array.json").write_text(
        json.dumps([{"id": "a-1", "title": "First", "text": "Alpha text.", "lang": "en"}, {"body": "Beta text."}])
    )
    (tmp_path / "wrapped.json").write_text(
        json.dumps({"documents": [{"content": "Gamma text.", "url": "http://g"}, {"title": "no text here"}]})
    )
    (tmp_path / "single_note.json").write_text(json.dumps({"text": "Delta text.", "author": "me"}))
    files = {f.path.name: f for f in iter_files([tmp_path])}
    documents = {d.id: d for f in files.values() for d in f.documents}
    assert set(documents) == {"a-1", "array.json#2", "wrapped.json#1", "single_note.json"}
    assert documents["a-1"].title == "First" and documents["a-1"].metadata == {"lang": "en"}
    assert documents["array.json#2"].text == "Beta text." and documents["array.json#2"].source == "array.json#2"
    assert documents["wrapped.json#1"].source == "http://g"
    single = documents["single_note.json"]
    assert (single.title, single.text, single.metadata, single.format) == (
        "Single note",
        "Delta text.",
        {"author": "me"},
        "json",
    )
    assert [(Path(s.path).name, s.reason) for s in files["wrapped.json"].skipped] == [
        ("wrapped.json#2", "no text (expected a 'text' field)")
    ]


def test_bad_json_files_are_skipped_with_a_reason(tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text('{"text": "unterminated')
    (tmp_path / "notext.json").write_text('{"title": "no text", "tags": ["a"]}')
    (tmp_path / "number.json").write_text("42")
    (tmp_path / "empty.json").write_text("[]")
    reasons = {Path(s.path).name: s.reason for f in iter_files([tmp_path]) for s in f.skipped}
    assert reasons["broken.json"].startswith("invalid JSON: Unterminated string")
    assert reasons["notext.json"] == "no text (expected a 'text' field)"
    assert reasons["number.json"] == "expected a JSON object or array"
    assert reasons["empty.json"] == "empty: no records"


def test_a_folder_with_each_new_type_ingests_their_sentences(tmp_path: Path) -> None:
    _write_docx(tmp_path / "word.docx", _DOCX_BODY)
    (tmp_path / "guide.rst").write_text("Guide\n=====\n\nThe **rst** sentence about otters.\n")
    (tmp_path / "table.csv").write_text("animal,habitat\nbadger,sett\n")
    (tmp_path / "table.tsv").write_text("animal\thabitat\nbeaver\tlodge\n")
    (tmp_path / "records.json").write_text(json.dumps({"items": [{"text": "The JSON sentence about herons."}]}))
    files = list(iter_files([tmp_path]))
    assert [s for f in files for s in f.skipped] == []
    text = {d.id: d.text for f in files for d in f.documents}
    assert "Staff get 25 days of paid leave." in text["word.docx"]
    assert text["guide.rst"] == "The rst sentence about otters."
    assert text["table.csv"] == "animal: badger; habitat: sett"
    assert text["table.tsv"] == "animal: beaver; habitat: lodge"
    assert text["records.json#1"] == "The JSON sentence about herons."
