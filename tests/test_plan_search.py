"""`plan --search` / `--candidates` (`plan.layouts`, `plan.search`): enumeration and pruning,
the memory floor, candidates files, an interrupted search keeping its rows, and one small real
search of the tiny model on the H100 target."""

import json
import os
from types import SimpleNamespace

import pytest

from meditron_jax.cli import main
from meditron_jax.errors import UserError
from meditron_jax.models.config import PRESETS
from meditron_jax.plan import layouts as lay
from meditron_jax.plan import search
from tests.test_plan_target import needs_gpu_plugin

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.gin")
M7 = PRESETS["meditron_7b"]
GIB = 2 ** 30


def test_enumeration_every_layout_runs_and_the_cards_is_there():
    found, dropped = lay.enumerate_layouts(M7, 1600, 2048, 8, remats=("full",), micros=(1, 2, 10))
    assert found and all(lay.check(x, M7, 1600, 2048, 8) is None for x in found)
    assert all(x.devices == 8 for x in found)
    card = [x for x in found if (x.data, x.stage, x.tensor, x.fsdp, x.micro, x.microbatches, x.repeats)
            == (2, 4, 1, 1, 10, 8, 4)]
    assert len(card) == 2  # ZeRO-1 on and off
    # dropped by divisibility, each for its reason: micro 10 x data 8 does not divide 1600 ...
    assert dropped["batch not divisible"] > 0
    assert lay.check(lay.Layout(8, 1, 1, 1, 3, False, "full"), M7, 1600, 2048, 8).startswith("global batch")
    # ... and tensor 3 never appears (8 devices), stage 8 x repeats 8 does not divide 32 layers
    assert lay.check(lay.Layout(1, 1, 1, 8, 1, False, "full", 8, 8), M7, 1600, 2048, 8).startswith("stage 8")
    assert not any(x.zero1 and x.data == 1 for x in found)  # ZeRO-1 splits over data: no twin without it


def test_memory_floor_arithmetic_and_pruning():
    P = M7.num_params()
    dp8 = lay.Layout(8, 1, 1, 1, 1, False, "full")
    tok = 1 * 2048
    acts = 32 * tok * 4096 * 2  # full remat keeps each layer's input
    assert lay.memory_floor(dp8, M7, 2048) == pytest.approx(16 * P + acts)
    z = lay.Layout(8, 1, 1, 1, 1, True, "full")
    assert lay.memory_floor(z, M7, 2048) == pytest.approx(12 * P / 8 + 4 * P + acts)
    fsdp = lay.Layout(1, 8, 1, 1, 1, False, "full")
    assert lay.memory_floor(fsdp, M7, 2048) == pytest.approx(16 * P / 8 + acts)
    sp = lay.Layout(1, 8, 1, 1, 1, False, "save_proj")
    assert lay.memory_floor(sp, M7, 2048) > lay.memory_floor(fsdp, M7, 2048)
    # plain data parallelism of a 7B model (16 B/param = 108 GB) cannot fit an 80 GB A100: pruned
    assert lay.memory_floor(dp8, M7, 2048) > 59.4 * GIB > lay.memory_floor(fsdp, M7, 2048)


def test_rough_estimate_charges_fsdp_gathers_over_a_thin_network():
    """The rough cut's FSDP term: every device moves (f - 1) / f of a stage's weights per gather,
    not 1 / f of that. Compiled on the A100 target (docs/planning.md), meditron_70b on 128 GPUs of
    the card's nodes (one 200 Gb/s card per node) as FSDP 64 x TP 2 exposes 146 s of fsdp
    gathers per step; its gin's TP 8 x PP 8 x DP 2 keeps them inside the node."""
    m70 = PRESETS["meditron_70b"]
    sysm = search.synthetic_system(search.Spec([TINY], [], "a100-80gb", 128, network={"system_name": "meditron"}))
    fsdp = lay.Layout(1, 64, 2, 1, 1, False, "dots")
    card = lay.Layout(2, 1, 8, 8, 2, True, "full", 16, 5)
    est = {x: lay.quick_estimate(x, m70, 512, 4096, sysm) for x in (fsdp, card)}
    assert est[fsdp] > 100 and est[fsdp] > 2 * est[card]


def test_candidates_csv_json_and_bad_rows(tmp_path):
    csv = tmp_path / "c.csv"
    csv.write_text("data,tensor,stage,fsdp,micro,zero1,remat,microbatches,repeats\n"
                   "2,1,4,1,10,true,full,8,4\n16,4,1,1,10,1,full,,\n")
    a, b = lay.read_candidates(str(csv))
    assert (a.data, a.stage, a.microbatches, a.repeats, a.zero1) == (2, 4, 8, 4, True)
    assert (b.data, b.tensor, b.stage, b.microbatches, b.repeats) == (16, 4, 1, None, 1)
    js = tmp_path / "c.json"
    js.write_text(json.dumps([{"data": 1, "tensor": 2, "stage": 2, "fsdp": 2, "micro": 1, "zero1": False,
                               "remat": "save_proj"}]))
    (c,) = lay.read_candidates(str(js))
    assert c.microbatches == 4 and c.remat == "save_proj"  # stage 2: pipeline.microbatches' default 2 x stages
    assert "mesh.fsdp=2" in c.gin_params() and "pipeline.microbatches=4" in c.gin_params()
    for text, msg in (("data,tensor\n1,1\n", "missing"), ("data,tensor,stage,fsdp,micro,zero1,remat,x\n1,1,1,1,1,0,full,3\n",
                                                             "unknown column"),
                      ("data,tensor,stage,fsdp,micro,zero1,remat\n1,1,1,1,1,maybe,full\n", "not true or false"),
                      ("[{\"data\": 1", "not valid JSON")):
        bad = tmp_path / "bad.csv"
        bad.write_text(text)
        with pytest.raises(UserError, match=msg):
            lay.read_candidates(str(bad))


