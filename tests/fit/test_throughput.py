"""The throughput model: calibration points reproduced within their stated uncertainty, held-out points within the
done-when, workloads, plans and boxes parsed with clear errors, the plans offered when a model does not fit, the
chart, and the fit command's predicted.* JSON."""
import json

import pytest
from django.core.management import CommandError, call_command

from inference.fit import advice, alternatives, calibration
from inference.fit.hardware import HardwareSpecError, parse_hardware
from inference.fit.parallel import PlanError, parse_plan
from inference.fit.profile import ModelProfile
from inference.fit.throughput import ROOFLINE, capacity, predict
from inference.fit.workload import WorkloadError, parse_workload



@pytest.fixture(scope="module")
def profiles():
    """The meta-built profiles of the models the published points measured."""
    return calibration.load_profiles()


@pytest.fixture(scope="module")
def r1(profiles):
    return profiles["deepseek-r1", "stored"]


def test_every_point_names_its_source_and_configuration():
    data = calibration.load_points()
    roles = {p["role"] for p in data["points"]}
    assert roles == {"fit", "held_out", "reference"}
    for point in data["points"]:
        source = data["sources"][point["source"]]
        assert all(source.get(k) for k in ("title", "publisher", "date", "url", "read")), point["id"]
        assert len(point["configuration"]) > 40 and point["measured"], point["id"]


def test_fitted_points_within_their_stated_uncertainty_and_held_out_within_the_done_when(profiles):
    rows = calibration.evaluate(profiles)
    assert {r["role"] for r in rows} == {"fit", "held_out"}
    for row in rows:
        assert abs(row["error"]) <= row["uncertainty"], row
        assert abs(row["error_total"]) <= row["uncertainty"] + 0.01, row
        if row["role"] == "held_out":
            assert abs(row["error"]) <= calibration.DONE_WHEN, row
    # Each engine's held-out points exist: the error on them is the figure the advisor quotes.
    assert {r["engine"] for r in rows if r["role"] == "held_out"} == {"vllm", "sglang"}


def test_stored_factors_are_what_the_points_fit_to(profiles):
    refit = calibration.fit_all(profiles)
    stored = calibration.load_fitted()
    assert refit.keys() == stored.keys()
    for engine, classes in refit.items():
        for cls, entry in classes.items():
            for factor in calibration.FACTORS:
                assert entry[factor] == pytest.approx(stored[engine][cls][factor], rel=1e-3), (engine, factor)
            assert entry["fitted_on"] == stored[engine][cls]["fitted_on"]
            held = {p["id"] for p in calibration.load_points()["points"] if p["role"] == "held_out"}
            assert not held & set(entry["fitted_on"])


@pytest.mark.parametrize("spec,message", [("in=1000", "no out=N"), ("in=10,out=0", "out=0"), ("in=x,out=5", "in=x"),
                                          ("in=1,out=1,concurrency=4,rate=2", "both concurrency and rate"),
                                          ("in=1,out=1,hit=1.5", "hit=1.5"), ("in=1,out=1,speed=3", "speed=3"),
                                          ("in=1,in=2,out=1", "repeats"), ("", "empty workload")])
def test_bad_workloads_are_named(spec, message):
    with pytest.raises(WorkloadError, match=message):
        parse_workload(spec)


def test_workload_reads_its_parts():
    w = parse_workload("in=1000, out=500, rate=2.5, hit=0.5, arrival=burst, spread=exp")
    assert (w.input_tokens, w.output_tokens, w.rate_per_s, w.prefix_hit, w.arrival, w.output_spread) == \
        (1000, 500, 2.5, 0.5, "burst", "exponential")
    assert parse_workload("in=1,out=1").concurrency == 1


def test_several_boxes_and_their_limits():
    hw = parse_hardware("9x8xH100+cpu:1T")
    assert (hw.gpus, hw.boxes, hw.gpus_per_box, hw.device_memory_gb, hw.host_ram_gb) == (72, 9, 8, 5760, 9000)
    with pytest.raises(HardwareSpecError, match="2x8xH100"):
        parse_hardware("16xH100")
    with pytest.raises(HardwareSpecError, match="at least 1"):
        parse_hardware("0x8xH100")


