"""A finalize killed inside an atomic write leaves ``.<name>.<random>``: the next attempt removes
those of its own files, and nothing else."""

from xffl_airflow.federation.rounds.cleanup import killed_writes, remove_leftovers


def test_only_the_temporaries_of_the_named_files_are_removed(tmp_path):
    left = [".manifest.json.k2j4h5g6", ".report.png.a1b2c3d4.png"]
    kept = ["manifest.json", "report.png", ".hidden", "manifest.json.bak", ".global.partial-x"]
    for name in left + kept:
        (tmp_path / name).write_text("x")
    remove_leftovers(killed_writes(tmp_path, ["manifest.json", "report.png"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
