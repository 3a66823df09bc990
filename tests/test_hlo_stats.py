"""hlo_stats: collective accounting from compiled HLO text (hand-written module, then a real step)."""

import pytest

from meditron_jax.plan import hlo_stats

# A hand-written post-optimization module: an all-reduce inside a while (5 trips) inside a
# while (3 trips), an async all-gather (`*-start`/`*-done`), a reduce-scatter wrapped in
# `async-start`, a collective-permute and iota / mesh replica-group forms.
HLO = r"""HloModule jit_step, is_scheduled=true, num_partitions=8

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %s = f32[] add(%x, %y)
}

%inner_body (p: (s32[], bf16[4,256])) -> (s32[], bf16[4,256]) {
  %p = (s32[], bf16[4,256]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %v = bf16[4,256]{1,0} get-tuple-element(%p), index=1
  %ar = bf16[4,256]{1,0} all-reduce(%v), channel_id=1, replica_groups={{0,1},{2,3},{4,5},{6,7}}, use_global_device_ids=true, to_apply=%add, metadata={op_name="jit(step)/psum" source_file="model.py" source_line=12}
  ROOT %t = (s32[], bf16[4,256]{1,0}) tuple(%i, %ar)
}

%inner_cond (p: (s32[], bf16[4,256])) -> pred[] {
  %p = (s32[], bf16[4,256]{1,0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

%outer_body (q: (s32[], bf16[4,256])) -> (s32[], bf16[4,256]) {
  %q = (s32[], bf16[4,256]{1,0}) parameter(0)
  ROOT %w = (s32[], bf16[4,256]{1,0}) while(%q), condition=%inner_cond, body=%inner_body, backend_config={"known_trip_count":{"n":"5"}}
}

%outer_cond (q: (s32[], bf16[4,256])) -> pred[] {
  %q = (s32[], bf16[4,256]{1,0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

%rs_comp (a: f32[64,8]) -> f32[16,8] {
  %a = f32[64,8]{1,0} parameter(0)
  ROOT %rs = f32[16,8]{1,0} reduce-scatter(%a), channel_id=3, replica_groups=[2,4]<=[8], dimensions={0}, to_apply=%add
}

ENTRY %main (arg: bf16[4,256], g: f32[64,8], h: f32[10]) -> f32[16,8] {
  %arg = bf16[4,256]{1,0} parameter(0)
  %g = f32[64,8]{1,0} parameter(1)
  %h = f32[10]{0} parameter(2)
  %zero = s32[] constant(0)
  %init = (s32[], bf16[4,256]{1,0}) tuple(%zero, %arg)
  %loop = (s32[], bf16[4,256]{1,0}) while(%init), condition=%outer_cond, body=%outer_body, backend_config={"known_trip_count":{"n":"3"}}
  %ags = (f32[10]{0}, f32[20]{0}) all-gather-start(%h), channel_id=2, replica_groups=mesh['a'=2,'b'=4], device_ids=([4,2]T(1,0)) {'a'}, dimensions={0}, use_global_device_ids=true
  %agd = f32[20]{0} all-gather-done(%ags)
  %ar2 = f32[10]{0} all-reduce(%h), channel_id=5, replica_groups=[4,2]<=[2,4]T(1,0), to_apply=%add
  %cp = f32[10]{0} collective-permute(%h), channel_id=4, source_target_pairs={{0,1},{1,0},{2,3},{3,2}}
  %as = ((f32[64,8]{1,0}), f32[16,8]{1,0}, s32[]) async-start(%g), calls=%rs_comp
  ROOT %ad = f32[16,8]{1,0} async-done(%as)
}
"""


def test_trip_counts_bytes_and_groups_by_hand():
    recs = {r.kind if r.name != "ar2" else "ar2": r for r in hlo_stats.collectives(HLO)}
    assert sorted(recs) == ["all-gather", "all-reduce", "ar2", "collective-permute", "reduce-scatter"]
    ar = recs["all-reduce"]
    assert ar.trip_count_product == 3 * 5 and ar.trip_count_known and ar.loop_depth == 2
    assert ar.bytes == 4 * 256 * 2 and ar.group_size == 2 and ar.dtype == "bf16"
    assert ar.wire_bytes == 2 * (2 - 1) / 2 * 4 * 256 * 2
    assert ar.source == "model.py:12"
    ag = recs["all-gather"]  # async start counted once, done skipped; operand 10 floats
    assert ag.trip_count_product == 1 and ag.bytes == 40 and ag.group_size == 2 and ag.loop_depth == 0
    assert ag.result_shape == [(20,)] and ag.result_bytes == 80  # the start's (operand, result) tuple
    # mesh ['a'=2,'b'=4] laid over ids arange(8).reshape(4,2).T = [[0,2,4,6],[1,3,5,7]]:
    # grouping along 'a' pairs ids 2k and 2k+1
    assert sorted(map(sorted, ag.replica_groups)) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert ag.wire_bytes == (2 - 1) * 40
    rs = recs["reduce-scatter"]  # inside async-start's computation, counted through it
    assert rs.bytes == 64 * 8 * 4 and rs.group_size == 4 and rs.result_bytes == 16 * 8 * 4 and rs.loop_depth == 0
    assert rs.replica_groups == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert rs.wire_bytes == 3 / 4 * 64 * 8 * 4
    cp = recs["collective-permute"]  # 4 of 8 devices send their 40 bytes
    assert cp.wire_bytes == 40 * 4 / 8
    hlo_stats.assign_axes(recs.values(), {"x": 2, "y": 4})
    assert ar.axes == ("y",) and ag.axes == ("y",) and rs.axes == ("y",) and cp.axes == ("y",)
    assert recs["ar2"].replica_groups == [[0, 4], [1, 5], [2, 6], [3, 7]] and recs["ar2"].axes == ("x",)
    s = hlo_stats.summary(recs.values())
    assert s["by_kind"]["all-reduce"]["executions"] == 15 + 1
    assert s["by_kind"]["all-reduce"]["bytes"] == 15 * 2048 + 40
    assert s["by_kind_and_axes"]["all-reduce over x"]["bytes"] == 40