@pytest.mark.parametrize("text,gpus,message", [("tp8", 72, "uses 8 GPUs but the hardware has 72"),
                                               ("tp8-ep8", 8, "expert parallelism"), ("tp4-tp4", 16, "repeated"),
                                               ("pp2", 2, "bad plan part 'pp2'"), ("dpattn", 8, "goes with tpN"),
                                               ("tp2", 0, "CPU only")])
def test_bad_plans_are_named(text, gpus, message):
    with pytest.raises(PlanError, match=message):
        parse_plan(text, gpus)


def test_plans_split_as_named():
    ep = parse_plan("ep72", 72)
    assert (ep.replica_gpus, ep.attention_dp, ep.attention_tp, ep.experts) == (72, 72, 1, "ep")
    replicas = parse_plan("dp4-tp2", 8)
    assert (replicas.replicas, replicas.replica_gpus) == (4, 2)
    assert parse_plan("tp8-dpattn", 8).attention_dp == 8


def test_the_model_behaves_like_a_server(r1):
    hw = parse_hardware("8xH200")
    params = calibration.engine_params("sglang", hw)
    plan = parse_plan("tp8-dpattn", 8)
    figures = [predict(r1, hw, plan, "sglang", params, parse_workload(f"in=1000,out=1000,concurrency={c}"))
               for c in (1, 16, 64, 256)]
    outputs = [f["output_tokens_per_s"] for f in figures]
    tpots = [f["tpot_ms"] for f in figures]
    assert outputs == sorted(outputs) and tpots == sorted(tpots)  # more users: more tokens/s, slower each
    for f in figures:
        assert f["output_tokens_per_s"] <= f["bound_output_tokens_per_s"]
        low, high = f["uncertainty"]["output_tokens_per_s_low"], f["uncertainty"]["output_tokens_per_s_high"]
        assert low < f["output_tokens_per_s"] < high
    # MLA's one latent head cannot be split by TP: every GPU of a TP group holds every sequence's cache,
    # while DP attention gives each GPU its own sequences: it holds several times as many, although each GPU
    # then keeps a whole copy of the attention weights and has less memory free.
    tp = capacity(r1, hw, parse_plan("tp8", 8), 4096, r1.kv_bytes_per_token)
    dp = capacity(r1, hw, plan, 4096, r1.kv_bytes_per_token)
    assert dp.free_gb_per_gpu < tp.free_gb_per_gpu and dp.sequences > 6 * tp.sequences


def test_a_rate_becomes_users_in_flight(r1):
    hw = parse_hardware("8xH200")
    plan = parse_plan("tp8", 8)
    params = calibration.engine_params("vllm", hw)
    light = predict(r1, hw, plan, "vllm", params, parse_workload("in=1000,out=200,rate=0.5"))
    assert 1 <= light["concurrency"] < 20 and "requests in flight" in light["note"]
    flood = predict(r1, hw, plan, "vllm", params, parse_workload("in=1000,out=200,rate=100000"))
    assert flood["concurrency"] == flood["kv_capacity_sequences"] and "grows without bound" in flood["note"]


def test_plans_when_the_model_does_not_fit(r1, profiles):
    all_dtypes = {k: ModelProfile.from_dict(v) for k, v in _report_profiles().items()}
    hw = parse_hardware("8xH100+cpu:2048G")
    w = parse_workload("in=1000,out=1000,concurrency=64")
    distilled = {"deepseek-r1-distill-qwen-32b": advice.distilled_profile("deepseek-r1-distill-qwen-32b")}
    rows = alternatives.plans(all_dtypes, "stored", hw, w, "sglang", None, distilled)
    kinds = {r["kind"]: r for r in rows}
    assert not kinds["as asked"]["predicted"]["fits"] and "per GPU" in kinds["as asked"]["predicted"]["reason"]
    for kind in ("offload experts to host RAM", "lower precision (int4)", "2 boxes, EP16", "distilled"):
        assert kinds[kind]["predicted"]["fits"] and kinds[kind]["predicted"]["output_tokens_per_s"] > 0, kind
    assert kinds["2 boxes, EP16"]["gpus"] == 16 and kinds["2 boxes, EP16"]["hardware"] == "2x8xH100+cpu:2048G"
    assert kinds["offload experts to host RAM"]["predicted"]["uncertainty"]["relative"] >= 1.0  # not fitted
    # The distilled model is dense and the factors were fitted on MoE runs only: the band widens.
    assert kinds["distilled"]["predicted"]["uncertainty"]["relative"] > 0.5


