import pandas as pd
import pytest

from llmbench.measure import records
from llmbench.core import files


def test_record_fills_statistics_and_rejects_unknown_fields():
    r = records.record(samples=[1.0, 2.0, 3.0], experiment="decode", metric="tpot", unit="s")
    assert r["median"] == 2.0 and r["n"] == 3 and r["status"] == "ok" and set(r) == set(records.COLUMNS)
    with pytest.raises(ValueError, match="colour"):
        records.record(colour="red")


def test_atomic_writes_leave_no_temporary_files(tmp_path):
    records.write_records([records.record(metric="x", samples=[1.0])], tmp_path / "r.parquet")
    files.write_json({"a": 1}, tmp_path / "run.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.parquet", "run.json"]
    assert len(pd.read_parquet(tmp_path / "r.parquet")) == 1


def test_only_finished_ok_runs_are_read(tmp_path):
    def run(path, status):
        path.mkdir(parents=True)
        files.write_json({"status": status, "run_id": path.name, "notebook": "01_latency"}, path / "run.json")
        records.write_records([records.record(run_id=path.name, metric="m", samples=[1.0])], path / "records.parquet")
    run(tmp_path / "g" / "good", "ok")
    run(tmp_path / "g" / "bad", "failed")
    run(tmp_path / "g" / ".tmp" / "1" / "half", "ok")
    run(tmp_path / "g" / ".superseded" / "old", "ok")
    df = records.read_all(tmp_path)
    assert list(df.run_id) == ["good"] and list(df.grid.isna()) == [True]


def test_runs_written_before_a_column_existed_still_load(tmp_path):
    """The report reads old run folders: a column added since (study, predicted_s, ...) is empty, not missing."""
    import pandas as pd

    from llmbench.core.files import write_json
    from llmbench.measure.records import COLUMNS, read_all
    run = tmp_path / "01_latency-old"
    run.mkdir()
    pd.DataFrame([{"run_id": run.name, "metric": "tpot", "median": 0.1}]).to_parquet(run / "records.parquet")
    write_json({"status": "ok", "run_id": run.name, "notebook": "01_latency", "grid": "g"}, run / "run.json")
    df = read_all(tmp_path)
    assert set(COLUMNS) <= set(df) and df.predicted_s.isna().all() and df["median"].tolist() == [0.1]
