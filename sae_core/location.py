"""Where a store lives: a local directory, or a prefix in an object store (``gs://``, ``s3://``)
reached through tensorstore's kvstore layer. Torch-free; it knows keys and bytes, not the layout.

``Location.parse`` takes what a user passes as ``--store``/``--out``:

    data/activations                          a local directory (also file:///abs/path)
    gs://bucket/prefix                        Google Cloud Storage (application-default credentials)
    s3://bucket/prefix                        Amazon S3 (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY from the
                                              environment, else the AWS profile and instance chain)
    s3://bucket/prefix?endpoint=http://host:9000&region=us-east-1
                                              an S3-compatible server (MinIO, Ceph, moto, ...)

The S3 endpoint may also come from ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, as for the AWS
tools; a URL's own ``endpoint`` wins, and is what summaries record, so a later stage reopens the
same store from the URL alone.

A bucket is not a disk: requests are slow, throttled (503 SlowDown, 429), fail (500), lose their
connection mid-body, or find the service gone for a while. Every request to a bucket is retried by
tensorstore's own s3 and gcs drivers, with exponential back-off, under the one policy here
(``retry_policy``: 10 retries from 1 s doubling to 16 s, about 2 minutes in all; the environment's
``SAE_MUSIC_BUCKET_RETRIES=RETRIES,FIRST_DELAY_S,MAX_DELAY_S`` replaces it). A connection that
delivers nothing for ``STALL_SECONDS`` is dropped and retried like a failed one. When a failure
outlasts the retries, the stage ends with one line naming the bucket (``outage_line``) and saying
that a rerun resumes.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from .errors import UsageError
from .files import write_all

SCHEMES = ("file", "gs", "s3")
_OPEN: dict[str, object] = {}  # one kvstore handle per remote root, per process
RETRIES = (10, 1.0, 16.0)
"""Retries of a failed bucket request, the first back-off delay and the largest, in seconds."""
STALL_SECONDS = 60
"""A bucket connection that delivers no byte for this long is dropped and retried (curl's low-speed
limit, which tensorstore reads from the environment when it starts: set in ``sae_core/__init__``)."""


def retry_policy() -> tuple[int, float, float]:
    """(retries, first delay s, largest delay s): ``RETRIES``, or SAE_MUSIC_BUCKET_RETRIES."""
    text = os.environ.get("SAE_MUSIC_BUCKET_RETRIES", "")
    if not text:
        return RETRIES
    try:
        retries, first, largest = text.split(",")
        policy = (int(retries), float(first), float(largest))
    except ValueError:
        policy = None
    if policy is None or policy[0] < 1 or not 0 < policy[1] <= policy[2]:
        raise LocationError(f"SAE_MUSIC_BUCKET_RETRIES={text} is not RETRIES,FIRST_DELAY_S,MAX_DELAY_S with at least "
                            "one retry and 0 < first delay <= largest, e.g. 10,1,16; fix or unset it")
    return policy


def retry_budget(policy: tuple[int, float, float]) -> float:
    """Seconds of back-off before the last retry gives up (the delays double from the first to the largest)."""
    retries, delay, largest = policy
    total = 0.0
    for _ in range(retries):
        total += delay
        delay = min(2 * delay, largest)
    return total


def _retries_context(scheme: str) -> dict:
    retries, first, largest = retry_policy()
    return {f"{'gcs' if scheme == 'gs' else 's3'}_request_retries": {
        "max_retries": retries, "initial_delay": f"{first * 1000:g}ms", "max_delay": f"{largest * 1000:g}ms"}}


def transport_failure(err: BaseException) -> bool:
    """Whether a tensorstore error is the bucket failing to answer (retries exhausted, a connection
    refused, reset or stalled), rather than a missing or damaged object."""
    text = str(err)
    return "retry attempts failed" in text or "CURL error" in text or "UNAVAILABLE" in text


class LocationError(UsageError):
    """A store location that cannot be parsed or reached."""


@dataclass(frozen=True)
class Location:
    """A store's root: ``local`` for a directory, else ``kvstore`` (its tensorstore spec, path ending in /)."""

    text: str
    local: Path | None = None
    kvstore: dict | None = None

    @classmethod
    def parse(cls, where: str | os.PathLike) -> Location:
        text = os.fspath(where)
        if "://" not in text:
            return cls(text, local=Path(text))
        parts = urlsplit(text)
        scheme = parts.scheme.lower()
        if scheme not in SCHEMES:
            raise LocationError(f"store location {text} has an unsupported scheme {scheme}://; use a local path, "
                                "file://, gs:// or s3://")
        if scheme == "file":
            return cls(text, local=Path(parts.path))
        bucket, prefix = parts.netloc, parts.path.strip("/")
        if not bucket or not prefix:
            raise LocationError(f"store location {text} names no prefix inside the bucket; give one, e.g. "
                                f"{scheme}://{bucket or 'bucket'}/activations")
        options = {key: values[-1] for key, values in parse_qs(parts.query).items()}
        unknown = set(options) - ({"endpoint", "region"} if scheme == "s3" else set())
        if unknown:
            raise LocationError(f"store location {text} has unknown option(s) {', '.join(sorted(unknown))}; "
                                + ("s3:// takes endpoint= and region=" if scheme == "s3" else "gs:// takes none"))
        spec: dict = {"driver": "gcs" if scheme == "gs" else "s3", "bucket": bucket, "path": prefix + "/"}
        if scheme == "s3":
            endpoint = options.get("endpoint") or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
                "AWS_ENDPOINT_URL")
            region = options.get("region") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
            if endpoint:
                spec["endpoint"] = endpoint
                region = region or "us-east-1"  # S3-compatible servers ignore it; the signature needs one
            if region:
                spec["aws_region"] = region
            if os.environ.get("AWS_ACCESS_KEY_ID"):  # keys in the environment: use them, skip the profile search
                spec["context"] = {"aws_credentials": {"type": "environment"}}
        spec["context"] = {**spec.get("context", {}), **_retries_context(scheme)}
        return cls(text, kvstore=spec)

    def __str__(self) -> str:
        return self.text

    @property
    def is_local(self) -> bool:
        return self.local is not None

    # -- keys -----------------------------------------------------------------------------
    def spec(self, name: str = "") -> dict:
        """The kvstore spec of a sub-directory ``name`` (e.g. a zarr array's)."""
        if self.local is not None:
            return {"driver": "file", "path": str(self.local / name) if name else str(self.local)}
        return {**self.kvstore, "path": self.kvstore["path"] + (name.strip("/") + "/" if name else "")}

    def describe(self, key: str) -> str:
        """A key as the user would find it: a file path, or the object's URL."""
        if self.local is not None:
            return str(self.local / key)
        return f"{self.text.split('?')[0].rstrip('/')}/{key}"

    def _kv(self):
        import tensorstore as ts

        name = repr(sorted(self.kvstore.items()))
        if name not in _OPEN:
            _OPEN[name] = self._call(lambda: ts.KvStore.open(self.kvstore).result())
        return _OPEN[name]

    def _call(self, fn):
        try:
            return fn()
        except ValueError as err:
            if transport_failure(err):
                raise LocationError(self.outage_line(err)) from None
            first = str(err).strip().splitlines()[0][:300]
            raise LocationError(f"cannot reach the store at {self.text} ({first}); check the bucket, the "
                                "credentials and, for an S3-compatible server, the endpoint") from None

    @property
    def bucket(self) -> str:
        """The bucket's URL (scheme and name), for messages."""
        return f"{'gs' if self.kvstore['driver'] == 'gcs' else 's3'}://{self.kvstore['bucket']}"

    def outage_line(self, err: BaseException) -> str:
        """One line for a request the bucket did not answer through every retry."""
        policy = retry_policy()
        cause = _cause(str(err))
        return (f"the bucket {self.bucket} did not answer ({cause}) through {policy[0]} retries over about "
                f"{retry_budget(policy):.0f} s; what was saved is kept: rerun the same command when it answers again "
                "and it resumes (SAE_MUSIC_BUCKET_RETRIES=RETRIES,FIRST_DELAY_S,MAX_DELAY_S waits longer)")

    # -- bytes ----------------------------------------------------------------------------
    def read(self, key: str) -> bytes | None:
        """An object's bytes, or None if there is none."""
        if self.local is not None:
            try:
                return (self.local / key).read_bytes()
            except (FileNotFoundError, NotADirectoryError):
                return None
        result = self._call(lambda: self._kv().read(key).result())
        return bytes(result.value) if result.state == "value" else None

    def exists(self, key: str) -> bool:
        if self.local is not None:
            return (self.local / key).exists()
        return self.read(key) is not None

    def write(self, key: str, data: bytes) -> None:
        """Write one object whole: a reader sees the old bytes or the new ones (atomic rename locally,
        a single PUT in a bucket)."""
        if self.local is not None:
            write_all({self.local / key: data})
            return
        self._call(lambda: self._kv().write(key, data).result())

    def delete(self, key: str) -> None:
        if self.local is not None:
            (self.local / key).unlink(missing_ok=True)
            return
        self._call(lambda: self._kv().delete_range(_key_range(key, key + "\0")).result())

    def list(self, prefix: str = "") -> list[str]:
        """The keys under ``prefix`` (relative to the root), sorted."""
        if self.local is not None:
            base = self.local / prefix if prefix else self.local
            if not base.is_dir():
                return []
            return sorted(p.relative_to(self.local).as_posix() for p in base.rglob("*") if p.is_file())
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1) if prefix else ""
        keys = self._call(lambda: self._kv().list(_key_range(prefix, end)).result())
        return sorted(k.decode() for k in keys)

    def check_reachable(self) -> None:
        """Raise a LocationError now if the bucket cannot be listed (a missing object reads as absent,
        a missing bucket too: a listing tells them apart)."""
        if self.local is None:
            self.list("store.json")

    def delete_all(self) -> None:
        """Remove everything under the root."""
        if self.local is not None:
            shutil.rmtree(self.local, ignore_errors=True)
            return
        self._call(lambda: self._kv().delete_range(_key_range("", "")).result())


def _cause(text: str) -> str:
    """The failure in a few words, from tensorstore's message: the HTTP error or the connection's fate."""
    import re

    for pattern, words in ((r"SlowDown|http_response_code='(503|429)'", "throttled: 503/429 SlowDown"),
                           (r"http_response_code='5\d\d'|InternalError", "server errors: 5xx"),
                           (r"curl_code='7'|Could not connect", "connection refused"),
                           (r"curl_code='28'|timed out|Timeout", "connection stalled"),
                           (r"curl_code='(52|55|56)'|Recv failure|Send failure", "connection reset")):
        if re.search(pattern, text):
            return words
    return text.strip().splitlines()[0][:120]


def _key_range(lo: str, hi: str):
    import tensorstore as ts

    return ts.KvStore.KeyRange(lo, hi)
