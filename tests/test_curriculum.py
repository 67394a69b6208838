"""Curriculum blending (data.schedule): per-iteration shares, continuity, exact resume."""
import numpy as np
import pytest

from megatron_ualm.config import ConfigError, load_config
from megatron_ualm.data.blending import BlendSchedule, DocumentOrder
from megatron_ualm.data.loader import PackedRows, RowSettings
from test_data_loader import VOC, MemorySource, text_doc

GB = 8  # rows per iteration


def sources(lengths=((3, 2), (5, 1), (2, 6))):
    return [MemorySource([text_doc(u + i % 3, a, base=d) for i in range(11 + 4 * d)])
            for d, (u, a) in enumerate(lengths)]


def rows(ds, start, stop):
    return [ds.row_plan(i) for i in range(start, stop)]


def test_schedule_weights_constant_and_linear():
    pts = dict(iterations=(0, 10, 20), weights=((1, 0, 0), (0, 1, 1), (0, 0, 1)))
    const = BlendSchedule(**pts, interpolation="constant", rows_per_iteration=GB)
    lin = BlendSchedule(**pts, interpolation="linear", rows_per_iteration=GB)
    assert const.weights_at_iteration(9).tolist() == [1, 0, 0]
    assert const.weights_at_iteration(10).tolist() == [0, 1, 1]
    assert lin.weights_at_iteration(5).tolist() == [0.5, 0.5, 0.5]
    assert lin.weights_at_iteration(15).tolist() == [0, 0.5, 1]
    assert lin.weights_at_iteration(1000).tolist() == [0, 0, 1]  # the last point holds
    assert lin.weights_at_row(10 * GB - 1).tolist() == lin.weights_at_iteration(9).tolist()


@pytest.mark.parametrize("interpolation", ["constant", "linear"])
def test_every_iteration_has_the_scheduled_shares(interpolation):
    # One example per row and a window of one iteration: each iteration is blended on its own,
    # so its shares are within one example of GB * w(iteration), as a fixed blend's are.
    schedule = BlendSchedule((0, 6, 12), ((6, 1, 1), (1, 1, 6), (1, 3, 0)), interpolation, GB)
    settings = RowSettings(seq_length=64, seed=5, packing=False, pack_window=GB)
    ds = PackedRows(sources(), [1, 1, 1], [0, 1, 2], VOC, settings, num_rows=10**6, schedule=schedule)
    for it in range(20):
        owners = [r[0][0] for r in rows(ds, it * GB, (it + 1) * GB)]
        counts = np.bincount(owners, minlength=3)
        w = schedule.weights_at_iteration(it)
        expected = GB * w / w.sum()
        assert (np.abs(counts - expected) <= 1).all(), (it, counts.tolist(), expected.tolist())
        if w[2] == 0:
            assert counts[2] == 0


def test_packed_windows_follow_the_schedule_and_read_each_dataset_in_order():
    schedule = BlendSchedule((0, 3), ((1, 1, 0), (0, 1, 3)), "constant", GB)
    settings = RowSettings(seq_length=24, seed=2, pack_window=40)
    srcs = sources()
    ds = PackedRows(srcs, [1, 1, 1], [0, 1, 2], VOC, settings, num_rows=10**6, schedule=schedule)
    ds.locate(400)
    seen = {d: [] for d in range(3)}
    for i in range(len(ds._starts) - 1):
        w = ds._first_window + i
        weights = schedule.weights_at_row(ds._starts[i])
        window = ds._window(w)
        owners = [d for r in window for d, _, _ in r]
        counts = np.bincount(owners, minlength=3)
        assert counts.sum() == 40  # nothing dropped: every example fits a row
        assert (np.abs(counts - 40 * weights / weights.sum()) <= 1).all()
        # each dataset continues where the last window left it: the whole run reads dataset d
        # in its epoch permutations, without skipping or repeating
        for d in range(3):
            stream_pos = sorted((pos, doc) for pos, (dd, doc, _) in enumerate(
                [x for r in window for x in r]) if dd == d)
            seen[d] += sorted(doc for _, doc in stream_pos)
    order = DocumentOrder([len(s) for s in srcs], 2)
    for d in range(3):
        n = len(seen[d])
        expected = order.documents(np.full(n, d), np.arange(n))
        # rows of a window are reordered by packing; compare as multisets per dataset
        assert sorted(seen[d]) == sorted(expected.tolist())
    assert len(seen[2]) > 0 and ds._counts[1][2] == 0  # dataset 2 starts only after iteration 3


