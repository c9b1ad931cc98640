from __future__ import annotations

import json
from pathlib import Path

from retrieval.loaders import iter_files, load_file, parse_html, parse_markdown
from tests.retrieval.pdfgen import write_pdf


def _load_all(*paths: Path):
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
    path = tmp_path / "notes.docx"
    path.write_bytes(b"PK\x03\x04")
    loaded = load_file(path, path.name)
    assert loaded.documents == []
    assert loaded.skipped[0].reason == "unsupported file type .docx"


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
