"""HotpotQA loading: both shapes, every local format, errors, unlabelled records."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from agemem.data.hotpot import HotpotDataError, UnlabelledDataError, load_records, require_labelled
from agemem.settings import load_settings

N = 12


def settings_for(runs_dir: Path, source: str | Path, **data) -> object:
    return load_settings("smoke", {"runs_dir": str(runs_dir), "data": {"source": str(source), "limit": None, **data}})


def test_sample_loads_normalised(smoke_settings) -> None:
    records = load_records(smoke_settings)
    assert len(records) == smoke_settings.data.limit == 40  # the smoke profile's limit
    rec = records[0]
    assert rec.id == "5a8b57f25542995d1e6f1371" and rec.answer == "yes" and rec.labelled
    assert len(rec.context) == 10 and rec.type == "comparison" and rec.level == "hard"
    facts = {(f.title, f.sent_id): f.sentence for f in rec.supporting_facts}
    assert facts[("Scott Derrickson", 0)].startswith("Scott Derrickson (born July 16, 1966)")


def test_whole_sample(runs_dir: Path) -> None:
    records = load_records(settings_for(runs_dir, "sample"))
    assert len(records) == 535 and len({r.id for r in records}) == 535
    assert all(f.sentence for r in records for f in r.supporting_facts if f.sent_id < 3)


@pytest.fixture
def reference(runs_dir: Path):
    return [r.model_dump() for r in load_records(settings_for(runs_dir, "sample", limit=N))]


def _write(tmp_path: Path, name: str, rows: list[dict]) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text(json.dumps(rows))
    return path


@pytest.mark.parametrize(
    "name,hub",
    [
        ("orig.json", False),
        ("orig.jsonl", False),
        ("hub.json", True),
        ("hub.jsonl", True),
        ("hub.parquet", True),
    ],
)
def test_both_shapes_all_formats_give_the_same_records(
    tmp_path: Path, runs_dir: Path, sample_rows, hub_shape, reference, name: str, hub: bool
) -> None:
    rows = sample_rows[:N]
    path = _write(tmp_path / "in", name, [hub_shape(r) for r in rows] if hub else rows)
    records = load_records(settings_for(runs_dir, path))
    assert [r.model_dump() for r in records] == reference


def test_directory_prefers_split_files(tmp_path: Path, runs_dir: Path, sample_rows, hub_shape, reference) -> None:
    folder = tmp_path / "hotpot"
    _write(folder, "validation-00000.parquet", [hub_shape(r) for r in sample_rows[:N]])
    _write(folder, "train-00000.parquet", [hub_shape(r) for r in sample_rows[N : N + 5]])
    val = load_records(settings_for(runs_dir, folder, split="validation"))
    assert [r.model_dump() for r in val] == reference
    train = load_records(settings_for(runs_dir, folder, split="train"))
    assert [r.id for r in train] == [r["_id"] for r in sample_rows[N : N + 5]]


def test_missing_file_names_the_path(tmp_path: Path, runs_dir: Path) -> None:
    missing = tmp_path / "nope" / "hotpot.json"
    with pytest.raises(HotpotDataError, match=r"nope/hotpot\.json: no such file"):
        load_records(settings_for(runs_dir, missing))


def test_corrupt_json_names_the_path(tmp_path: Path, runs_dir: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('[{"_id": "a", "question": "q", "context": [["t", ["s"]]]}, {"_id": ')
    with pytest.raises(HotpotDataError) as info:
        load_records(settings_for(runs_dir, bad))
    assert str(bad) in str(info.value) and "JSON" in str(info.value)


def test_wrong_columns_name_what_is_missing(tmp_path: Path, runs_dir: Path) -> None:
    path = _write(tmp_path, "other.jsonl", [{"id": "1", "text": "not hotpot"}])
    with pytest.raises(HotpotDataError, match=r"other\.jsonl: does not look like HotpotQA: missing column\(s\) question, context"):
        load_records(settings_for(runs_dir, path))


def test_wrong_row_shape_names_record(tmp_path: Path, runs_dir: Path) -> None:
    path = _write(tmp_path, "rows.jsonl", [{"_id": "x1", "question": "q?", "answer": "a", "context": [["t", "not a list"]]}])
    with pytest.raises(HotpotDataError, match=r"rows\.jsonl: record 0 \(id 'x1'\) has the wrong shape"):
        load_records(settings_for(runs_dir, path))


def test_unsupported_suffix(tmp_path: Path, runs_dir: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("a,b\n")
    with pytest.raises(HotpotDataError, match="unsupported file type"):
        load_records(settings_for(runs_dir, path))


def test_unlabelled_kept_for_inference_refused_for_training(tmp_path: Path, runs_dir: Path, sample_rows, hub_shape) -> None:
    rows = [hub_shape(r) for r in sample_rows[:4]]
    rows[1]["answer"] = ""
    rows[2]["answer"] = None
    records = load_records(settings_for(runs_dir, _write(tmp_path, "test.parquet", rows)))
    assert len(records) == 4 and [r.labelled for r in records] == [True, False, False, True]
    with pytest.raises(UnlabelledDataError, match="2 of 4 records have no answer and cannot be used for training"):
        require_labelled(records)
    require_labelled([records[0], records[3]])  # labelled ones pass


def test_hub_unreachable_is_a_clear_error(runs_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    settings = settings_for(runs_dir, "hotpotqa/hotpot_qa", cache_dir=str(runs_dir / "hf"))
    with pytest.raises(HotpotDataError, match="hub dataset 'hotpotqa/hotpot_qa'.*cannot load"):
        load_records(settings)
