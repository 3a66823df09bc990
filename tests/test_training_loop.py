"""The training loop's hook cadence (training/loop.py), without compiling anything: a fake step
counts, the hooks record when they ran."""

from meditron_jax.training.loop import BadStepGuard, Loop


def _loop(total, start=0):
    calls = []

    def step_fn(state, batch):
        return {"n": state["n"] + 1, "bad_streak": state["bad_streak"]}, {"batch": batch}

    loop = Loop(step_fn, lambda: len(calls), total)
    return loop, calls


def test_cadence_at_end_and_order():
    loop, calls = _loop(7)
    loop.add_hook(lambda i: calls.append(("every", i.step)))
    loop.add_hook(lambda i: calls.append(("three", i.step)), every=3)
    loop.add_hook(lambda i: calls.append(("two_or_five", i.step)), every=(2, 5), at_end=True)
    assert loop.run({"n": 0, "bad_streak": 0}, 0) == (7, 0)
    assert [s for k, s in calls if k == "every"] == [1, 2, 3, 4, 5, 6, 7]
    assert [s for k, s in calls if k == "three"] == [3, 6]
    assert [s for k, s in calls if k == "two_or_five"] == [2, 4, 5, 6, 7]  # 7: the last step
    assert calls.index(("every", 6)) < calls.index(("three", 6)) < calls.index(("two_or_five", 6))


def test_resume_counts_from_start():
    loop, calls = _loop(6)
    loop.before_step.append(lambda s: calls.append(("before", s)))
    loop.add_hook(lambda i: calls.append(("saved", i.step)), every=4, at_end=True)
    assert loop.run({"n": 0, "bad_streak": 0}, 3) == (6, 0)
    assert calls == [("before", 4), ("saved", 4), ("before", 5), ("before", 6), ("saved", 6)]


def test_request_stop_forces_end_hooks_then_stops():
    loop, calls = _loop(100)
    loop.add_hook(lambda i: i.request_stop(75) if i.step == 3 else None)
    loop.add_hook(lambda i: calls.append(("save", i.step)), every=10, at_end=True)
    loop.add_hook(lambda i: calls.append(("eval", i.step)), every=10)
    assert loop.run({"n": 0, "bad_streak": 0}, 0) == (3, 75)
    assert calls == [("save", 3)]


def test_returned_status_stops_at_once():
    loop, calls = _loop(100)
    loop.add_hook(lambda i: 3 if i.step == 2 else None)
    loop.add_hook(lambda i: calls.append(i.step))
    assert loop.run({"n": 0, "bad_streak": 0}, 0) == (2, 3)
    assert calls == [1]  # the hook after the one that stopped did not run at step 2


def test_bad_step_guard(capsys):
    class Info:
        step, notes = 9, {}
        state = {"bad_streak": 2}

    assert BadStepGuard(3)(Info) is None and Info.notes["bad_streak"] == 2
    assert BadStepGuard(2)(Info) == 3
    assert "2 consecutive steps with a non-finite loss" in capsys.readouterr().err
    assert BadStepGuard(0)(Info) is None  # 0 disables the guard
