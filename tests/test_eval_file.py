"""eval.json: written as strict JSON, read back with its fields checked, undefined figures null."""

import json

import pytest

from sae_core.eval_file import EvalFileError, read_eval, summarize_losses, write_eval


def _result(overall: dict, books: int = 2) -> dict:
    return {"model": "tiny-random", "sae": "sae.pt", "store": "store", "layer": 2, "samples": 4, "stream": "cond",
            "mean_ablation_from": "store", "predictions": 100, "overall": overall,
            "per_codebook": [overall] * books}


def test_loss_recovered_is_the_share_of_the_ablation_gap_the_sae_closes():
    summary = summarize_losses({"clean": 2.0, "sae": 2.5, "zero": 4.0, "mean": 3.0}, 0.1)
    assert summary["loss_recovered_zero"] == pytest.approx(0.75)
    assert summary["loss_recovered_mean"] == pytest.approx(0.5)
    assert "notes" not in summary


def test_an_ablation_that_costs_nothing_gives_null_and_a_note_and_the_file_stays_strict_json(tmp_path):
    # zero ablation changes nothing (gap 0) and mean ablation almost nothing (gap 1e-9): no ratio
    summary = summarize_losses({"clean": 2.0, "sae": 2.5, "zero": 2.0, "mean": 2.0 + 1e-9}, 0.1)
    assert summary["loss_recovered_zero"] is None and summary["loss_recovered_mean"] is None
    assert len(summary["notes"]) == 2 and "zero ablation" in summary["notes"][0]
    path = tmp_path / "eval.json"
    write_eval(path, _result(summary))
    text = path.read_text()
    json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in eval.json"))
    read = read_eval(path)
    assert read["overall"]["loss_recovered_zero"] is None
    assert read["overall"]["notes"] == summary["notes"]


def test_non_finite_figures_are_null_with_a_note():
    summary = summarize_losses({"clean": 2.0, "sae": float("nan"), "zero": 4.0, "mean": float("inf")}, float("nan"))
    assert summary["ce_sae"] is None and summary["kl_sae"] is None and summary["ce_mean"] is None
    assert summary["loss_recovered_zero"] is None and summary["loss_recovered_mean"] is None
    assert any("ce_sae" in note for note in summary["notes"])


def test_a_file_without_notes_reads_with_empty_notes(tmp_path):
    path = tmp_path / "eval.json"
    write_eval(path, _result(summarize_losses({"clean": 2.0, "sae": 2.5, "zero": 4.0, "mean": 3.0}, 0.1)))
    result = read_eval(path)
    assert result["overall"]["notes"] == [] and all(b["notes"] == [] for b in result["per_codebook"])
    assert result["overall"]["loss_recovered_zero"] == pytest.approx(0.75)


@pytest.mark.parametrize("drop, named", [("overall.loss_recovered_mean", "overall.loss_recovered_mean"),
                                         ("overall.loss_recovered_zero", "overall.loss_recovered_zero"),
                                         ("layer", "'layer'"), ("per_codebook", "'per_codebook'")])
def test_a_missing_field_is_named_with_the_file(tmp_path, drop, named):
    data = _result(summarize_losses({"clean": 2.0, "sae": 2.5, "zero": 4.0, "mean": 3.0}, 0.1))
    data = json.loads(json.dumps(data))
    if drop.startswith("overall."):
        del data["overall"][drop.split(".")[1]]
    else:
        del data[drop]
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(data))
    with pytest.raises(EvalFileError, match=named) as err:
        read_eval(path)
    assert str(path) in str(err.value) and isinstance(err.value, ValueError)


def test_missing_and_unreadable_files_are_one_clear_error(tmp_path):
    with pytest.raises(EvalFileError, match="no evaluation file"):
        read_eval(tmp_path / "absent.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(EvalFileError, match="bad.json"):
        read_eval(bad)
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(EvalFileError, match="not an object"):
        read_eval(tmp_path / "list.json")


def test_a_writer_cannot_put_nan_in_the_file(tmp_path):
    data = _result(summarize_losses({"clean": 2.0, "sae": 2.5, "zero": 4.0, "mean": 3.0}, 0.1))
    data["samples"] = float("nan")
    with pytest.raises(ValueError):
        write_eval(tmp_path / "eval.json", data)
    assert not (tmp_path / "eval.json").exists()
