"""Stores in a bucket: the same store code through tensorstore's s3 kvstore, against a real
S3-compatible server (moto) on 127.0.0.1. Extraction into a bucket is tested in test_extract."""

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
    assert Location.parse("gs://b1/acts/run").spec("layer3/acts") == {
        "driver": "gcs", "bucket": "b1", "path": "acts/run/layer3/acts/"}
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
