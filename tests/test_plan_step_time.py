"""The step-time model's arithmetic (`plan.step_time`, `plan.hlo_cost`, `plan.hardware`) on a
hand-made HLO module: every term (matmul, memory-bound, attention kernel, kernel launches,
collective latency and bandwidth per link, overlap of an async collective, loop trip counts,
the pipeline bubble, sliced / in-place fusion bytes) checked against the same physics written
out by hand."""

import math
from types import SimpleNamespace

import pytest

from meditron_jax.plan import hardware, hlo_stats, step_time
from meditron_jax.plan.hlo_cost import CostModel, attention_flops
from meditron_jax.plan.hlo_text import parse
from tests.test_plan_target import needs_libtpu

# 4 devices, mesh (stage 2, tensor 2): logical id = 2 x stage + tensor; nodes of 2 GPUs, so the
# tensor pairs {0,1} {2,3} stay on NVLink and the stage pairs {0,2} {1,3} cross the network.
SIZES = {"data": 1, "stage": 2, "fsdp": 1, "tensor": 2}
HLO = """HloModule handmade, is_scheduled=true, num_partitions=4

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%fused_mul (p0: bf16[1024,1024]) -> bf16[1024,1024] {
  %p0 = bf16[1024,1024]{1,0} parameter(0)
  ROOT %m = bf16[1024,1024]{1,0} multiply(%p0, %p0)
}

%fused_slice (q0: bf16[8,1024,1024], q1: s32[]) -> bf16[1,1024,1024] {
  %q0 = bf16[8,1024,1024]{2,1,0} parameter(0)
  %bc = bf16[8,1024,1024]{2,1,0} bitcast(%q0)
  %q1 = s32[] parameter(1)
  %z = s32[] constant(0)
  ROOT %ds = bf16[1,1024,1024]{2,1,0} dynamic-slice(%bc, %q1, %z, %z), dynamic_slice_sizes={1,1024,1024}
}

%fused_update (u0: bf16[8,1024,1024], u1: bf16[1,1024,1024], u2: s32[]) -> bf16[8,1024,1024] {
  %u0 = bf16[8,1024,1024]{2,1,0} parameter(0)
  %u1 = bf16[1,1024,1024]{2,1,0} parameter(1)
  %u2 = s32[] parameter(2)
  %z2 = s32[] constant(0)
  ROOT %dus = bf16[8,1024,1024]{2,1,0} dynamic-update-slice(%u0, %u1, %u2, %z2, %z2)
}

%body (arg: (s32[], bf16[1024,1024])) -> (s32[], bf16[1024,1024]) {
  %arg = (s32[], bf16[1024,1024]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%arg), index=0
  %x = bf16[1024,1024]{1,0} get-tuple-element(%arg), index=1
  %cp = bf16[1024,1024]{1,0} collective-permute(%x), channel_id=5, source_target_pairs={{0,2},{2,0},{1,3},{3,1}}
  %y = bf16[1024,1024]{1,0} dot(%cp, %cp), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %one = s32[] constant(1)
  %j = s32[] add(%i, %one)
  ROOT %t = (s32[], bf16[1024,1024]{1,0}) tuple(%j, %y)
}

%cond (carg: (s32[], bf16[1024,1024])) -> pred[] {
  %carg = (s32[], bf16[1024,1024]{1,0}) parameter(0)
  %ci = s32[] get-tuple-element(%carg), index=0
  %five = s32[] constant(5)
  ROOT %lt = pred[] compare(%ci, %five), direction=LT
}

ENTRY %main (p: bf16[1024,1024], st: bf16[8,1024,1024], idx: s32[], q: bf16[2,2048,8,128], k: bf16[2,2048,2,128]) -> bf16[1024,1024] {
  %p = bf16[1024,1024]{1,0} parameter(0)
  %st = bf16[8,1024,1024]{2,1,0} parameter(1)
  %idx = s32[] parameter(2)
  %q = bf16[2,2048,8,128]{3,2,1,0} parameter(3)
  %k = bf16[2,2048,2,128]{3,2,1,0} parameter(4)
  %ars = bf16[1024,1024]{1,0} all-reduce-start(%p), channel_id=1, replica_groups={{0,1},{2,3}}, to_apply=%add
  %d = bf16[1024,1024]{1,0} dot(%p, %p), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %ard = bf16[1024,1024]{1,0} all-reduce-done(%ars)
  %f = bf16[1024,1024]{1,0} fusion(%ard), kind=kLoop, calls=%fused_mul
  %sl = bf16[1,1024,1024]{2,1,0} fusion(%st, %idx), kind=kLoop, calls=%fused_slice
  %up = bf16[8,1024,1024]{2,1,0} fusion(%st, %sl, %idx), kind=kLoop, calls=%fused_update
  %ag = bf16[2048,1024]{1,0} all-gather(%f), channel_id=2, replica_groups={{0,2},{1,3}}, dimensions={0}
  %att = bf16[2,2048,8,128]{3,2,1,0} custom-call(%q, %k, %k), custom_call_target="__gpu$xla.gpu.triton"
  %zero = s32[] constant(0)
  %init = (s32[], bf16[1024,1024]{1,0}) tuple(%zero, %d)
  %w = (s32[], bf16[1024,1024]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  ROOT %out = bf16[1024,1024]{1,0} get-tuple-element(%w), index=1
}
"""
MIB2 = 1024 * 1024 * 2  # one bf16[1024,1024]


