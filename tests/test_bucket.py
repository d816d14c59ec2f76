"""Stores in a bucket: the same store code through tensorstore's s3 kvstore, against a real
S3-compatible server (moto) on 127.0.0.1. Extraction into a bucket is tested in test_extract."""

import tempfile
from pathlib import Path

import numpy as np
import pytest

from sae_core.location import Location, LocationError
from sae_core.store import (
    Store,
    StoreCommand,
    StoreError,
    acts_name,
    open_store,
    remove_store,
    run_command,
)

from .test_store import _make_store


@pytest.mark.parametrize("text, problem", [
    ("ftp://host/x", "unsupported scheme ftp://"),
    ("s3://bucket", "names no prefix inside the bucket"),
    ("gs://bucket/", "names no prefix inside the bucket"),
    ("s3://bucket/p?endpiont=http://x", "unknown option(s) endpiont"),
])
def test_a_malformed_location_is_named_with_its_fix(text, problem):
    with pytest.raises(LocationError, match=problem.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        Location.parse(text)


def test_locations_parse_to_the_kvstore_they_name(monkeypatch, tmp_path):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://minio:9000")
    assert Location.parse(f"file://{tmp_path}/s").local == tmp_path / "s"
    gs = Location.parse("gs://b1/acts/run").spec("layer3/acts")
    assert {k: v for k, v in gs.items() if k != "context"} == {"driver": "gcs", "bucket": "b1", "path": "acts/run/layer3/acts/"}
    s3 = Location.parse("s3://b1/acts?region=eu-west-1").kvstore
    assert (s3["endpoint"], s3["aws_region"]) == ("http://minio:9000", "eu-west-1")
    assert Location.parse("s3://b1/acts?endpoint=http://other:1").kvstore["endpoint"] == "http://other:1"


def test_a_store_in_a_bucket_reads_writes_commits_and_repairs_like_a_directory(s3_server, tmp_path, capsys):
    url = s3_server("store")
    store, _ = _make_store(url, units=2, commit=False)
    assert isinstance(store.path, str) and str(store.path) == url
    with pytest.raises(StoreError, match="incomplete \\(0/2 batches committed\\)"):
        open_store(url)
    store.commit_unit(1, "shard-1-of-2")
    store.commit_unit(0, "shard-0-of-2")
    opened = open_store(url)
    local, _ = _make_store(tmp_path / "local", units=2)
    assert opened.committed_units() == {0, 1} and opened.samples == local.samples
    for name in local.array_names():
        np.testing.assert_array_equal(np.asarray(opened.array(name).read().result()),
                                      np.asarray(local.array(name).read().result()), err_msg=name)
    assert sorted(opened.where.list("progress/")) == ["progress/units/0", "progress/units/1"]

    # A garbled chunk object is named by its URL; repair removes it and un-commits its batch.
    key = opened.chunk_key(acts_name(2), 0)
    data = bytearray(opened.where.read(key))
    data[3] ^= 0xFF
    opened.where.write(key, bytes(data))
    with pytest.raises(StoreError, match="1 damaged chunk"):
        run_command(StoreCommand("check", url))
    assert opened.chunk_file(acts_name(2), 0) in capsys.readouterr().out
    run_command(StoreCommand("repair", url))
    assert Store(url).committed_units() == set() and key not in opened.where.list()

    run_command(StoreCommand("remove", url))
    assert opened.where.list() == []
    with pytest.raises(StoreError, match="no activation store at s3://"):
        open_store(url)


def test_a_prefix_holding_other_objects_is_not_removed(s3_server):
    where = Location.parse(s3_server("other"))
    where.write("notes.txt", b"keep me")
    with pytest.raises(StoreError, match="is not an activation store; refusing to delete it"):
        remove_store(where.text)
    assert where.read("notes.txt") == b"keep me"


def test_an_unreachable_bucket_is_one_line_naming_what_to_check(s3_server):
    url = s3_server("x").replace("s3://sae-test/", "s3://no-such-bucket/")
    with pytest.raises(LocationError, match="cannot reach the store at s3://no-such-bucket/.*NoSuchBucket.*check the "
                                            "bucket, the credentials"):
        open_store(url)


def test_a_late_creator_of_the_same_bucket_store_keeps_what_the_first_one_wrote(s3_server):
    """Two --shard processes may both create the plan (a bucket has no rename to make one win): the
    second writes the same bytes and opens the arrays, deleting nothing the first already wrote."""
    url = s3_server("race")
    first, acts = _make_store(url, units=2, commit=False)
    first.commit_unit(0, "shard-0-of-2")
    again, _ = _make_store(url, units=2, commit=False)  # the late creator: same plan, then its own rows
    assert Store(url).committed_units() == {0}
    np.testing.assert_array_equal(again.read_rows(acts_name(2), 0, again.n_rows), acts)
    with pytest.raises(StoreError, match="half-created with other settings"):
        _make_store(url, d=7)


def test_a_store_written_and_read_through_failing_requests_equals_the_local_one(faulty, tmp_path):
    """A fifth of the requests answered 503 SlowDown, 500, or cut mid-body, each after 0-5 ms: the store
    is written and read back bit for bit, through tensorstore's own retries."""
    url, proxy, _ = faulty("flaky", faults=0.2, latency=(0.0, 0.005), seed=1)
    store, acts = _make_store(url, n_frames=tuple(range(20, 60)), d=16, units=4)
    local, local_acts = _make_store(tmp_path / "local", n_frames=tuple(range(20, 60)), d=16, units=4)
    opened = open_store(url)
    assert opened.committed_units() == {0, 1, 2, 3} and opened.samples == local.samples
    for name in local.array_names():
        np.testing.assert_array_equal(np.asarray(opened.read_rows(name, 0, opened.array(name).shape[0])),
                                      np.asarray(local.read_rows(name, 0, local.array(name).shape[0])), err_msg=name)
    counts = proxy.counts()
    assert sum(counts.get(kind, 0) for kind in ("503", "500", "reset")) >= 3, counts


def test_an_outage_longer_than_the_retries_is_one_line_and_the_store_reads_after_it(faulty):
    url, proxy, _ = faulty("outage")
    store, acts = _make_store(url)
    opened = Store(url)
    opened.read_rows("offsets", 0, 2)
    proxy.outage(3.0)
    started = __import__("time").monotonic()
    with pytest.raises(StoreError) as err:
        opened.read_rows(acts_name(2), 0, 5)
    line = str(err.value)
    with pytest.raises(LocationError, match="^the bucket s3://sae-test did not answer"):
        Store(url)
    assert "\n" not in line and line.startswith("the bucket s3://sae-test did not answer (connection refused)")
    assert "rerun the same command when it answers again and it resumes" in line
    assert __import__("time").monotonic() - started < 3.0, "the retries (8 over about 0.5 s) should give up first"
    __import__("time").sleep(3.2)
    np.testing.assert_array_equal(Store(url).read_rows(acts_name(2), 0, 5), acts[:5])


def test_the_retry_policy_is_set_in_one_place_and_checked(monkeypatch):
    from sae_core.location import RETRIES, retry_budget, retry_policy

    monkeypatch.delenv("SAE_MUSIC_BUCKET_RETRIES", raising=False)
    assert retry_policy() == RETRIES and 100 < retry_budget(RETRIES) < 130
    assert Location.parse("s3://b/p").kvstore["context"]["s3_request_retries"] == {
        "max_retries": 10, "initial_delay": "1000ms", "max_delay": "16000ms"}
    assert "gcs_request_retries" in Location.parse("gs://b/p").kvstore["context"]
    monkeypatch.setenv("SAE_MUSIC_BUCKET_RETRIES", "3,0.5")
    with pytest.raises(LocationError, match="SAE_MUSIC_BUCKET_RETRIES=3,0.5 is not RETRIES,FIRST_DELAY_S,MAX_DELAY_S"):
        Location.parse("s3://b/p")


@pytest.mark.slow  # also in bench.faults (category bucket), which the slow suite runs; the default suite has the store's
def test_training_meets_an_outage_stops_in_one_line_and_the_rerun_after_it_ends_as_an_uninterrupted_run(faulty):
    """The bucket goes away mid-run for longer than the retries last: training stops with exit status
    2 and one line naming the bucket; rerun after the outage, it resumes from its checkpoint and ends
    with the parameters of a run that never met the outage."""
    import subprocess
    import time

    import jax_sae

    from .conftest import cli
    from .synthetic import planted_dictionary, sparse_data, write_store

    from jax_sae.train import main as train

    url, proxy, direct = faulty("train")
    write_store(direct, sparse_data(planted_dictionary(32, 64, seed=0), 8_000, active=4, noise=0.05, seed=0))
    root = Path(tempfile.mkdtemp())

    def args(store, out):
        return ["--sae_type", "batch_topk", "--layer_idx", "0", "--hidden_dim", "64", "--top_k", "4", "--batch_size",
                "128", "--epochs", "2", "--lr", "2e-3", "--store", store, "--out", str(out), "--checkpoint_every", "20",
                "--eval_every", "25", "--no-progress", "--mesh_data", "1"]

    train(args(direct, root / "ref"))
    run = root / "met-outage" / "batch_topk" / "layer0" / "dim64"
    proc = subprocess.Popen(cli("jax_sae.train", *args(url, root / "met-outage")), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (
            (run / "ckpt").is_dir() and any(p.name.isdigit() for p in (run / "ckpt").iterdir())):
        time.sleep(0.02)
    proxy.outage(4.0)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and not (run / "final").exists(), err[-2000:]
    assert err.count("\n") == 1 and err.startswith("error: the bucket s3://sae-test did not answer"), err
    assert "rerun the same command when it answers again and it resumes" in err
    time.sleep(max(0.0, 4.5 - proxy.outage_elapsed()))
    rerun = subprocess.run(cli("jax_sae.train", *args(url, root / "met-outage")), check=True, capture_output=True,
                           text=True)
    assert "resuming" in rerun.stdout
    a, b = jax_sae.load(root / "ref" / "batch_topk" / "layer0" / "dim64" / "final"), jax_sae.load(run / "final")
    for name in ("W_enc_DH", "b_enc_H", "W_dec_HD", "b_dec_D"):
        np.testing.assert_array_equal(np.asarray(getattr(a.params, name)), np.asarray(getattr(b.params, name)))