def test_dot_flops_weighted_by_trip_count():
    text = r"""HloModule m, num_partitions=1

%body (p: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %p = (s32[], f32[8,16]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %a = f32[8,16]{1,0} get-tuple-element(%p), index=1
  %w = f32[16,16]{1,0} constant({...})
  %d = f32[8,16]{1,0} dot(%a, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %t = (s32[], f32[8,16]{1,0}) tuple(%i, %d)
}

%cond (p: (s32[], f32[8,16])) -> pred[] {
  %p = (s32[], f32[8,16]{1,0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main (x: f32[8,16]) -> (s32[], f32[8,16]) {
  %x = f32[8,16]{1,0} parameter(0)
  %z = s32[] constant(0)
  %init = (s32[], f32[8,16]{1,0}) tuple(%z, %x)
  ROOT %l = (s32[], f32[8,16]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"7"}}
}
"""
    flops, n = hlo_stats.dot_flops(text)
    assert n == 1 and flops == 7 * 2 * 8 * 16 * 16


def test_trip_count_from_the_loop_condition_when_not_annotated():
    """TPU modules carry no known_trip_count: read it off `i < N` with i starting at a constant."""
    text = HLO.replace(', backend_config={"known_trip_count":{"n":"3"}}', "")
    text = text.replace("""  %q = (s32[], bf16[4,256]{1,0}) parameter(0)
  ROOT %c = pred[] constant(true)""", """  %q = (s32[], bf16[4,256]{1,0}) parameter(0)
  %iq = s32[] get-tuple-element(%q), index=0
  %n = s32[] constant(7)
  ROOT %c = pred[] compare(%iq, %n), direction=LT""")
    text = text.replace("%zero = s32[] constant(0)", "%zero = s32[] constant(3)")
    ar = next(r for r in hlo_stats.collectives(text) if r.name == "ar")
    assert ar.trip_count_product == (7 - 3) * 5 and ar.trip_count_known


@pytest.mark.slow
def test_pipeline_step_collectives_match_shapes():
    """The real train step on (data 2, stage 2, tensor 2), tiny model, bf16 compute, seq 32,
    batch 8 in 4 pipeline micro-batches: per-device micro-batch b = 8 / 4 / 2 = 1 row.

    By hand: each pipeline tick sends one [b, T, D] = [1, 32, 128] activation to the next
    stage, forward and backward, over M + S - 1 = 5 ticks: 2 x 5 x 16 KiB (fp32 on CPU). Data
    parallel gradient sums move fp32 parameter bytes over `data`: the stage's layer weights per
    device (tensor 2) are 92416 floats per layer. On CPU the two sums over `stage` run in fp32
    (pipeline._boundary_dtype); test_plan_target checks bf16 for a GPU target."""
    from meditron_jax.plan.compile import compile_step
    params = ["train.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=1",
              "mesh.data=2", "mesh.stage=2", "mesh.tensor=2", "pipeline.microbatches=4", "model.dtype='bfloat16'"]
    built = compile_step(["configs/tiny.gin"], params, devices=8)
    recs = hlo_stats.collectives(built.compiled.as_text())
    hlo_stats.assign_axes(recs, built.mesh_sizes)
    perm = [r for r in recs if r.kind == "collective-permute"]
    assert {r.axes for r in perm} == {("stage",)}
    assert sum(r.trip_count_product for r in perm) == 2 * 5
    # XLA:CPU computes bf16 in fp32 (float normalization), so the sends are fp32 here
    assert sum(r.wire_bytes_per_step for r in perm) == 2 * 5 * 1 * 32 * 128 * 4
    assert {r.dtype for r in perm} == {"f32"}
    stage_sums = [r for r in recs if r.kind == "all-reduce" and r.axes == ("stage",) and r.bytes >= 4096]
    assert stage_sums and {r.dtype for r in stage_sums} == {"f32"}  # the CPU branch
    D, N, K, H, F, V = 128, 4, 2, 32, 352, 2048
    per_layer = (D * N * H + 2 * D * K * H + N * H * D + 3 * D * F) // 2 + 2 * D  # tensor 2; norms whole
    assert per_layer == 92416
    over_data = [r for r in recs if r.axes == ("data",) and r.kind == "all-reduce"]
    # the stage's 2 layers' gradients, accumulated over the ticks and summed over data once
    # per step, after the tick loop (pipeline.MANUAL), not once per layer per tick
    layer_grads = [r for r in over_data if r.bytes >= 2 * per_layer * 4]
    assert layer_grads, [(r.shape, r.bytes) for r in over_data]
    assert [r.trip_count_product for r in layer_grads] == [1], [(r.shape, r.trip_count_product) for r in layer_grads]
    # every data-axis sum runs once per step (train_step.accumulate_gradients), and together they
    # are exactly the gradient bytes: the stage's layers, embed_tokens and lm_head ([V/2, D] each,
    # vocab over tensor), the final norm, and the loss and token-count scalars
    assert {r.trip_count_product for r in over_data} == {1}, [(r.shape, r.trip_count_product) for r in over_data]
    assert sum(r.bytes for r in over_data) == 2 * per_layer * 4 + 2 * (V // 2 * D * 4) + D * 4 + 2 * 4
