"""What prepare makes besides the plan: the view of the input model that the facilities receive."""

from __future__ import annotations


def test_the_pushed_view_leaves_out_the_aggregation_report_and_server_state(tmp_path):
    from xffl_airflow.federation.rounds.prepare import model_view

    model = tmp_path / "global"
    (model / "server_state").mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "aggregation.json", "server_state/momentum.safetensors"):
        (model / name).write_text(name)
    view = model_view(model, tmp_path / "input")
    assert sorted(p.name for p in view.iterdir()) == ["config.json", "model.safetensors"]
    assert (view / "model.safetensors").read_text() == "model.safetensors"
    model_view(model, view)  # a retry makes it again
    assert sorted(p.name for p in view.iterdir()) == ["config.json", "model.safetensors"]