_PROFILES = {}


def _report_profiles():
    if not _PROFILES:
        from inference.fit import analyze

        _PROFILES.update(analyze("deepseek-r1", "8xH100", 2000).profiles)
    return _PROFILES


def test_throughput_chart_draws_the_published_points():
    from inference.fit import analyze

    report = analyze("deepseek-r1", "8xH200", 2000)
    request = advice.parse_request("in=1000,out=1000,concurrency=64", "sglang", None)
    data = advice.curves(report, request)
    assert [s["label"] for s in data["series"]] == ["8xH200, sglang", "2x8xH200, sglang EP16"]
    assert all(s["users_per_box"] for s in data["series"])
    scored = [p for p in data["published"] if p["predicted_per_box"]]
    assert len(scored) == sum(1 for p in calibration.load_points()["points"] if calibration.scored(p))
    assert advice.throughput_chart(report, request).startswith("<svg")


def test_fit_command_predicts_the_deployment(capsys, tmp_path):
    call_command("fit", "deepseek-r1", "--hardware", "8xH200", "--workload", "in=1000,out=1000,concurrency=64",
                 "--engine", "sglang", "--json", "--charts", str(tmp_path))
    data = json.loads(capsys.readouterr().out)
    p = data["predicted"]
    for key in ("output_tokens_per_s", "total_tokens_per_s", "tpot_ms", "ttft_ms", "output_tokens_per_s_per_box"):
        assert p[key] > 0, key
    assert p["output_tokens_per_s_per_box"] == p["output_tokens_per_s"]  # one box
    assert p["total_tokens_per_s"] == pytest.approx(2 * p["output_tokens_per_s"])  # in = out
    assert p["plan"]["label"] == "tp8-dpattn" and p["bound"] and p["uncertainty"]["relative"] == 0.15
    assert data["context"] == 2000 and {r["kind"] for r in data["plans"]} >= {"as asked", "distilled"}
    assert (tmp_path / "deepseek-r1-throughput.svg").read_text().startswith("<svg")


def test_fit_command_on_several_boxes(capsys):
    call_command("fit", "deepseek-r1", "--hardware", "2x8xH100", "--workload", "in=2000,out=500,concurrency=256",
                 "--engine", "sglang", "--plan", "ep16", "--json")
    p = json.loads(capsys.readouterr().out)["predicted"]
    assert p["fits"] and p["boxes"] == 2 and p["gpus"] == 16
    assert p["output_tokens_per_s_per_box"] == pytest.approx(p["output_tokens_per_s"] / 2)
    assert p["decode_step_ms"]["communication"] > 0  # the all-to-all crosses the network


@pytest.mark.parametrize("args,message", [(["--workload", "in=5"], "no out=N"), (["--engine", "tgi"], "unknown engine"),
                                          (["--workload", "in=5,out=5", "--plan", "tp4"], "uses 4 GPUs")])
def test_fit_command_names_bad_requests(args, message):
    with pytest.raises(CommandError, match=message):
        call_command("fit", "deepseek-r1", "--hardware", "8xH200", *args)


def test_roofline_is_the_bound(r1):
    hw = parse_hardware("8xH200")
    w = parse_workload("in=200,out=200,concurrency=32")
    plan = parse_plan("tp8", 8)
    roof = predict(r1, hw, plan, "vllm", ROOFLINE, w)
    real = predict(r1, hw, plan, "vllm", calibration.engine_params("vllm", hw), w)
    assert roof["output_tokens_per_s"] == pytest.approx(real["bound_output_tokens_per_s"])


def test_a_tight_box_is_planned_as_an_operator_would(r1):
    # 8xH20: DP attention's copy of the attention weights does not fit 96 GB, plain TP does once the engine may
    # use 95% of each GPU's memory; the prediction says both.
    hw = parse_hardware("8xH20")
    w = parse_workload("in=1000,out=1000,concurrency=64")
    p = alternatives.prediction(r1, hw, w, "sglang")
    assert p["fits"] and p["plan"]["label"] == "tp8" and "95%" in p["note"]
    named = alternatives.prediction(r1, hw, w, "sglang", "tp8-dpattn")
    assert not named["fits"] and "per GPU" in named["reason"]
