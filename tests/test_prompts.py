"""Tests for extractor.prompts: building MusicCaps prompt files and loading prompt files."""

from __future__ import annotations

import collections
import csv
import json
import os
import re
import sys
import types
from pathlib import Path

import pytest

from extractor import prompts
from extractor.prompts import (
    BUNDLED, META_FILENAME, Prompt, PromptError, PromptsConfig, build_prompts, bundled_prompts,
    load_prompt_file, main, normalize_tag,
)

HEADER = ["ytid", "start_s", "end_s", "audioset_positive_labels", "aspect_list", "caption",
          "author_id", "is_balanced_subset", "is_audioset_eval"]
# (ytid, aspect_list literal, caption, is_balanced_subset) in dataset order.
ROWS = [
    ("yt0", "['low quality', 'Sad']", "A calm piano piece, soft and slow.", "True"),
    ("yt1", "['rock', 'distorted  guitar']", 'Loud rock, with "shouted"\r\nvocals  and\tdrums.', "False"),
    ("yt2", "['silence']", "   ", "False"),
    ("yt3", "['duplicate']", " A calm piano  piece, soft and slow.\n", "True"),
    ("yt4", "[]", "An upbeat electronic track.", "False"),
    ("yt5", "['jazz', 'jazz ', 'sax']", "Smoky jazz with a saxophone.", "True"),
    ("yt6", "['folk']", "A folk song, with fiddle.", "False"),
]
KEPT = ["yt0", "yt1", "yt4", "yt5", "yt6"]  # empty caption yt2 skipped, duplicate yt3 dropped


def write_csv(path: Path, header: list[str] = HEADER, rows=ROWS) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\r\n")  # MusicCaps ships with CRLF line endings
        writer.writerow(header)
        for ytid, aspects, caption, balanced in rows:
            row = dict(zip(HEADER, [ytid, "30", "40", "/m/0140xf,/m/02cjck", aspects, caption, "4", balanced, "False"]))
            writer.writerow([row[c] for c in header])
    return path


def build(tmp_path: Path, **kw) -> dict[str, Path]:
    kw.setdefault("csv", write_csv(tmp_path / "musiccaps-public.csv"))
    return build_prompts(PromptsConfig(out=tmp_path / "out", **kw))


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def meta(path: Path) -> list[dict]:
    return [json.loads(line) for line in lines(path)]


def test_sizes_are_prefixes_of_full_and_meta_follows_full(tmp_path):
    paths = build(tmp_path, quick_test_size=2, medium_size=4)
    full = lines(paths["full"])
    assert lines(paths["quick_test"]) == full[:2]
    assert lines(paths["medium"]) == full[:4]
    assert [r["caption"] for r in meta(paths["meta"])] == full
    assert [r["ytid"] for r in meta(paths["meta"])] == KEPT


def test_default_sizes_hold_everything_when_dataset_is_small(tmp_path):
    paths = build(tmp_path)
    assert all(len(lines(paths[name])) == len(KEPT) for name in ("quick_test", "medium", "full", "meta"))


def test_captions_flattened_deduplicated_first_kept(tmp_path):
    full = lines(build(tmp_path)["full"])
    assert full[0] == "A calm piano piece, soft and slow."
    assert full[1] == 'Loud rock, with "shouted" vocals and drums.'
    assert len(full) == len(set(full)) == len(KEPT)
    assert all(line and line == line.strip() for line in full)


def test_meta_fields_and_types(tmp_path):
    records = meta(build(tmp_path)["meta"])
    assert set(records[0]) == {"ytid", "caption", "aspect_list", "audioset_labels", "is_balanced_subset", "start_s", "end_s"}
    assert records[0]["aspect_list"] == ["low quality", "sad"]
    assert records[1]["aspect_list"] == ["rock", "distorted guitar"]
    assert records[3]["aspect_list"] == ["jazz", "sax"]  # tags normalised and deduplicated
    assert records[0]["audioset_labels"] == ["/m/0140xf", "/m/02cjck"]
    assert [r["is_balanced_subset"] for r in records] == [True, False, False, True, False]
    assert all(type(r["start_s"]) is float and type(r["end_s"]) is float for r in records)


def test_shuffle_is_a_deterministic_permutation(tmp_path):
    plain = lines(build(tmp_path)["full"])
    orders = [lines(build(tmp_path, shuffle=True, seed=seed)["full"]) for seed in (7, 7, 8, 9, 10)]
    assert orders[0] == orders[1]
    assert all(sorted(order) == sorted(plain) for order in orders)
    assert any(order != plain for order in orders)


def test_failed_write_leaves_previous_files_and_no_temp_files(tmp_path, monkeypatch):
    paths = build(tmp_path)
    before = {p: p.read_bytes() for p in paths.values()}

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(prompts.os, "replace", fail)
    with pytest.raises(OSError):
        build(tmp_path, shuffle=True, seed=1)
    assert {p: p.read_bytes() for p in paths.values()} == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in paths.values())