def test_candidate_batches_and_rows_the_project_cannot_run(tmp_path):
    f = tmp_path / "c.csv"
    f.write_text("data,tensor,stage,fsdp,micro,zero1,remat,accumulation,global_batch\n"
                 "4,1,1,2,2,true,full,4,\n1,8,1,1,1,false,full,,24\n1,1,3,8,1,0,full,,\n8,1,1,1,1,0,full,,20\n")
    a, b, c, d = lay.read_candidates(str(f))
    assert a.global_batch == 2 * 4 * 2 * 4 and "train.global_batch_size=64" in a.gin_params()
    assert b.global_batch == 24
    run = SimpleNamespace(model=M7, train=SimpleNamespace(global_batch_size=1600, seq_len=2048))
    spec = search.Spec([TINY], [], "h100-80gb", 8)
    chosen, notes = search.choose(spec, run, 100, [a, b, c, d], log=lambda *_: None)
    assert chosen == [a, b]  # 24 sequences divide over micro 1 x data 1; stage 3 x fsdp 8 is not 8 devices
    bad_c, bad_d = notes["invalid"]
    assert bad_c["label"] == c.label() and bad_c["error"].startswith("cannot run: mesh has 24 devices")
    # the row's own batch is checked, not the gin's (1600 would divide over data 8)
    assert bad_d["error"].startswith("cannot run: global batch 20 not divisible")


def test_bad_candidates_file_is_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("data,tensor\n1,1\n")
    assert main(["plan", "--gin_file", TINY, "--target", "h100-80gb", "--devices", "2", "--candidates", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing" in err[0]


def test_interrupted_search_keeps_the_rows_done(tmp_path, monkeypatch):
    calls = []

    def fake(spec, layout):
        calls.append(layout)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return {"layout": layout.as_dict(), "label": layout.label(), "gin_params": layout.gin_params(), "fits": True,
                "step_seconds": float(len(calls)), "tokens_per_s_per_device": 1.0, "mfu": 0.1, "dominant": "compute",
                "memory_gib": {"total": 1.0}, "limit_gib": 2.0}
    monkeypatch.setattr(search, "evaluate", fake)
    spec = search.Spec([TINY], [], "h100-80gb", 2)
    chosen = [lay.Layout(2, 1, 1, 1, m, False, "full") for m in (1, 2, 4, 8)]
    out = tmp_path / "rows.jsonl"
    rows, completed = search.run_search(spec, chosen, str(out), workers=0, header={"h": 1})
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert not completed and len(rows) == 2 and lines[0] == {"search": {"h": 1}}
    assert [x["label"] for x in lines[1:]] == [chosen[0].label(), chosen[1].label()]
    assert search.ranked(rows)[0]["step_seconds"] == 1.0


@needs_gpu_plugin
def test_small_real_search_on_the_h100_target(tmp_path, capsys):
    """Two candidates of the tiny model on 2 H100s, compiled in a worker process: ranked rows with
    predictions, the JSON lines, the verdict on the gin's own layout and a ready command."""
    cands = tmp_path / "c.csv"
    cands.write_text("data,tensor,stage,fsdp,micro,zero1,remat\n2,1,1,1,2,false,full\n1,2,1,1,4,false,full\n")
    out = tmp_path / "rows.jsonl"
    params = ["train.seq_len=64", "train.global_batch_size=8", "train.micro_batch_size=2", "mesh.data=2",
              "model.dtype='bfloat16'"]
    argv = ["plan", "--gin_file", TINY, "--target", "h100-80gb", "--devices", "2", "--candidates", str(cands),
            "--workers", "1", "--out", str(out)] + [x for p in params for x in ("--gin_param", p)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    rows = [json.loads(x) for x in out.read_text().splitlines()][1:]
    assert len(rows) == 2 and all(r["fits"] and r["step_seconds"] > 0 for r in rows)
    for r in rows:
        b = r["breakdown_seconds"]
        assert b["compute"] + b["exposed_communication"] + b["bubble"] == pytest.approx(r["step_seconds"], rel=1e-6)
        assert r["tokens_per_s_per_device"] == pytest.approx(8 * 64 / r["step_seconds"] / 2, rel=1e-6)
    assert any(r["breakdown_seconds"]["exposed_by_axes"].get("tensor", 0) > 0 for r in rows)
    best = min(rows, key=lambda r: r["step_seconds"])
    assert "the gin's own layout" in text and "best layout, ready to run" in text
    assert " ".join(f'--gin_param "{p}"' for p in best["gin_params"]) in text


def test_workers_time_limit_and_a_dying_compiler():
    """`plan.workers`: a task over the time limit and one that aborts its process become failed
    rows that say why (the compiler's own fatal line), their workers are replaced, and every
    other task still finishes (a `multiprocessing.Pool` waited forever here)."""
    from meditron_jax.plan.workers import Failure, run_tasks
    from tests.fake_compiles import fake_compile

    tasks = [("ok", 1), ("hang", 600), ("abort", 0), ("ok", 2), ("raise", 0), ("ok", 3)]
    got = dict(run_tasks(tasks, fake_compile, workers=2, timeout_s=5))  # margin: the abort spawns a filter
    assert sorted(got) == list(range(len(tasks)))
    assert [got[i] for i in (0, 3, 5)] == [2, 4, 6]
    assert all(isinstance(got[i], Failure) for i in (1, 2, 4))
    assert got[1] == "compile over 5 s (--layout_timeout_s): stopped"
    assert got[2].startswith("the compiler's process died (SIGABRT): F1207") and "Check failed: fake partition" in got[2]
    assert got[4] == "ValueError: bad layout"
