from gateway import citations as c

CITES = [
    {
        "index": 1,
        "collection": "sample",
        "document": "guide/a.md",
        "title": "A",
        "source": "guide/a.md",
        "chunk_id": "x1",
    },
    {"index": 2, "collection": "sample", "document": "b.md", "title": "B", "source": "b.md", "chunk_id": "y2"},
]


def test_annotations_point_at_markers_and_view_url() -> None:
    text = "Alpha [1]. Beta [2] and again [1]."
    out = c.url_annotations(text, CITES)
    spans = [(a["url_citation"]["start_index"], a["url_citation"]["end_index"]) for a in out]
    assert [text[s:e] for s, e in spans] == ["[1]", "[2]", "[1]"]
    assert out[0]["url_citation"]["url"] == "/v1/documents/sample/guide/a.md#chunk-x1"


def test_unmarked_citation_kept_and_base_url() -> None:
    out = c.url_annotations("no markers", CITES, {"sample": "https://docs.example.com/"})
    assert {a["url_citation"]["url"] for a in out} == {
        "https://docs.example.com/guide/a.md",
        "https://docs.example.com/b.md",
    }
    assert all(a["url_citation"]["start_index"] == len("no markers") for a in out)


def test_footer_and_strip() -> None:
    text = "Answer [1]." + c.footer(CITES)
    assert "[1] A (guide/a.md)" in text and c.strip_footer(text) == "Answer [1]."
