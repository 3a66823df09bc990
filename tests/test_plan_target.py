"""`plan --target`: the real train step compiled for A100 / TPU v5p from this CPU host (the
`plan` extra's compile-only plugins), the verdict and its exit codes, the device-aware branches
(checked in the compiled HLO), and bad input."""

import importlib.metadata
import os
import re
import subprocess
import sys

import pytest

from meditron_jax.plan import hlo_stats
from meditron_jax.plan import targets
from meditron_jax.cli import main
from meditron_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.gin")
# (data 2, stage 2, tensor 2), bf16: 4 pipeline micro-batches of one row per device
MESH = ["train.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=1", "mesh.data=2",
        "mesh.stage=2", "mesh.tensor=2", "pipeline.microbatches=4", "model.dtype='bfloat16'"]


def _have(dist):
    try:
        importlib.metadata.version(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


needs_gpu_plugin = pytest.mark.skipif(not _have("jax-cuda12-plugin"), reason="plan extra not installed")
needs_libtpu = pytest.mark.skipif(not _have("libtpu"), reason="plan extra not installed")


def _flags(params):
    return [x for p in params for x in ("--gin_param", p)]


@needs_gpu_plugin
def test_a100_target_limit_verdict_and_gpu_branches():
    from meditron_jax.plan.compile import compile_step, report
    built = compile_step([TINY], MESH + ["sharding.zero1=True"], target="a100-80gb", dump=True)
    try:
        r = report(built, explain=True)
    finally:
        import shutil
        shutil.rmtree(built.dump_dir, ignore_errors=True)
    assert r["devices"] == 8 and r["target"]["device_kind"] == "NVIDIA A100-SXM4-80GB"
    assert r["target"]["usable_gib"] == pytest.approx(85100068864 * 0.75 / 2 ** 30)
    assert r["verdict"]["fits"] and r["verdict"]["text"].startswith("fits with")
    assert r["verdict"]["margin_gib"] == pytest.approx(r["target"]["usable_gib"] - r["per_device_gib"]["total"])
    # the device-aware branch: the two pipeline sums over `stage` stay in bf16 for a GPU
    recs = hlo_stats.collectives(built.compiled.as_text())
    hlo_stats.assign_axes(recs, built.mesh_sizes)
    stage_sums = [x for x in recs if x.kind == "all-reduce" and x.axes == ("stage",) and x.bytes >= 4096]
    assert stage_sums and {x.dtype for x in stage_sums} == {"bf16"}
    # pipeline sends: exactly what the schedule needs (2 x 5 ticks x [1, 32, 128] bf16)
    c = r["collectives"]
    assert c["measured_wire_gib"]["over_stage"] * 2 ** 30 == 2 * 5 * 32 * 128 * 2
    assert c["theory"]["pipeline_sends_over_stage"]["wire_gib"] == c["measured_wire_gib"]["over_stage"]
    # the gradient sums run once, after the tick loop (pipeline.MANUAL): nothing unexplained
    # about them (before, they ran at every pipeline tick and were listed here)
    assert not any("runs" in u["why"] and "parameter/gradient" in u["why"] for u in c["not_explained"])
    # and the data-parallel traffic is the floor: one fp32 reduce-scatter of one data rank's
    # gradients plus one bf16 all-gather of its working copy (ZeRO-1), nothing more
    assert c["measured_wire_gib"]["parameters_over_data_fsdp"] == pytest.approx(
        c["theory"]["gradient_sum_over_data"]["wire_gib"], rel=1e-3)
    assert r["flops"]["xla_cost_analysis_per_step"] is None and r["flops"]["hlo_dots_per_step"] > 0
    assert r["largest_buffers"] and any("meditron_jax" in (b["source"] or "") for b in r["largest_buffers"])


@needs_libtpu
def test_tpu_slice_target_and_over_limit_exit_1(capsys):
    assert main(["plan", "--gin_file", TINY, *_flags(MESH), "--target", "v5p-16"]) == 0
    out = capsys.readouterr().out
    assert "8 x TPU v5 (v5:2x2x2)" in out and "usable per device: 95.7 GiB" in out
    assert re.search(r"verdict: fits with [\d.]+ GiB to spare", out)
    # 2 x 8M x 128 embedding weights + Adam, replicated over data 8, on 15.75 GiB v5e chips:
    # the TPU compiler refuses it; that is the "does not fit" verdict (exit 1), not a user error
    big = ["train.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=1", "mesh.data=8",
           "model.vocab_size=8000000"]
    assert main(["plan", "--gin_file", TINY, *_flags(big), "--target", "v5e-8", "--top", "3"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"verdict: over by [\d.]+ GiB", out) and "exceeds available HBM" in out
    assert "f32[8000000,128]" in out  # the largest buffer, from the dumped buffer assignment


@needs_gpu_plugin
@pytest.mark.skipif(not _have("nvidia-cudnn-cu12"), reason="cuDNN's library (nvidia-cudnn-cu12) not installed")
def test_cudnn_attention_lowers_for_gpu_target():
    from meditron_jax.plan.compile import compile_step
    params = ["train.seq_len=128", "train.global_batch_size=8", "train.micro_batch_size=2", "mesh.data=4",
              "mesh.tensor=2", "model.dtype='bfloat16'", "model.attention='cudnn'"]
    built = compile_step([TINY], params, target="h100-80gb")
    calls = re.findall(r'custom_call_target="__cudnn\$fmha\w*"', built.compiled.as_text())
    assert any("Backward" in c for c in calls) and any("Backward" not in c for c in calls), calls


def test_tpu_product_names_map_to_libtpu_topologies():
    assert [targets.chip_topology(c, 3) for c in (4, 8, 16, 32, 64, 128, 256)] == [
        "2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8"]
    assert [targets.chip_topology(c, 2) for c in (1, 4, 8, 16, 32, 64, 128, 256)] == [
        "1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"]
    with pytest.raises(UserError, match="power-of-two"):
        targets.chip_topology(12, 3)


def test_bad_targets_are_one_line_exit_2(capsys, monkeypatch):
    assert main(["plan", "--gin_file", TINY, "--target", "a100"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown --target 'a100'" in err[0] and "a100-80gb" in err[0] and "v5p-N" in err[0]
    assert main(["plan", "--gin_file", TINY, "--target", "v5p-128", "--devices", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "v5p-128 is 64 devices" in err[0]
    assert main(["plan", "--gin_file", TINY, "--target", "v6e-512"]) == 2
    assert "at most 256 chips" in capsys.readouterr().err
    # a missing compile-only plugin names the extra to install
    real = targets._version
    monkeypatch.setattr(targets, "_version", lambda d: None if d in ("jax-cuda12-plugin", "libtpu") else real(d))
    for t in ("h100-80gb", "v5e-16"):
        with pytest.raises(UserError, match=re.escape("pip install 'meditron-jax[plan]'")):
            targets.resolve(t, None)


@needs_gpu_plugin
def test_impossible_gpu_device_count_cli_one_line():
    """In a fresh process: also checks that the CUDA plugin's start-up notices on a host
    without a GPU do not reach stderr (the one-line error contract)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    out = subprocess.run([sys.executable, "-m", "meditron_jax", "plan", "--gin_file", TINY, "--target", "a100-80gb",
                          "--devices", "12"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert "--devices 12" in lines[0] and "multiple of 8" in lines[0]


def test_explain_compiles_afresh_when_the_step_is_in_the_compilation_cache():
    """XLA writes its dump (the buffer assignment --explain reads) only when it compiles: with
    JAX's persistent compilation cache on (as in this session, tests/conftest.py) and the step
    already in it, `plan --explain` still lists the largest buffers."""
    import jax

    from meditron_jax.plan.compile import plan
    params = ["model.num_layers=1", "train.seq_len=16", "train.global_batch_size=8", "train.micro_batch_size=1",
              "mesh.data=8"]
    assert jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir
    threshold = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # this small step is cached too
    try:
        plan([TINY], params, devices=8)  # puts the step into the cache
        r = plan([TINY], params, devices=8, explain=True)
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", threshold)
    assert r["largest_buffers"] and any("meditron_jax" in (b["source"] or "") for b in r["largest_buffers"])