@pytest.mark.parametrize("interpolation", ["constant", "linear"])
def test_resume_at_any_row_gives_the_same_rows(interpolation):
    schedule = BlendSchedule((0, 4, 9), ((3, 1, 0), (1, 1, 1), (0, 1, 4)), interpolation, GB)
    settings = RowSettings(seq_length=24, seed=7, pack_window=30)
    full = PackedRows(sources(), [1, 1, 1], [0, 1, 2], VOC, settings, num_rows=10**6, schedule=schedule)
    expected = rows(full, 0, 160)
    for row in (0, 1, 37, 64, 101, 150):
        anchor = full.anchor_for(row)
        assert len(anchor) == 2 + 3
        resumed = PackedRows(sources(), [1, 1, 1], [0, 1, 2], VOC, settings, num_rows=10**6,
                             anchor=tuple(int(a) for a in list(anchor)), schedule=schedule)
        assert rows(resumed, row, 160) == expected[row:], row


def _config(tmp_path, *extra):
    train = "[{path: a, task: text_only}, {path: b, task: caption_to_audio}]"
    return load_config(None, [f"data.train={train}", *extra])


def test_schedule_config_is_validated_with_one_line_errors(tmp_path):
    ok = _config(tmp_path, "data.schedule=[{iteration: 0, weights: [1, 0]}, {iteration: 50, weights: [1, 2]}]",
                 "data.schedule_interpolation=linear")
    assert [p.iteration for p in ok.data.schedule] == [0, 50] and ok.data.schedule[1].weights == [1, 2]
    cases = {
        "[{iteration: 5, weights: [1, 1]}]": "data.schedule[0].iteration: the first point must be at iteration 0",
        "[{iteration: 0, weights: [1, 1]}, {iteration: 0, weights: [1, 1]}]": "data.schedule[1].iteration: must be >",
        "[{iteration: 0, weights: [1]}]": "data.schedule[0].weights: needs one weight per data.train entry (2)",
        "[{iteration: 0, weights: [0, 0]}]": "data.schedule[0].weights: must be finite and >= 0",
        "[{iteration: 0, weights: [-1, 2]}]": "data.schedule[0].weights: must be finite and >= 0",
    }
    for value, message in cases.items():
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                           .replace(")", r"\)")):
            _config(tmp_path, f"data.schedule={value}")


@pytest.mark.slow
def test_trainer_follows_the_schedule_and_resumes_exactly_after_kill9(tmp_path):
    import json
    import signal
    from pathlib import Path

    from test_training import losses, start, wait_for_step
    from tiny_training import write_datasets

    data = tmp_path / "data"
    data.mkdir()
    write_datasets(str(data))
    settings = ["training.train_iters=8", "data.pack_window=12", "data.schedule_interpolation=linear",
                "data.schedule=[{iteration: 0, weights: [1, 0, 0]}, {iteration: 4, weights: [0, 1, 2]}]"]
    ref = start(data, tmp_path / "ref", *settings)
    out, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, out
    expected = losses(tmp_path / "ref")
    assert sorted(expected) == list(range(1, 9))
    # the first iteration reads text only: its metrics name no other task
    first = next(json.loads(line) for line in (Path(tmp_path / "ref") / "logs" / "metrics.jsonl").read_text()
                 .splitlines() if json.loads(line).get("kind") == "train")
    assert not any(k.startswith("loss/caption_to_audio") or k.startswith("loss/audio_to_caption") for k in first), first

    victim = start(data, tmp_path / "run", *settings)
    wait_for_step(victim, tmp_path / "run", 5)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    again = start(data, tmp_path / "run", *settings)
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out
    assert "resumed from" in out
    got = losses(tmp_path / "run")
    assert all(got[s] == expected[s] for s in range(1, 9)), (got, expected)  # bitwise
    state = json.loads(next((tmp_path / "run" / "checkpoints").glob("iter_0000008")).joinpath(
        "train_state.json").read_text())
    assert len(state["extra"]["data_anchor"]) == 2 + 3  # window, first row, samples read per dataset
