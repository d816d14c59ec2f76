"""``python -m extractor.extract``: MusicGen decoder activations into an activation store.

Work is cut into units (batches of consecutive samples, each seeded on its own); each unit's
rows are written and then committed, so a killed run resumes after its last committed unit
and ends with the same store, and ``--shard i/N`` processes fill disjoint units of one store.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from sae_core.errors import UsageError
from sae_core.location import Location
from .prompts import BUNDLED
from sae_core.store import (
    MLP_STREAMS,
    STORE_DTYPES,
    Store,
    StoreError,
    StoreMeta,
    acts_name,
    create_store,
    estimate_bytes,
    foreign_keys,
    remove_store,
)


class ExtractError(UsageError):
    """Extraction arguments that cannot work together."""


@dataclass(frozen=True)
class ExtractConfig:
    """Options of ``python -m extractor.extract``."""

    model: str = "facebook/musicgen-small"
    """Hub name (facebook/musicgen-{small,medium,large,melody,melody-large,stereo-*}), a local directory,
    tiny-random[-melody|-stereo|-stereo-melody], or random:FAMILY[:LAYERS]."""
    layers: str = "12"
    """Decoder layers to capture: 12 | 6,12,18 | 0-5,10 | all."""
    prompt_file: str = "data/musiccaps_prompts_quick_test.txt"
    """Prompts, one a line (.txt) or caption objects (.jsonl); 'bundled' for the packaged set."""
    batch_size: int = 8
    """Prompts per forward batch (also the unit of resumption)."""
    duration: float = 10.0
    """Seconds of audio to generate per prompt (generate mode)."""
    out: str = "data/activations"
    """Store to create or resume: a directory, or gs://bucket/prefix, s3://bucket/prefix[?endpoint=URL]."""
    device: str = "auto"
    """auto | cpu | cuda (cuda:N)."""
    mode: Literal["generate", "teacher_forced"] = "generate"
    """generate: sample audio and capture on the way; teacher_forced: one pass over existing codes."""
    guidance_scale: float = 3.0
    """Classifier-free guidance scale (<= 1 disables guidance)."""
    top_k: int = 250
    """Top-k sampling."""
    temperature: float = 1.0
    """Sampling temperature."""
    seed: int = 0
    """Base seed; batch b is sampled with seed + b."""
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    """Storage dtype of the activations."""
    model_dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    """Compute dtype of the model (auto: float16 on CUDA, float32 on CPU)."""
    shard: str = "0/1"
    """i/N: this process fills every N-th batch starting at i (one process per GPU)."""
    keep_uncond: bool = False
    """Also store the unconditional (null-text) guidance stream, as its own stream."""
    mlp: bool = False
    """Also store each chosen layer's MLP input (after its layer norm) and output (before the residual add),
    conditional stream, as the mlp_in and mlp_out streams: a transcoder's data."""
    codes_from: str | None = None
    """teacher_forced: an existing store whose codes and prompts to re-run."""
    audio_dir: str | None = None
    """Audio files (name.txt beside name.wav is its text). teacher_forced: encoded with the model's EnCodec
    (melody checkpoints: each file is also its own melody condition); generate: the melody condition of each
    generation (melody checkpoints only)."""
    max_prompts: int | None = None
    """Use only the first N prompts."""
    overwrite: bool = False
    """Replace an existing store made with different settings."""

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise ExtractError(f"--batch_size must be positive, got {self.batch_size}")
        if self.mode == "generate" and not self.duration > 0:
            raise ExtractError(f"--duration must be > 0 seconds, got {self.duration}")
        if self.max_prompts is not None and self.max_prompts <= 0:
            raise ExtractError(f"--max_prompts must be positive, got {self.max_prompts}")
        if self.top_k <= 0 or not self.temperature > 0:
            raise ExtractError("--top_k must be positive and --temperature > 0")
        parse_shard(self.shard)
        if self.mode == "teacher_forced":
            if (self.codes_from is None) == (self.audio_dir is None):
                raise ExtractError("--mode teacher_forced needs exactly one of --codes_from STORE or --audio_dir DIR")
            if self.keep_uncond:
                raise ExtractError("--keep_uncond applies to generate mode only")
        elif self.codes_from:
            raise ExtractError("--codes_from needs --mode teacher_forced")
        elif self.keep_uncond and not self.guidance_scale > 1:
            raise ExtractError(f"--keep_uncond stores the unconditional guidance stream, which --guidance_scale "
                               f"{self.guidance_scale} (<= 1: no guidance) does not run: pass --guidance_scale > 1 "
                               "or drop --keep_uncond")
        if self.dtype not in STORE_DTYPES:
            raise ExtractError(f"--dtype must be one of {STORE_DTYPES}")
        Location.parse(self.out)  # a malformed URL is named before anything loads


def parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise ExtractError(f"--shard must look like i/N (e.g. 0/4), got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise ExtractError(f"--shard {text}: need 0 <= i < N")
    return index, count


def parse_layers(text: str, num_layers: int, model: str = "the model") -> tuple[int, ...]:
    """Parse ``12``, ``6,12,18``, ``0-5,10`` or ``all`` and check each against the model."""
    valid = f"{model} has {num_layers} decoder layers (0-{num_layers - 1})"
    if text.strip() == "all":
        return tuple(range(num_layers))
    layers: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = (int(v) for v in part.split("-"))
                if hi < lo:
                    raise ValueError
                layers.extend(range(lo, hi + 1))
            else:
                layers.append(int(part))
    except ValueError:
        raise ExtractError(f"--layers {text!r} is not a layer list like 12, 6,12,18 or 0-5,10; {valid}") from None
    bad = [layer for layer in layers if not 0 <= layer < num_layers]
    if bad:
        raise ExtractError(f"layer {bad[0]} is out of range: {valid}")
    return tuple(sorted(set(layers)))


@dataclass
class Plan:
    """What a store will hold: samples with their text, source, tags and frame counts."""

    samples: list[dict]
    n_frames: list[int]
    codes: np.ndarray | None  # known up front in teacher-forced mode
    text_length: int | None = None  # melody checkpoints: every batch's text is padded to this many tokens


def _plan_generate(cfg: ExtractConfig, loaded) -> Plan:
    frame_rate = loaded.info.frame_rate
    n = int(round(cfg.duration * frame_rate))
    if n < 1:
        raise ExtractError(f"--duration {cfg.duration} s is shorter than one frame (1/{frame_rate} s)")
    if cfg.audio_dir:  # melody checkpoints: each file's caption is the prompt, the file its melody
        files, _ = _read_audio_dir(cfg, loaded, encode=False)
        conditions = [{k: v for k, v in f.items() if k != "n_frames"} for f in files]
    else:
        from .prompts import load_prompt_file

        prompts = load_prompt_file(cfg.prompt_file if cfg.prompt_file else BUNDLED)
        prompts = prompts[: cfg.max_prompts] if cfg.max_prompts else prompts
        conditions = [{"prompt": p.text, "source_id": p.source_id, "tags": list(p.tags)} for p in prompts]
    samples = [
        {"index": i, **condition, "unit": i // cfg.batch_size, "seed": cfg.seed + i // cfg.batch_size, "n_frames": n}
        for i, condition in enumerate(conditions)
    ]
    return Plan(samples=samples, n_frames=[n] * len(samples), codes=None)


def _plan_from_store(cfg: ExtractConfig, model_config) -> Plan:
    source = Store(cfg.codes_from)
    source.require_complete()
    codebooks = model_config.decoder.num_codebooks
    if source.meta.n_codebooks != codebooks:
        raise ExtractError(f"--codes_from {cfg.codes_from} holds {source.meta.n_codebooks} codebooks but {cfg.model} "
                           f"has {codebooks}: re-run it with the model it was made with ({source.meta.model})")
    samples = source.samples[: cfg.max_prompts] if cfg.max_prompts else source.samples
    if model_config.model_type != "musicgen_melody" and any(s.get("melody_chroma") for s in samples):
        raise ExtractError(f"--codes_from {cfg.codes_from} was made with melody conditions, which {cfg.model} does "
                           f"not take: re-run it with a melody checkpoint ({source.meta.model})")
    frame_rate = float(model_config.audio_encoder.frame_rate)
    if source.meta.frame_rate != frame_rate:
        raise ExtractError(f"--codes_from {cfg.codes_from} holds codes at {source.meta.frame_rate:g} frames/s but "
                           f"{cfg.model} runs at {frame_rate:g}: re-run it with the model it was made with "
                           f"({source.meta.model})")
    n_frames = [int(s["n_frames"]) for s in samples]
    n_rows = int(source.offsets[len(samples)])
    codes = source.read_rows("codes", 0, n_rows)
    codebook_size = model_config.decoder.vocab_size
    if codes.size and not 0 <= int(codes.min()) <= int(codes.max()) < codebook_size:
        raise ExtractError(f"--codes_from {cfg.codes_from} holds codes in {int(codes.min())}..{int(codes.max())} but "
                           f"{cfg.model} has {codebook_size} codes per codebook: re-run it with the model it was "
                           f"made with ({source.meta.model})")
    out = []
    for i, s in enumerate(samples):
        rec = {k: v for k, v in s.items() if k not in ("unit", "index")}
        out.append({"index": i, **rec, "unit": i // cfg.batch_size})
    return Plan(samples=out, n_frames=n_frames, codes=codes,
                text_length=source.meta.generation.get("text_length"))


def _read_audio_dir(cfg: ExtractConfig, loaded, encode: bool) -> tuple[list[dict], list[np.ndarray]]:
    """The files of ``--audio_dir`` as (conditions, codes if ``encode``); an unreadable file stops the run
    with an AudioError naming it. A condition holds the caption (``name.txt``), the file and, for melody
    checkpoints, its chroma."""
    from tqdm import tqdm

    from sae_core.audio import list_audio_files, read_audio, resample
    from .capture import encode_audio

    files = list_audio_files(cfg.audio_dir)
    files = files[: cfg.max_prompts] if cfg.max_prompts else files
    if not files:
        raise ExtractError(f"--audio_dir {cfg.audio_dir} holds no audio files (.wav, .flac, .ogg, .mp3)")
    info = loaded.info
    conditions, codes = [], []
    for path in tqdm(files, desc="encoding audio" if encode else "reading melodies", unit="file"):
        wave, rate = read_audio(path, channels=info.audio_channels)
        wave = resample(wave, rate, info.sampling_rate)
        caption_file = path.with_suffix(".txt")
        text = " ".join(caption_file.read_text().split()) if caption_file.exists() else ""
        condition = {"prompt": text, "source_id": path.name, "tags": [], "audio_path": str(path)}
        if info.melody:
            condition["melody_chroma"] = loaded.chroma.chroma(np.atleast_2d(wave).mean(axis=0)).tolist()
        if encode:
            codes.append(encode_audio(loaded, wave, info.sampling_rate))
            condition["n_frames"] = len(codes[-1])
        conditions.append(condition)
    return conditions, codes


def _plan_from_audio(cfg: ExtractConfig, loaded) -> Plan:
    conditions, codes = _read_audio_dir(cfg, loaded, encode=True)
    samples = [{"index": i, **c, "unit": i // cfg.batch_size, "seed": None} for i, c in enumerate(conditions)]
    return Plan(samples=samples, n_frames=[len(c) for c in codes], codes=np.concatenate(codes))


def _plan_digest(plan: Plan) -> str:
    h = hashlib.sha256()
    for s in plan.samples:
        melody = [s["melody_chroma"]] if s.get("melody_chroma") is not None else []
        h.update(json.dumps([s["prompt"], s.get("source_id"), s["n_frames"], *melody]).encode())
    if plan.codes is not None:
        h.update(np.ascontiguousarray(plan.codes).tobytes())
    return h.hexdigest()[:16]


def _store_meta(cfg: ExtractConfig, info, layers: Sequence[int], plan: Plan) -> StoreMeta:
    generation = {
        "batch_size": cfg.batch_size,
        "plan_digest": _plan_digest(plan),
        "source": cfg.codes_from or cfg.audio_dir or cfg.prompt_file,
    }
    if cfg.mode == "generate":
        generation.update(
            duration=cfg.duration, guidance_scale=cfg.guidance_scale, top_k=cfg.top_k,
            temperature=cfg.temperature, seed=cfg.seed, model_dtype=cfg.model_dtype,
        )
    # Only for the families that have them, so that mono stores keep their settings (and resume).
    if info.audio_channels != 1:
        generation["audio_channels"] = info.audio_channels
    if info.melody:
        melodies = sum(s.get("melody_chroma") is not None for s in plan.samples)
        generation["melody_condition"] = f"{melodies} of {len(plan.samples)} samples (per-sample melody_chroma)"
        generation["text_length"] = plan.text_length
    n_units = -(-len(plan.samples) // cfg.batch_size)
    return StoreMeta(
        model=cfg.model, layers=tuple(layers), d_model=info.d_model, n_codebooks=info.num_codebooks,
        frame_rate=info.frame_rate, sampling_rate=info.sampling_rate, dtype=cfg.dtype, mode=cfg.mode,
        n_samples=len(plan.samples), n_rows=int(sum(plan.n_frames)), n_units=n_units,
        streams=("cond",) + (("uncond",) if cfg.keep_uncond else ()) + (MLP_STREAMS if cfg.mlp else ()),
        generation=generation,
    )


def _describe_mismatch(old: StoreMeta, new: StoreMeta) -> str:
    a, b = old.to_json(), new.to_json()
    diffs = [f"{k}={a[k]!r} (asked {b[k]!r})" for k in b if k != "generation" and a.get(k) != b[k]]
    diffs += [
        f"{k}={old.generation.get(k)!r} (asked {v!r})" for k, v in new.generation.items() if old.generation.get(k) != v
    ]
    return ", ".join(diffs[:4])


def _check_writable(out: Path) -> None:
    """Refuse an ``--out`` whose nearest existing ancestor is a file or cannot be written."""
    where = out.parent
    while not where.exists() and where != where.parent:
        where = where.parent
    if not where.is_dir() or not os.access(where, os.W_OK | os.X_OK):
        raise StoreError(f"cannot create the store --out {out}: {where} is not a writable directory; choose another "
                         "--out or make it writable")


def open_or_create(cfg: ExtractConfig, meta: StoreMeta, plan: Plan) -> Store:
    """Resume a store made with the same settings, create a new one, or refuse a different one."""
    where = Location.parse(cfg.out)
    if where.exists("store.json"):
        existing = Store(cfg.out)
        if existing.meta == meta:
            return existing
        if not cfg.overwrite:
            raise StoreError(
                f"store {where} was made with other settings: {_describe_mismatch(existing.meta, meta)}; "
                "pass --overwrite to replace it or choose another --out"
            )
        if parse_shard(cfg.shard)[1] > 1:
            raise StoreError("--overwrite with --shard would race between processes; delete the store first")
        remove_store(cfg.out)
    elif where.local is None:  # a bucket: no disk to check; a half-created store of this plan is finished
        if foreign_keys(where):
            raise StoreError(f"--out {where} holds objects that are not an activation store's; choose an empty "
                             "or new prefix")
        return _create(cfg, meta, plan)
    out = Path(where.local)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise StoreError(f"--out {out} exists and is not an activation store; choose an empty or new directory")
    _check_writable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    need = estimate_bytes(meta.n_rows, len(meta.layers), meta.d_model, meta.dtype, meta.n_codebooks, len(meta.streams))
    free = shutil.disk_usage(out.parent).free
    if need > free:
        raise StoreError(f"the store needs ~{need / 1e9:.2f} GB but only {free / 1e9:.2f} GB is free at {out.parent}")
    return _create(cfg, meta, plan)


def _create(cfg: ExtractConfig, meta: StoreMeta, plan: Plan) -> Store:
    equal = len(set(plan.n_frames)) == 1
    unit_rows = cfg.batch_size * plan.n_frames[0] if equal and len(plan.n_frames) >= cfg.batch_size else None
    return create_store(cfg.out, meta, plan.samples, plan.n_frames, plan.codes, unit_rows=unit_rows)


def _run_unit(cfg: ExtractConfig, loaded, store: Store, unit: int, layers: Sequence[int]) -> int:
    """Compute and write one unit's rows; returns the number of rows written."""
    from .capture import generate_batch, teacher_forced_streams

    lo = unit * cfg.batch_size
    samples = store.samples[lo : lo + cfg.batch_size]
    texts = [s["prompt"] for s in samples]
    melodies = [s.get("melody_chroma") for s in samples]
    row0, row1 = int(store.offsets[lo]), int(store.offsets[lo + len(samples)])
    if cfg.mode == "generate":
        batch = generate_batch(
            loaded, texts, int(samples[0]["n_frames"]), layers, guidance_scale=cfg.guidance_scale,
            top_k=cfg.top_k, temperature=cfg.temperature, seed=cfg.seed + unit, keep_uncond=cfg.keep_uncond,
            melodies=melodies, pad_to=store.meta.generation.get("text_length"), mlp=cfg.mlp,
        )
        for stream, per_layer in batch.acts.items():
            for layer, acts in per_layer.items():
                store.write_rows(acts_name(layer, stream), row0, acts.reshape(-1, acts.shape[-1]))
        store.write_rows("codes", row0, batch.codes.reshape(-1, batch.codes.shape[-1]))
    else:
        codes = store.read_rows("codes", row0, row1)
        bounds = store.offsets[lo : lo + len(samples) + 1] - row0
        per_sample = [codes[bounds[i] : bounds[i + 1]] for i in range(len(samples))]
        acts = teacher_forced_streams(loaded, texts, per_sample, layers, melodies,
                                      store.meta.generation.get("text_length"), mlp=cfg.mlp)
        for stream, per_layer in acts.items():
            for layer, rows in per_layer.items():
                store.write_rows(acts_name(layer, stream), row0, np.concatenate(rows))
    return row1 - row0


def extract(cfg: ExtractConfig) -> Store:
    """Run (or resume) an extraction and return the store."""
    from tqdm import tqdm

    from .models import load_config, load_model

    shard_index, shard_count = parse_shard(cfg.shard)
    started = time.time()
    plan = None
    model_config = load_config(cfg.model)  # the configuration alone: checks before loading any weights
    Location.parse(cfg.out).check_reachable()  # a wrong bucket, endpoint or keys: said now, not after the model loads
    if cfg.mode == "generate" and cfg.audio_dir and model_config.model_type != "musicgen_melody":
        raise ExtractError(f"--audio_dir in generate mode gives the melody condition, which {cfg.model} does not "
                           "take: use a melody checkpoint (facebook/musicgen-melody...) or --mode teacher_forced")
    if cfg.mode == "generate" and not cfg.audio_dir:
        from .prompts import load_prompt_file

        load_prompt_file(cfg.prompt_file)  # fail on a bad prompt file before loading a model
    elif cfg.codes_from:
        plan = _plan_from_store(cfg, model_config)
    loaded = load_model(cfg.model, cfg.device, cfg.model_dtype)
    layers = parse_layers(cfg.layers, loaded.info.num_layers, cfg.model)
    if cfg.mode == "generate":
        plan = _plan_generate(cfg, loaded)
    elif cfg.audio_dir:
        plan = _plan_from_audio(cfg, loaded)
    if loaded.info.melody and plan.text_length is None:
        from .capture import text_length

        plan.text_length = text_length(loaded, [s["prompt"] for s in plan.samples])
    meta = _store_meta(cfg, loaded.info, layers, plan)
    store = open_or_create(cfg, meta, plan)
    done = store.committed_units()
    mine = [u for u in range(meta.n_units) if u % shard_count == shard_index and u not in done]
    shard_name = f"shard-{shard_index}-of-{shard_count}"
    if done:
        print(f"resuming {store.path}: {len(done)} of {meta.n_units} batches already committed")
    rows_done = 0
    with tqdm(total=sum(min(cfg.batch_size, meta.n_samples - u * cfg.batch_size) for u in mine),
              desc=f"extract layers {','.join(map(str, layers))}", unit="prompt") as bar:
        for unit in mine:
            rows_done += _run_unit(cfg, loaded, store, unit, layers)
            store.commit_unit(unit, shard_name)
            bar.update(min(cfg.batch_size, meta.n_samples - unit * cfg.batch_size))
            bar.set_postfix(rows_per_s=f"{rows_done / max(1e-9, time.time() - started):.0f}")
    _summary(store, rows_done, time.time() - started)
    return store


def _summary(store: Store, rows_done: int, seconds: float) -> None:
    if store.where.local is not None:
        size = sum(f.stat().st_size for f in store.where.local.rglob("*") if f.is_file())
    else:  # listing a bucket gives no sizes; the plan's size is what the arrays take
        meta = store.meta
        size = estimate_bytes(meta.n_rows, len(meta.layers), meta.d_model, meta.dtype, meta.n_codebooks,
                              len(meta.streams))
    state = "complete" if store.complete else f"{len(store.committed_units())}/{store.meta.n_units} batches (other shards pending)"
    print(
        f"store {store.path}: {store.n_samples} samples, {store.n_rows} rows x {store.d_model} "
        f"(layers {','.join(map(str, store.layers))}), {size / 1e9:.3f} GB stored, {state}; "
        f"this run wrote {rows_done} rows in {seconds:.1f} s"
    )


def main(argv: list[str] | None = None):
    from sae_core.cli import run_main

    return run_main(
        ExtractConfig, argv, prog="python -m extractor.extract",
        description="Capture MusicGen decoder activations into an activation store.",
        run=extract,
    )


if __name__ == "__main__":
    main()
