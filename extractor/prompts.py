"""Text prompts: build prompt files from MusicCaps and load prompt files (stdlib only)."""

from __future__ import annotations

import ast
import csv
import json
import os
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from sae_core.cli import run_main
from sae_core.errors import UsageError
from sae_core.files import write_all

BUNDLED = "bundled"
META_FILENAME = "musiccaps_meta.jsonl"
SIZED_FILES = ("quick_test", "medium", "full")
REQUIRED_COLUMNS = (
    "ytid", "start_s", "end_s", "audioset_positive_labels", "aspect_list", "caption", "is_balanced_subset",
)
_CSV_HINT = "pass --csv PATH to a local musiccaps-public.csv (https://www.kaggle.com/datasets/googleai/musiccaps)"


class PromptError(UsageError):
    """A prompt source or prompt file is missing or malformed; the message says how to fix it."""


@dataclass(frozen=True)
class Prompt:
    """One text prompt with its tags (normalised aspect list) and where it came from."""

    text: str
    tags: tuple[str, ...] = ()
    source_id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class PromptsConfig:
    """Options of `python -m extractor.prompts`."""

    csv: Path | None = None
    """Local musiccaps-public.csv; when omitted, MusicCaps is loaded from the Hugging Face hub."""
    out: Path = Path("data")
    """Directory that receives the prompt txt files and musiccaps_meta.jsonl."""
    shuffle: bool = False
    """Shuffle the deduplicated captions before splitting (default keeps the dataset's order)."""
    seed: int = 0
    """Seed of the shuffle."""
    quick_test_size: int = 200
    """Number of captions in musiccaps_prompts_quick_test.txt."""
    medium_size: int = 1000
    """Number of captions in musiccaps_prompts_medium.txt."""
    hub_dataset: str = "google/MusicCaps"
    """Hugging Face dataset id used when --csv is not given."""

    def __post_init__(self) -> None:
        if self.quick_test_size < 1 or self.medium_size < 1:
            raise PromptError(
                f"quick_test_size and medium_size must be >= 1, got {self.quick_test_size} and {self.medium_size}"
            )


def normalize_tag(tag: str) -> str:
    """Lowercases a tag, strips it and collapses whitespace runs to one space."""
    return " ".join(tag.lower().split())


def flatten_text(text: str) -> str:
    """Puts a caption on one line: newlines and whitespace runs become single spaces."""
    return " ".join(text.split())


def _tags(values: Iterable[str]) -> tuple[str, ...]:
    """Normalised, non-empty tags with duplicates dropped, first occurrence kept."""
    return tuple(dict.fromkeys(t for t in map(normalize_tag, values) if t))


def _csv_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise PromptError(f"MusicCaps CSV not found: {path}; {_CSV_HINT}, or omit --csv to use the hub")
    try:
        # utf-8-sig tolerates a BOM left by spreadsheet exports.
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise PromptError(
                    f"{path} is missing column(s) {', '.join(missing)}; expected the MusicCaps "
                    f"musiccaps-public.csv header ({','.join(REQUIRED_COLUMNS)},...)"
                )
            return list(reader)
    except (UnicodeDecodeError, csv.Error) as e:
        raise PromptError(f"{path} is not a readable UTF-8 CSV ({e}); {_CSV_HINT}") from e


def _hub_rows(dataset_id: str) -> list[dict[str, Any]]:
    try:
        import datasets  # lazy: optional and heavy
    except ImportError as e:
        raise PromptError(f"the `datasets` package is not installed, so {dataset_id} cannot be fetched; {_CSV_HINT}") from e
    try:
        return list(datasets.load_dataset(dataset_id, split="train"))
    except Exception as e:  # noqa: BLE001 - offline, auth or a renamed dataset all have one fix: the local CSV
        reason = (str(e).splitlines() or [""])[0][:200]
        raise PromptError(f"could not load {dataset_id} from the Hugging Face hub ({type(e).__name__}: {reason}); {_CSV_HINT}") from e


def _parse_row(row: dict[str, Any], where: str) -> dict[str, Any] | None:
    """One MusicCaps row as a meta record, or None when its caption is empty."""
    caption = flatten_text(str(row.get("caption") or ""))
    if not caption:
        return None
    aspects = row.get("aspect_list") or "[]"
    try:
        # The hub and the CSV both store the aspect list as a Python list literal in a string.
        aspects = ast.literal_eval(aspects) if isinstance(aspects, str) else aspects
        if not isinstance(aspects, (list, tuple)) or not all(isinstance(a, str) for a in aspects):
            raise ValueError("not a list of strings")
        start_s, end_s = float(row.get("start_s")), float(row.get("end_s"))
    except (ValueError, TypeError, SyntaxError, RecursionError) as e:
        raise PromptError(f"{where}: malformed aspect_list/start_s/end_s ({e}); is this the MusicCaps CSV?") from e
    labels = str(row.get("audioset_positive_labels") or "")
    return {
        "ytid": str(row.get("ytid") or ""),
        "caption": caption,
        "aspect_list": list(_tags(aspects)),
        "audioset_labels": [label.strip() for label in labels.split(",") if label.strip()],
        "is_balanced_subset": str(row.get("is_balanced_subset")).strip().lower() == "true",
        "start_s": start_s,
        "end_s": end_s,
    }


