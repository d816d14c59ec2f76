"""The bucket cases of ``python -m bench.faults`` (category ``bucket``): the store at ``s3://`` on a
local S3-compatible server (moto) reached through ``proxy.FaultProxy``, with retries set to give up
within about a second (``SAE_MUSIC_BUCKET_RETRIES``) so that an outage of a few seconds outlasts them.

- flaky extract: 5% of the requests answered 503 SlowDown, 500 or cut mid-body, 0-10 ms each: the
  bucket store equals the reference store, array by array, with the same committed batches;
- outage extract / outage train: the bucket refuses connections for ``OUTAGE`` seconds once the run
  has committed a batch (saved a checkpoint); the run must stop with exit status 2 and one line
  naming the bucket, and the same command after the outage must end equal to the reference.
"""

from __future__ import annotations

import os
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .compare import PARAM_TOL
from .harness import Case, Workspace, error_line, wait_until

OUTAGE = 5.0
RETRIES = "4,0.05,0.2"  # gives up after about 0.5 s
BUCKET = "faults"


class Bucket:
    """moto on 127.0.0.1 with one bucket, and AWS keys and the fast retries in this process's
    environment (the stages' subprocesses inherit them)."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        self.port = self.server._server.server_port
        self.saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                     "SAE_MUSIC_BUCKET_RETRIES")}
        os.environ.update(AWS_ACCESS_KEY_ID="faults", AWS_SECRET_ACCESS_KEY="faults", SAE_MUSIC_BUCKET_RETRIES=RETRIES)
        urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{self.port}/{BUCKET}", method="PUT"),
                               timeout=30).read()

    def proxy(self, **options):
        from .proxy import FaultProxy

        return FaultProxy(self.port, **options).start()

    def close(self) -> None:
        self.server.stop()
        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _url(prefix: str, endpoint: str) -> str:
    return f"s3://{BUCKET}/{prefix}?endpoint={endpoint}"


def _swap(argv: tuple[str, ...], flag: str, value: str) -> tuple[str, ...]:
    i = argv.index(flag)
    return argv[: i + 1] + (value,) + argv[i + 2:]


def _store_differences(ref: Path, url: str) -> list[str]:
    """Differences between the reference store and one in the bucket, array by array."""
    from sae_core.store import open_store

    try:
        got = open_store(url)
    except Exception as err:  # noqa: BLE001 - any failure to open is the difference
        return [f"the bucket store does not open: {str(err).splitlines()[0]}"]
    want = open_store(ref)
    diffs = [] if got.samples == want.samples else ["samples differ"]
    if got.committed_units() != want.committed_units():
        diffs.append(f"committed batches {sorted(got.committed_units())}, reference {sorted(want.committed_units())}")
    for name in want.array_names():
        rows = want.array(name).shape[0]
        if not np.array_equal(got.read_rows(name, 0, rows), want.read_rows(name, 0, rows)):
            diffs.append(f"{name} differs")
    return diffs


def _stopped_in_one_line(ran, what: str) -> str | None:
    """None when the run stopped with exit status 2 and one line naming the bucket, else why not."""
    if ran.rc != 2:
        return f"{what} exited {ran.rc}, not 2"
    line = error_line(ran, "did not answer")
    return None if line is None else f"{what}: {line}"


def bucket_cases(ws: Workspace) -> Iterator[Case]:
    bucket = Bucket()
    try:
        yield _flaky_extract(ws, bucket)
        yield _outage_extract(ws, bucket)
        yield _outage_train(ws, bucket)
    finally:
        bucket.close()


def _flaky_extract(ws: Workspace, bucket: Bucket) -> Case:
    proxy = bucket.proxy(faults=0.05, latency=(0.0, 0.01), seed=0)
    trial = ws.trial("bucket-flaky-extract")
    url = _url("flaky", proxy.endpoint)
    ran = ws.run(_swap(ws.commands["extract"], "--out", url), trial)
    counts = proxy.counts()
    proxy.stop()
    failed = sum(counts.get(k, 0) for k in ("503", "500", "reset"))
    case = Case("bucket", "extract, 5% of requests failing", f"{failed} of {sum(counts.values())} requests failed",
                False, "")
    direct = _url("flaky", f"http://127.0.0.1:{bucket.port}")
    diffs = [f"exit {ran.rc}"] if ran.rc else _store_differences(ws.ref / ws.store, direct)
    case.survived, case.why = not diffs, "; ".join(diffs[:3]) or "equal to the reference store"
    return case


def _outage(ws: Workspace, bucket: Bucket, name: str, argv: tuple[str, ...], ready, compare) -> Case:
    """Run ``argv``; once ``ready()`` the bucket goes away for OUTAGE s; the run must stop in one line,
    and the same command after the outage must end with ``compare()`` empty."""
    proxy = bucket.proxy()
    trial = ws.trial(f"bucket-outage-{name}")
    argv = tuple(a.replace("{endpoint}", proxy.endpoint) for a in argv)
    proc = ws.start(argv, trial)
    injected = wait_until(lambda: ready(trial), proc, timeout=600)
    proxy.outage(OUTAGE)
    ran = ws.finish(proc, timeout=600)
    case = Case("bucket", f"{name}, {OUTAGE:g} s outage", "", False, "", injected=injected)
    problem = _stopped_in_one_line(ran, name)
    time.sleep(max(0.0, OUTAGE + 0.5 - proxy.outage_elapsed()))
    rerun = ws.run(argv, trial)
    proxy.stop()
    case.done = f"stopped (exit {ran.rc}) after {ran.seconds:.1f} s, rerun after the outage (exit {rerun.rc})"
    diffs = [problem] if problem else []
    diffs += [f"the rerun exited {rerun.rc}"] if rerun.rc else compare(trial)
    case.survived, case.why = not diffs, "; ".join(diffs[:3]) or "one line, then equal to the reference"
    return case


def _outage_extract(ws: Workspace, bucket: Bucket) -> Case:
    from sae_core.location import Location

    direct = _url("outage-extract", f"http://127.0.0.1:{bucket.port}")

    def ready(_trial):
        return bool(Location.parse(direct).list("progress/units/"))

    return _outage(ws, bucket, "extract", _swap(ws.commands["extract"], "--out", _url("outage-extract", "{endpoint}")),
                   ready, lambda _trial: _store_differences(ws.ref / ws.store, direct))


def _outage_train(ws: Workspace, bucket: Bucket) -> Case:
    direct_store = _url("flaky", f"http://127.0.0.1:{bucket.port}")  # the flaky extraction's store, equal to ref

    def ready(trial):
        ckpt = ws.runs(trial).ckpt
        return ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir())

    def compare(trial):
        gap = ws.param_gap(ws.ref / ws.run_dir / "final", trial / ws.run_dir / "final")
        return [] if gap <= PARAM_TOL else [f"final parameters differ by up to {gap:.2e}"]

    argv = _swap(ws.commands["train"], "--store", direct_store.replace(f"http://127.0.0.1:{bucket.port}", "{endpoint}"))
    return _outage(ws, bucket, "train", argv, ready, compare)