@pytest.mark.parametrize(
    ("make_csv", "expected"),
    [
        (lambda d: d / "absent.csv", "not found"),
        (lambda d: write_csv(d / "c.csv", header=[c for c in HEADER if c != "caption"]), "missing column(s) caption"),
        (lambda d: write_csv(d / "c.csv", rows=[]), "no rows with a non-empty caption"),
        (lambda d: write_csv(d / "c.csv", rows=[("y", "['a'", "Text.", "True")]), "malformed aspect_list"),
    ],
)
def test_bad_csv_raises_prompt_error_and_main_exits_with_one_line(tmp_path, make_csv, expected):
    path = make_csv(tmp_path)
    with pytest.raises(PromptError, match=re.escape(expected)) as info:
        build(tmp_path, csv=path)
    assert str(path) in str(info.value)
    with pytest.raises(SystemExit) as exit_info:
        main(["--csv", str(path), "--out", str(tmp_path / "out")])
    message = str(exit_info.value)
    assert message.startswith("error: ") and expected in message and "\n" not in message
    assert not (tmp_path / "out" / "musiccaps_prompts_full.txt").exists()


def test_hub_without_datasets_points_to_csv(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(SystemExit) as info:
        main(["--out", str(tmp_path)])
    assert "--csv PATH" in str(info.value)


def test_hub_rows_with_native_types_match_csv_rows(tmp_path, monkeypatch):
    hub_rows = [
        dict(zip(HEADER, [y, 30, 40, "/m/0140xf,/m/02cjck", a, c, 4, b == "True", False])) for y, a, c, b in ROWS
    ]
    fake = types.SimpleNamespace(load_dataset=lambda name, split: hub_rows)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    from_hub = build_prompts(PromptsConfig(out=tmp_path / "hub"))
    from_csv = build(tmp_path)
    assert meta(from_hub["meta"]) == meta(from_csv["meta"])


def test_main_prints_one_summary_line_per_file(tmp_path, capsys):
    csv_path = write_csv(tmp_path / "m.csv")
    paths = main(["--csv", str(csv_path), "--out", str(tmp_path / "o"), "--quick_test_size", "3"])
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4 and all(str(p) in line for p, line in zip(paths.values(), out))
    assert "(3 prompts)" in out[0] and f"({len(KEPT)} prompts)" in out[2]


def test_txt_with_sibling_meta_gets_tags_and_source_ids(tmp_path):
    paths = build(tmp_path, quick_test_size=2)
    assert paths["meta"] == paths["quick_test"].parent / META_FILENAME
    loaded = load_prompt_file(paths["quick_test"])
    assert [p.text for p in loaded] == lines(paths["quick_test"])
    assert loaded[0].tags == ("low quality", "sad") and loaded[0].source_id == "yt0"
    assert loaded[1].meta["is_balanced_subset"] is False


def test_txt_without_meta_and_jsonl(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("first prompt\n\n  second   prompt \n", encoding="utf-8")
    assert load_prompt_file(txt) == [Prompt("first prompt"), Prompt("second prompt")]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps({"id": "x1", "caption": "Sad  piano.", "aspect_list": [" Sad ", "Piano"], "mood": "sad"}) + "\n")
    [prompt] = load_prompt_file(jsonl)
    assert prompt == Prompt("Sad piano.", ("sad", "piano"), "x1") and prompt.meta == {"mood": "sad"}


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_or_missing_prompt_file_raises(tmp_path, content):
    (tmp_path / "empty.txt").write_text(content)
    with pytest.raises(PromptError, match="no prompts in"):
        load_prompt_file(tmp_path / "empty.txt")
    with pytest.raises(PromptError, match="nothere.txt"):
        load_prompt_file(tmp_path / "nothere.txt")


def test_bundled_set_is_a_balanced_grid():
    bundled = load_prompt_file(BUNDLED)
    assert bundled == bundled_prompts() and len(bundled) >= 40
    assert len({p.text for p in bundled}) == len(bundled)
    assert all(len(p.tags) == 4 and all(t == normalize_tag(t) for t in p.tags) for p in bundled)
    for axis, name in enumerate(("genre", "instrument", "tempo", "mood")):
        counts = collections.Counter(p.tags[axis] for p in bundled)
        assert counts == collections.Counter(p.meta[name] for p in bundled)
        assert min(counts.values()) >= 3, (name, counts)


def test_normalize_tag():
    assert normalize_tag("  Distorted \t Electric  GUITAR ") == "distorted electric guitar"


def real_csv() -> Path:
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "musiccaps-public.csv"
    path = Path(os.environ.get("MUSICCAPS_CSV", default))
    if not path.is_file():
        pytest.skip(f"MusicCaps CSV not found at {path}; set MUSICCAPS_CSV")
    return path


def test_real_musiccaps_csv(tmp_path):
    paths = build_prompts(PromptsConfig(csv=real_csv(), out=tmp_path))
    raw = {name: paths[name].read_text(encoding="utf-8") for name in ("quick_test", "medium", "full")}
    counts = {name: len(text.splitlines()) for name, text in raw.items()}
    assert counts["quick_test"] == 200 and counts["medium"] == 1000
    assert 5000 <= counts["full"] <= 5521
    assert len(lines(paths["meta"])) == counts["full"]
    # One caption per line: no stray carriage returns from the CRLF source, no blank lines.
    assert all("\r" not in text and text.count("\n") == counts[name] for name, text in raw.items())
    assert all(line.strip() for line in raw["full"].splitlines())