def musiccaps_records(rows: Iterable[dict[str, Any]], source: str) -> list[dict[str, Any]]:
    """Meta records of MusicCaps rows, empty captions skipped, deduplicated on the flattened caption."""
    records: dict[str, dict[str, Any]] = {}
    for n, row in enumerate(rows, start=1):
        record = _parse_row(row, f"{source} data row {n}")
        if record is not None:
            records.setdefault(record["caption"], record)
    if not records:
        raise PromptError(f"{source} has no rows with a non-empty caption; pass the full musiccaps-public.csv")
    return list(records.values())


def build_prompts(cfg: PromptsConfig) -> dict[str, Path]:
    """Writes the quick_test/medium/full prompt files and musiccaps_meta.jsonl; returns their paths."""
    if cfg.csv is not None:
        records = musiccaps_records(_csv_rows(cfg.csv), str(cfg.csv))
    else:
        records = musiccaps_records(_hub_rows(cfg.hub_dataset), cfg.hub_dataset)
    if cfg.shuffle:
        random.Random(cfg.seed).shuffle(records)
    captions = [r["caption"] for r in records]
    sizes = {"quick_test": cfg.quick_test_size, "medium": cfg.medium_size, "full": len(captions)}
    cfg.out.mkdir(parents=True, exist_ok=True)
    paths = {name: cfg.out / f"musiccaps_prompts_{name}.txt" for name in SIZED_FILES}
    paths["meta"] = cfg.out / META_FILENAME
    contents = {paths[name]: "".join(c + "\n" for c in captions[: sizes[name]]) for name in SIZED_FILES}
    contents[paths["meta"]] = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    write_all(contents)  # no reader sees a half-written file
    counts = {name: min(size, len(captions)) for name, size in sizes.items()} | {"meta": len(records)}
    for name, path in paths.items():
        print(f"wrote {path} ({counts[name]} prompts)")
    return paths


def _prompt_from_record(obj: dict[str, Any]) -> Prompt:
    source_id = obj.get("ytid", obj.get("id"))
    extra = {k: v for k, v in obj.items() if k not in ("caption", "aspect_list", "ytid", "id")}
    return Prompt(
        text=flatten_text(str(obj["caption"])),
        tags=_tags(obj.get("aspect_list") or ()),
        source_id=None if source_id is None else str(source_id),
        meta=extra,
    )


def _records_from_jsonl(text: str, source: str) -> list[dict[str, Any]]:
    records = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptError(f"{source} line {n} is not valid JSON ({e.msg})") from e
        if not isinstance(obj, dict) or not isinstance(obj.get("caption"), str):
            raise PromptError(f'{source} line {n} has no "caption" string; each line must be a JSON object with one')
        aspects = obj.get("aspect_list", [])
        if not isinstance(aspects, list) or not all(isinstance(a, str) for a in aspects):
            raise PromptError(f'{source} line {n}: "aspect_list" must be a list of strings')
        if flatten_text(obj["caption"]):
            records.append(obj)
    return records


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise PromptError(f"prompt file not found: {path}; build one with `python -m extractor.prompts` or use {BUNDLED!r}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise PromptError(f"cannot read prompt file {path} ({e})") from e


def _prompts_or_error(prompts: list[Prompt], source: str) -> list[Prompt]:
    if not prompts:
        raise PromptError(f"no prompts in {source}; it must hold one prompt per line (.txt) or caption objects (.jsonl)")
    return prompts


def bundled_prompts() -> list[Prompt]:
    """The 48 genre x instrument x tempo x mood prompts shipped with the package."""
    resource = resources.files("extractor").joinpath("data/bundled_prompts.jsonl")
    records = _records_from_jsonl(resource.read_text(encoding="utf-8"), "bundled_prompts.jsonl")
    return _prompts_or_error([_prompt_from_record(r) for r in records], "bundled_prompts.jsonl")


def load_prompt_file(path: str | os.PathLike[str]) -> list[Prompt]:
    """Reads a .txt (one prompt a line) or .jsonl prompt file; "bundled" gives the bundled set."""
    if str(path) == BUNDLED:
        return bundled_prompts()
    path = Path(path)
    text = _read_text(path)
    if path.suffix == ".jsonl":
        prompts = [_prompt_from_record(r) for r in _records_from_jsonl(text, str(path))]
        return _prompts_or_error(prompts, str(path))
    meta_path = path.parent / META_FILENAME
    by_caption: dict[str, dict[str, Any]] = {}
    if meta_path.is_file():
        for record in _records_from_jsonl(_read_text(meta_path), str(meta_path)):
            by_caption.setdefault(flatten_text(record["caption"]), record)
    prompts = []
    for line in text.splitlines():
        caption = flatten_text(line)
        if caption:
            record = by_caption.get(caption)
            prompts.append(_prompt_from_record(record) if record else Prompt(text=caption))
    return _prompts_or_error(prompts, str(path))


def main(argv: list[str] | None = None) -> dict[str, Path]:
    """Entry point of `python -m extractor.prompts`; exits with a one-line error on bad input."""
    return run_main(
        PromptsConfig,
        argv,
        prog="python -m extractor.prompts",
        description="Build MusicCaps prompt files (quick_test, medium, full) and musiccaps_meta.jsonl.",
        run=build_prompts,
    )


if __name__ == "__main__":
    main()
