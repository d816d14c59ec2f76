"""Fault injection (``python -m bench.faults --quick``): after a SIGKILL in every stage, a full disk
during extraction and during a checkpoint save, damaged chunks, progress, samples and checkpoint
files, two extractions of one store at once, and a store in a bucket that fails 5% of its
requests or goes away for longer than the retries, the same command ends with the uninterrupted
run's result."""

import json

import pytest

pytestmark = pytest.mark.slow


def test_every_injected_fault_is_survived(tmp_path, monkeypatch):
    from bench import common, faults

    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path / "results")
    results = faults.run(faults.FaultsConfig(quick=True, tmp_dir=str(tmp_path)))
    cases = results["cases"]
    assert {c["category"] for c in cases} == set(faults.CATEGORIES)
    assert sum(c["category"] == "kill" for c in cases) == len(faults.STAGES)
    failed = [c["line"] for c in cases if not c["survived"]]
    assert not failed, "\n".join(failed)
    written = json.loads((tmp_path / "results" / "faults.json").read_text())
    assert written["derived"]["survived"] == written["derived"]["tried"] == len(cases)
