"""Audio for stored examples: decode windows of samples' stored codes with the model's EnCodec.

The JAX side asks for audio through ``render_windows`` (imported lazily), so torch loads only
when a report wants sound.

Windows of one sample that overlap are decoded as one span and cut from it, so two clips of the
same moment hold the same audio; on an accelerator spans of equal length are decoded together, one
EnCodec forward per batch. ``decode_windows`` yields the clips; ``render_windows`` writes them on a
small thread pool while the next spans decode (libsndfile releases the GIL).
"""

from __future__ import annotations

import os
from collections import defaultdict
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from sae_core.audio import write_audio
from .capture import decode_codes_batch
from sae_core.errors import UsageError
from .models import shared_model
from sae_core.store import Store

BATCH_FRAMES = 4096
"""Most frames decoded in one forward on an accelerator (about 80 s of audio at 50 frames/s): bounds
EnCodec's activations (the real 32 kHz model's widest is ~64 channels x 32k samples/s x 4 bytes).
On a CPU each span is its own forward: batching made decoding slower there (48 tiny-random samples
of 4 s: 0.93 s one by one, 1.10 s in pairs, 1.17 s in eights; BENCHMARKS.md)."""
WRITERS = max(2, (os.cpu_count() or 2) // 2)
"""Threads encoding and writing clips (Opus encoding is most of a report's audio time)."""


@dataclass(frozen=True)
class AudioRequest:
    """Decode frames [first, last) of a sample into ``path``."""

    sample: int
    first: int
    last: int
    path: str


@dataclass(frozen=True)
class Span:
    """Frames [first, last) of a sample, decoded once for the requests inside it."""

    sample: int
    first: int
    last: int
    requests: tuple[AudioRequest, ...]

    @property
    def frames(self) -> int:
        return self.last - self.first


def spans_of(requests: Sequence[AudioRequest]) -> list[Span]:
    """The requests grouped into spans: per sample, windows that overlap or touch are merged."""
    by_sample: dict[int, list[AudioRequest]] = defaultdict(list)
    for req in requests:
        by_sample[req.sample].append(req)
    spans = []
    for sample, reqs in by_sample.items():
        reqs.sort(key=lambda r: (r.first, r.last))
        group = [reqs[0]]
        for req in reqs[1:]:
            if req.first <= max(r.last for r in group):
                group.append(req)
            else:
                spans.append(Span(sample, group[0].first, max(r.last for r in group), tuple(group)))
                group = [req]
        spans.append(Span(sample, group[0].first, max(r.last for r in group), tuple(group)))
    return spans


def decode_batches(spans: Sequence[Span], max_frames: int = BATCH_FRAMES) -> list[list[Span]]:
    """Spans of equal length batched together, at most ``max_frames`` frames per batch (a longer
    span is a batch of its own; 0: every span alone)."""
    by_length: dict[int, list[Span]] = defaultdict(list)
    for span in spans:
        by_length[span.frames].append(span)
    batches = []
    for length, group in sorted(by_length.items()):
        per_batch = max(1, max_frames // max(length, 1))
        batches += [group[i:i + per_batch] for i in range(0, len(group), per_batch)]
    return batches


def decode_windows(model: str, store: Store, requests: Sequence[AudioRequest], device: str = "auto",
                   progress: bool = True, busy_cores: int = 0) -> Iterator[tuple[AudioRequest, np.ndarray, int]]:
    """(request, audio [channels, samples], sampling rate) for every request, span by span. The
    settings are checked and the model loaded before the first item; ``busy_cores`` are cores the
    caller keeps busy meanwhile (writers, plotting processes), left free of torch's CPU threads."""
    from tqdm import tqdm

    if not requests:
        return
    for req in requests:
        if not 0 <= req.sample < store.n_samples:
            raise UsageError(f"sample {req.sample} is not in {store.path} ({store.n_samples} samples)")
        frames = int(store.offsets[req.sample + 1] - store.offsets[req.sample])
        if not 0 <= req.first < req.last <= frames:
            raise UsageError(f"frames [{req.first}, {req.last}) are not inside sample {req.sample} of {store.path} "
                             f"({frames} frames)")
    loaded = shared_model(model, device, "float32")
    if loaded.info.num_codebooks != store.meta.n_codebooks:
        raise UsageError(f"store {store.path} has {store.meta.n_codebooks} codebooks but {model} has "
                         f"{loaded.info.num_codebooks}; pass the model the store was made with")
    rate = loaded.info.sampling_rate
    batch_frames = 0 if loaded.device.type == "cpu" else BATCH_FRAMES
    with _cpu_decoding(busy_cores, loaded.device), tqdm(total=len(requests), desc="decoding audio",
                                                              unit="clip", disable=not progress) as bar:
        for batch in decode_batches(spans_of(requests), batch_frames):
            codes = np.stack([store.sample_codes(span.sample)[span.first:span.last] for span in batch])
            audio = decode_codes_batch(loaded, codes)
            hop = audio.shape[-1] // batch[0].frames  # audio samples per frame
            for span, sound in zip(batch, audio):
                for req in span.requests:
                    yield req, sound[:, (req.first - span.first) * hop:(req.last - span.first) * hop], rate
                bar.update(len(span.requests))


def render_windows(model: str, store: Store, requests: Sequence[AudioRequest], device: str = "auto",
                   progress: bool = True) -> list[Path]:
    """Write one clip per request (stereo for stereo checkpoints), in the format of its path's suffix
    (``sae_core.audio.write_audio``), on ``WRITERS`` threads while the next spans decode; returns
    the paths, in the order of ``requests``."""
    with ThreadPoolExecutor(WRITERS) as pool:
        writes = [pool.submit(_write, Path(req.path), clip, rate)
                  for req, clip, rate in decode_windows(model, store, requests, device, progress, WRITERS)]
        for write in writes:
            write.result()  # a failed write raises here
    return [Path(req.path) for req in requests]


@contextmanager
def _cpu_decoding(busy_cores: int, device):
    """Decoding on the CPU: without oneDNN, whose convolution kernels are compiled anew for every
    input length (the demo's 47 span lengths cost 4 s of compiling before 1 s of decoding; the
    native kernels decode as fast with no compiling), and leaving the caller's busy cores alone
    (OpenMP's spinning workers and 2 writer threads fighting over 2 cores made rendering 2.5x slower)."""
    if device.type != "cpu":
        yield
        return
    threads, onednn = torch.get_num_threads(), torch.backends.mkldnn.enabled
    torch.set_num_threads(max(1, (os.cpu_count() or 1) - busy_cores))
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.backends.mkldnn.enabled = onednn


def _write(path: Path, clip: np.ndarray, rate: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_audio(path, clip, rate)