def _predict(hlo=HLO, ticks=5):
    mod = parse(hlo)
    recs = hlo_stats.collectives(mod)
    hlo_stats.assign_axes(recs, SIZES)
    sysm = hardware.system("h100-80gb", [SimpleNamespace(process_index=i // 2, id=i) for i in range(4)])
    return step_time.predict(mod, recs, sysm, model_flops=1e12, tokens=4096, devices=4, stages=2, ticks=ticks), sysm


def _expected(sysm):
    """The model's terms, by hand (docs/planning.md)."""
    c, e = sysm.chip, sysm.eff
    hbm = c.hbm_bandwidth * e.memory
    nvlink = c.fast_link * e.fast_link
    net = min(nvlink, sysm.node_network * e.network * 1 / 2)  # one of a node's 2 GPUs in each group
    gemm = 2.0 * 1024 ** 3
    t_dot = max(gemm / (c.peak_flops * e.matmul * hardware.gemm_efficiency(c, 1024, 1024, 1024)), 3 * MIB2 / hbm)
    x = {}
    # entry: all-reduce (tensor, NVLink) started, hidden behind the dot, the rest exposed
    ar = e.launch + 2 * (1 * e.hop_fast) + 2 * (1 / 2) * MIB2 / nvlink
    x["matmul"] = t_dot
    x["tensor"] = max(0.0, ar - (t_dot + e.kernel))
    x["hidden"] = ar - x["tensor"]
    # fusions: a multiply (read + write), a slice of 1 of 8 layers, an in-place update of one
    x["memory"] = 2 * MIB2 / hbm + (2 * MIB2 + 4) / hbm + (2 * MIB2 + 4) / hbm
    # synchronous all-gather over stage (the network: 2 nodes, one member each)
    ag = e.launch + 1 * (0 * e.hop_fast + 2 * e.hop_network) + 1 * MIB2 / net
    x["stage"] = ag
    # attention kernel: 2 matmuls of 2 B N T S H, causal half, at the flash rate
    fl = 2 * (2 * (2 * 2048 * 8 * 128) * 2048) * 0.5
    att_bytes = 2 * (2 * 2048 * 8 * 128) * 2 + 2 * (2 * 2048 * 2 * 128) * 2
    assert fl / (c.peak_flops * step_time.ATTENTION_EFFICIENCY) > att_bytes / hbm  # compute-bound
    x["attention"] = fl / (c.peak_flops * step_time.ATTENTION_EFFICIENCY)
    launches = 6  # d, f, sl, up, att in the entry ... plus the body's 2 per trip below
    # the tick loop: 5 trips of (permute over stage, dot, counter add); 1/5 of it is bubble
    cp = e.launch + e.hop_network + MIB2 / net
    add = 12 / hbm
    body = cp + t_dot + e.kernel + add + e.kernel
    loop = 5 * body
    x["bubble"] = loop * (2 - 1) / 5
    x["loop_matmul"] = 5 * t_dot * 4 / 5
    x["loop_stage"] = 5 * cp * 4 / 5
    x["loop_memory"] = 5 * add * 4 / 5
    x["launches"] = (launches - 1) * e.kernel + 5 * 2 * e.kernel * 4 / 5
    x["step"] = (t_dot + e.kernel + x["tensor"] + 2 * MIB2 / hbm + e.kernel + 2 * (2 * MIB2 + 4) / hbm + 2 * e.kernel
                 + ag + x["attention"] + e.kernel + loop)
    return x


def test_each_term_of_the_model_by_hand():
    p, sysm = _predict()
    x = _expected(sysm)
    b = p["breakdown_seconds"]
    assert b["matmul"] == pytest.approx(x["matmul"] + x["loop_matmul"], rel=1e-9)
    assert b["memory_bound"] == pytest.approx(x["memory"] + x["loop_memory"], rel=1e-9)
    assert b["attention_kernels"] == pytest.approx(x["attention"], rel=1e-9)
    assert b["kernel_launches"] == pytest.approx(x["launches"], rel=1e-9)
    assert b["exposed_by_axes"]["tensor"] == pytest.approx(x["tensor"], rel=1e-9)
    assert b["exposed_by_axes"]["stage"] == pytest.approx(x["stage"] + x["loop_stage"], rel=1e-9)
    assert b["hidden_communication"] == pytest.approx(x["hidden"], rel=1e-9)
    assert b["bubble"] == pytest.approx(x["bubble"], rel=1e-9)
    assert p["step_seconds"] == pytest.approx(x["step"], rel=1e-9)
    assert b["compute"] + b["exposed_communication"] + b["bubble"] == pytest.approx(p["step_seconds"], rel=1e-9)
    assert p["tokens_per_s_per_device"] == pytest.approx(4096 / x["step"] / 4, rel=1e-9)
    assert p["mfu"] == pytest.approx(1e12 / (x["step"] * 4 * sysm.chip.peak_flops), rel=1e-9)
    assert p["dominant"] == "communication over stage"
    # the collectives the model saw: wire bytes of the ring formulas
    assert x["tensor"] > 0 and x["hidden"] > 0  # the all-reduce is partly hidden, partly exposed


def test_loop_trip_counts_and_bubble_scale():
    """Ten trips cost twice five; outside a tick loop (trip != M R + S - 1) there is no bubble."""
    p5, _ = _predict()
    p10, _ = _predict(HLO.replace('"n":"5"', '"n":"10"').replace("constant(5)", "constant(10)"), ticks=99)
    body = (p10["step_seconds"] - p5["step_seconds"]) / 5  # the bubble is part of the step, not extra
    assert body > 0 and p10["breakdown_seconds"]["bubble"] == 0.0
    assert p5["breakdown_seconds"]["bubble"] == pytest.approx(5 * body * (2 - 1) / 5, rel=1e-9)


def test_network_is_slower_than_nvlink_and_the_meditron_node_slower_still():
    devs = [SimpleNamespace(process_index=i // 8, id=i) for i in range(16)]
    dgx = hardware.system("a100-80gb", devs)
    med = hardware.system("a100-80gb", devs, system_name="meditron")
    inside = hardware.link_for_group(dgx, list(range(8)))
    across8 = hardware.link_for_group(dgx, list(range(16)))
    across1 = hardware.link_for_group(dgx, [0, 8])
    assert inside[3] == "nvlink" and across8[3] == "network"
    assert inside[0] > across8[0] > across1[0]
    assert across1[0] == pytest.approx(8 * 200e9 / 8 * dgx.eff.network / 8)  # one HDR card per GPU
    assert hardware.link_for_group(med, [0, 8])[0] == pytest.approx(200e9 / 8 * med.eff.network / 8)
    user = hardware.system("a100-80gb", devs, node_network_gbps=800)
    assert hardware.link_for_group(user, [0, 8])[0] == pytest.approx(800e9 / 8 * user.eff.network / 8)


def test_gemm_tiling_efficiency():
    c = hardware.CHIPS["h100"]
    assert hardware.gemm_efficiency(c, 128 * 132, 256, 4096) == pytest.approx(1.0)  # one full wave
    assert hardware.gemm_efficiency(c, 128 * 133, 256, 4096) == pytest.approx(133 / 264)  # a second, nearly empty
    tpu = hardware.CHIPS["v5p"]
    assert hardware.gemm_efficiency(tpu, 100, 128, 128) == pytest.approx(100 / 128)


def test_attention_custom_call_flops():
    """Forward: 2 matmuls; backward returning dq, dk, dv: 5; a kernel's own cost estimate wins."""
    q, k = "bf16[2,1024,8,128]", "bf16[2,1024,2,128]"
    mod = parse(f"""HloModule m, num_partitions=1

ENTRY %e (q: {q}, k: {k}, o: {q}) -> ({q}, {k}, {k}) {{
  %q = {q} parameter(0)
  %k = {k} parameter(1)
  %o = {q} parameter(2)
  %fwd = {q} custom-call(%q, %k, %k), custom_call_target="tpu_custom_call"
  %bwd = ({q}, {k}, {k}) custom-call(%q, %k, %k, %o, %o), custom_call_target="__gpu$xla.gpu.triton"
  %est = {q} custom-call(%q, %k, %k), custom_call_target="tpu_custom_call", backend_config={{"cost_estimate":{{"flops":"12345"}}}}
  ROOT %t = ({q}, {k}, {k}) tuple(%fwd, %k, %k)
}}
""")
    local = {i.name: i for i in mod.computations["e"]}
    one = 2 * (2 * 1024 * 8 * 128) * 1024
    assert attention_flops(local["fwd"], local) == pytest.approx(2 * one * 0.5)
    assert attention_flops(local["bwd"], local) == pytest.approx(5 * one * 0.5)
    assert attention_flops(local["est"], local) == 12345.0
    cost = CostModel(mod).cost(local["fwd"], local)
    assert cost.kind == "attention" and cost.flops == pytest.approx(one)


def test_fusion_bytes_count_slices_and_in_place_updates():
    mod = parse(HLO)
    local = {i.name: i for i in mod.computations["main"]}
    cm = CostModel(mod)
    assert cm.cost(local["sl"], local).bytes == 2 * MIB2 + 4  # one layer of eight read, one written
    assert cm.cost(local["up"], local).bytes == 2 * MIB2 + 4  # the update read and written in place
    assert cm.cost(local["f"], local).bytes == 2 * MIB2
    d = cm.cost(local["d"], local)
    assert d.kind == "matmul" and d.flops == 2.0 * 1024 ** 3 and d.dims == (1024, 1024, 1024)
    assert math.isclose(cm.cost(local["att"], local).flops, 2 * (2 * (2 * 2048 * 8 * 128) * 2048) * 0.5)


@needs_libtpu
def test_plan_predicts_on_a_tpu_target():
    """`plan` on a TPU slice: the compiled step's matmuls are convolutions, counted; the
    prediction's parts add up to the step and the ICI link carries the tensor axis."""
    import os
    from meditron_jax.plan.compile import plan
    tiny = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.gin")
    r = plan([tiny], ["mesh.data=2", "mesh.tensor=2", "train.global_batch_size=8", "train.micro_batch_size=2",
                      "train.seq_len=64", "model.dtype='bfloat16'"], target="v5p-8")
    p = r["step_time"]
    b = p["breakdown_seconds"]
    assert p["hlo_matmul_flops_per_device"] * 4 >= r["model_flops_per_step"]  # recompute only adds
    assert b["compute"] + b["exposed_communication"] + b["bubble"] == pytest.approx(p["step_seconds"], rel=1e-6)
    assert p["hardware"]["chip"] == "TPU v5p" and p["hardware"]["torus"] == "2x2x1"
    assert 0 < p["mfu"] < 1


def test_tpu_convolution_flops_count_only_taps_on_the_input():
    """The TPU compiler's dots as convolutions (from a 70B step on v5p): a batch dimension as a
    spatial one whose window spans it over padding meets one real input per output, so each
    counts the dot's 2 x B T x N H x D, not 64 times it; a plain window (the weight gradient's
    contraction over 4 rows) counts every tap."""
    hlo = """HloModule conv, is_scheduled=true

ENTRY %e (a: bf16[4,4096,8192,1], b: bf16[64,128,8192,1], c: bf16[4,4096,8192,1], d: bf16[4,4096,64,128]) -> bf16[4,4096,64,128] {
  %a = bf16[4,4096,8192,1]{2,1,3,0} parameter(0)
  %b = bf16[64,128,8192,1]{2,1,0,3} parameter(1)
  %c = bf16[4,4096,8192,1]{2,1,3,0} parameter(2)
  %d = bf16[4,4096,64,128]{3,1,2,0} parameter(3)
  %w = bf16[8192,64,128,1]{2,0,1,3} convolution(%c, %d), window={size=64x4 pad=63_63x0_0 rhs_reversal=1x0}, dim_labels=1fb0_1i0o->b0f1
  ROOT %x = bf16[4,4096,64,128]{3,1,2,0} convolution(%a, %b), window={size=1x64 pad=0_0x63_63 rhs_reversal=0x1}, dim_labels=0bf1_1oi0->0b1f
}
"""
    mod = parse(hlo)
    cm = CostModel(mod)
    local = {i.name: i for i in mod.computations[mod.entry]}
    dot = 2.0 * (4 * 4096) * (64 * 128) * 8192
    assert cm.cost(local["x"], local).flops == dot
    assert cm.cost(local["w"], local).flops == dot  # 64-wide window over padding x 4 real rows
