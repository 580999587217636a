"""python -m bench on tiny settings: the CLI, its files, --compare / --markdown / --from, the model suite, the
OpenVINO peer's exactness and the correctness checks that must run before any timing. Fast (seconds)."""
import csv
import itertools
import json
import os
import time

import pytest
import torch
from torch import nn

import xnorconv
from bench import __main__ as cli
from bench import layers, model_suite, peers, report
from bench.timing import SelfTimed, interleaved
from xnorconv import profiling
from xnorconv.testing import reference_conv2d

TINY = ["--shape", "16,16,8,3,1,1", "--reps", "3"]


def test_layer_cli_writes_files(tmp_path, capsys):
    run = cli.main(TINY + ["--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "16,16,8,3,1,1" in out and "geometric mean speedup" in out and "command:" in out
    for name in ("bench.json", "bench.csv", "layers_speedup.png"):
        assert (tmp_path / name).stat().st_size > 0
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["env"]["threads"] == 1 and saved["env"]["command"].startswith("python")
    row = saved["layers"]["rows"][0]
    assert row["shape"] == [16, 16, 8, 3, 1, 1]
    for b in xnorconv.backends():
        assert row["ms"][f"xnorconv {b}"] > 0 and 0 < row["kernel_fraction_of_peak"][b]
    assert {"fp32 NCHW", "fp32 NHWC", "int8"} <= set(row["ms"])
    if peers.openvino_available():
        # The node alone (1 us resolution: 0 on so small a layer is possible) is less than the float-in/out call.
        assert row["ms"]["openvino binary"] > 0 and 0 <= row["kernel_best_ms"]["openvino"] < row["ms"]["openvino binary"]
    with open(tmp_path / "bench.csv") as f:
        records = list(csv.DictReader(f))
    assert records and all(r["machine"] and r["date"] and r["command"] for r in records)
    assert {r["metric"] for r in records} >= {"fp32 NCHW ms", f"speedup vs fp32 NCHW xnorconv {xnorconv.backends()[0]}"}
    assert run["layers"]["rows"][0]["ms"] == row["ms"]


def test_scaling_cli(tmp_path, capsys):
    run = cli.main(["--scaling", "--threads", "2", "--shape", "16,16,8,3,1,1", "--backend", "scalar", "--out",
                    str(tmp_path)])
    out = capsys.readouterr().out
    assert "thread scaling, 1 vs 2 threads" in out and "16,16,8,3,1,1" in out
    rows = run["scaling"]["rows"]
    assert [r["backend"] for r in rows] == ["auto", "scalar"] and rows[1]["runs"] == "scalar"
    assert all(r["ms_1"] > 0 and r["ms_2"] > 0 and r["speedup"] > 0 for r in rows)
    assert "speedup 1 -> 2 threads" in (tmp_path / "bench.csv").read_text()
    with pytest.raises(SystemExit, match="--threads N with N >= 2"):
        cli.main(["--scaling", "--shape", "16,16,8,3,1,1"])


def test_scaling_speedup_is_the_median_ratio_of_neighbouring_blocks(monkeypatch):
    from bench import scaling
    monkeypatch.setattr(scaling, "BLOCKS", 6)
    calls = []

    def fn():
        # Twice as fast on 2 threads, on a host whose speed halves after the first blocks: the ratio stays 2.
        calls.append(None)
        slow = 2.0 if len(calls) > 3 * 2 * (scaling.WARMUP_CALLS + scaling.BLOCK_CALLS) else 1.0
        end = time.perf_counter() + 200e-6 * slow / torch.get_num_threads()
        while time.perf_counter() < end:
            pass

    old = torch.get_num_threads()
    try:
        ms, speedup = scaling._time_blocks(fn, 2)
    finally:
        torch.set_num_threads(old)
    assert speedup == pytest.approx(2.0, rel=0.15) and ms[1] > ms[2] > 0


def test_compare_markdown_and_from(tmp_path, capsys):
    cli.main(TINY + ["--no-openvino", "--backend", "scalar", "--out", str(tmp_path)])
    capsys.readouterr()
    cli.main(TINY + ["--no-openvino", "--backend", "scalar", "--compare", str(tmp_path / "bench.json"), "--markdown"])
    out = capsys.readouterr().out
    assert "| layer cin,cout,hw,k,s,p |" in out and "**threads**" in out
    assert "change against the run of" in out and "fp32 NCHW" in out.split("change against")[1]
    cli.main(["--from", str(tmp_path / "bench.json")])
    out = capsys.readouterr().out
    assert "xnorconv scalar ms" in out and "--out" in out  # the saved run's own command


def test_models_cli_tiny(tmp_path, capsys):
    run = cli.main(["--models", "--size", "16", "--model-reps", "3", "--model", "binary_dnet53",
                    "--model", "binary_dnet53_fp32", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "binary_dnet53_fp32" in out and "Where binary_dnet53's time goes" in out
    ms = {m["name"]: m for m in run["models"]["models"]}
    assert ms["binary_dnet53"]["state_dict_bytes"] < ms["binary_dnet53_fp32"]["state_dict_bytes"]
    for m in ms.values():
        assert m["batch1_ms"] > 0 and m["batch8_images_per_s"] > 0 and m["peak_forward_bytes_batch1"] > 0
        assert m["batch1_ms_torchscript"] > 0 and m["batch8_images_per_s_torchscript"] > 0  # default deploy modes
    assert "batch 1 ms/image (torchscript)" in out and "both torchscript" in out
    assert "with its binary convolutions free (torchscript, batch 1)" in out and "no binary kernel can give" in out
    assert "memory passes ms" in out and len(run["models"]["binary_convs"]) == 25
    # freeze's layout, chosen at the check's first call, for the frozen model only
    assert ms["binary_dnet53"]["memory_format"] in ("channels_last", "contiguous_format")
    assert ms["binary_dnet53_fp32"]["memory_format"] == "n/a"
    assert f"runs {ms['binary_dnet53']['memory_format']} (freeze's choice)" in out
    assert (tmp_path / "models_latency.png").stat().st_size > 0
    json.loads((tmp_path / "bench.json").read_text())


def test_models_cli_allocator_and_page_faults(capsys):
    import platform
    top_pad = ["--malloc-top-pad", "16"] if platform.libc_ver()[0] == "glibc" else []
    run = cli.main(["--models", "--size", "16", "--model-reps", "3", "--model", "binary_dnet53", *top_pad])
    out = capsys.readouterr().out
    assert "allocator: " in out and "minor page faults per batch-1 pass" in out
    if top_pad:
        assert "M_TOP_PAD, 16 MB" in run["env"]["allocator"]
    faults = run["models"]["models"][0]["batch1_minor_faults"]
    assert isinstance(faults, float) and f"binary_dnet53 {faults:.0f}" in out


def test_allocator_bench_runs_each_setting_in_fresh_processes(tmp_path, capsys):
    """python -m bench.allocator: every setting the machine has, each model in its own process, the report with
    the machine, the command, ms and faults per pass, and the ratio to the first model."""
    from bench import allocator
    found, missing = allocator.settings()
    assert "default" in found and set(found) | set(missing) == {"default", "top_pad", "keep_heap", "jemalloc",
                                                                 "tcmalloc"}
    out = tmp_path / "allocator.md"
    allocator.main(["--model", "binary_dnet53", "--model", "binary_dnet53_fp32", "--size", "16", "--rounds", "1",
                    "--passes", "2", "--out", str(out)])
    text = capsys.readouterr().out
    assert out.read_text() == text
    assert "- machine: " in text and "python -m bench.allocator --model binary_dnet53" in text
    for setting in found:
        assert f"{setting} ms | {setting} faults" in text
    assert "| binary_dnet53 | " in text and "| binary_dnet53_fp32 | " in text
    assert "Time of each model over binary_dnet53's, per setting" in text


@pytest.mark.parametrize("argv, message", [
    (["--model", "nonsense"], "--model: unknown model 'nonsense'"),
    (["--rounds", "0"], "--rounds must be >= 1, got 0"),
])
def test_allocator_bench_errors_name_the_argument(argv, message, capsys):
    from bench import allocator
    with pytest.raises(SystemExit):
        allocator.main(argv)
    assert message in capsys.readouterr().err


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="getrusage page-fault counts are a Linux measure")
def test_minor_faults_per_pass_counts_fresh_memory():
    """A pass that allocates and touches 64 MB (above glibc's largest mmap threshold, so freed back to the kernel
    every time) faults its pages in on every pass; a pass that allocates nothing does not."""
    fresh = model_suite.minor_faults_per_pass(lambda x: torch.ones(16 * 2**20), torch.zeros(1), passes=3)
    # The count is the process's: another thread's faults (a layout probe of an earlier test, the allocator's
    # background work) can only add to it, so the quietest of a few readings is the pass's own.
    none = min(model_suite.minor_faults_per_pass(lambda x: x, torch.zeros(1), passes=3) for _ in range(5))
    assert fresh >= 16 and none < fresh / 4, (fresh, none)  # 16: 64 MB even in 2 MB (huge) pages is 32 faults
    with pytest.raises(SystemExit):
        cli.parse_args(["--malloc-top-pad", "-1"])


class _Tiny(nn.Module):
    def __init__(self, binary):
        super().__init__()
        conv = xnorconv.BinaryConv2d if binary else nn.Conv2d
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(conv(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = self.body(self.stem(x)) + 1.0  # functional op outside any leaf module: lands on the model's self time
        return self.head(x.mean((2, 3)))


def test_model_suite_machinery_on_stand_ins():
    def create(name, num_classes):
        return _Tiny(binary=name == "binary_dnet53").eval() if name != "darknet53" else _Tiny(False).eval()

    r = model_suite.run(("binary_dnet53", "binary_dnet53_fp32", "binary_dnet53_int8"), 4, 16, 1, 3,
                        breakdown_reps=3, create=create)
    names = [m["name"] for m in r["models"]]
    assert names == ["binary_dnet53", "binary_dnet53_fp32", "binary_dnet53_int8"]
    assert "cosine" in r["models"][2]["check"] and "frozen - reference" in r["models"][0]["check"]
    b = r["breakdown"]
    assert any(l["type"] == "FrozenBinaryConv2d" for l in b["layers"])
    assert sum(l["self_ms"] for l in b["layers"]) == pytest.approx(b["total_ms"], rel=0.05)
    assert any(o["op"].startswith("xnorconv::") for o in b["ops"])
    free = r["binary_convs_free"]
    assert free["model"] == "binary_dnet53" and free["batch1_ms"] > 0 and free["batch1_ms_torchscript"] > 0
    (row,) = r["binary_convs"]
    assert row["name"] == "body.0" and (row["in_channels"], row["out_channels"]) == (8, 16)
    assert row["binary_ms"] > 0 and row["fp32_ms"] > 0 and row["memory_ms"] > 0 and not row["residual"]


def test_model_suite_binarized_resnet18_is_checked_against_its_reference():
    """The torchvision network goes through binarize + freeze as a user's would, and is checked before timing."""
    (binary, fp32) = model_suite.build(("resnet18_binary", "resnet18_fp32"), 3, 32)
    assert sum(isinstance(m, xnorconv.FrozenBinaryConv2d) for m in binary.model.modules()) == 19
    assert not any(isinstance(m, xnorconv.FrozenBinaryConv2d) for m in fp32.model.modules())
    agreement = model_suite.check([binary, fp32], 32)
    assert "frozen - reference" in agreement["resnet18_binary"]


def test_model_suite_reference_binary_nets_against_their_float_twins(capsys):
    """Bi-Real-Net-18 and ReActNet-A are frozen (every binary conv packed), checked against their unfrozen models'
    reference path, and compared with their float twins: ratios, the per-operator breakdown, each binary conv in
    place against the twin's conv."""
    entries = model_suite.build(("birealnet18", "birealnet18_fp32", "reactnet_a", "reactnet_a_fp32"), 3, 32)
    counts = [sum(isinstance(m, xnorconv.FrozenBinaryConv2d) for m in e.model.modules()) for e in entries]
    assert counts == [16, 0, 31, 0]
    assert not any(isinstance(m, xnorconv.BinaryConv2d) for e in entries for m in e.model.modules())
    agreement = model_suite.check(entries, 32)
    assert "frozen - reference" in agreement["birealnet18"] and "frozen - reference" in agreement["reactnet_a"]
    run = cli.main(["--models", "--size", "32", "--model-reps", "3", "--model", "reactnet_a", "--model",
                    "reactnet_a_fp32"])
    out = capsys.readouterr().out
    r = run["models"]
    assert r["twins"] == {"reactnet_a": ["reactnet_a_fp32"]} and r["breakdown"]["model"] == "reactnet_a"
    assert any(o["op"] == "xnorconv::binary_conv2d_packed" and o["calls"] == 31 for o in r["breakdown"]["ops"])
    # Every unit adds its shortcut in the conv: a residual tensor, or (a single conv) computed by the op from its input.
    assert len(r["binary_convs"]) == 31
    assert all(row["residual"] or row["input_shortcut"] for row in r["binary_convs"])
    assert any(row["input_shortcut"] for row in r["binary_convs"])
    assert "frozen reactnet_a vs reactnet_a_fp32, both eager: batch 1 " in out
    assert "frozen reactnet_a vs reactnet_a_fp32, both torchscript: batch 1 " in out
    assert "against reactnet_a_fp32 no binary kernel can give more than" in out


def test_model_suite_int8_stem_entry_is_compared_with_the_float_stem():
    (entry,) = model_suite.build(("resnet18_binary_int8stem",), 3, 32)
    assert isinstance(entry.model.conv1, xnorconv.Int8Conv2d) and type(entry.reference.conv1) is xnorconv.StemConv2d
    assert "cosine(int8 stem, float stem logits)" in model_suite.check([entry], 32)[entry.name]


@pytest.mark.parametrize("name", ["birealnet18_int8stem", "reactnet_a_int8stem"])
def test_reference_net_int8_stem_entries(name):
    (entry,) = model_suite.build((name,), 3, 32)
    assert isinstance(entry.model.stem.conv, xnorconv.Int8Conv2d)
    # the float reference: a StemConv2d (xnorconv's convolution for ReActNet's 32 channels)
    assert isinstance(entry.reference.stem.conv, xnorconv.StemConv2d)
    assert entry.reference.stem.conv.direct or name == "birealnet18_int8stem"
    # Bi-Real's max pool (a layout-choosing nn.MaxPool2d subclass) runs inside the int8 layer
    pooled = name == "birealnet18_int8stem"
    assert (entry.model.stem.conv.pool is not None) == pooled
    ending = "BN and max pool in int8 (oneDNN)" if pooled else "conv and its BN in int8 (oneDNN)"
    assert entry.description.endswith(ending)
    assert model_suite.TWINS[name] == model_suite.TWINS[name.removesuffix("_int8stem")]
    assert "cosine(int8 stem, float stem logits)" in model_suite.check([entry], 32)[entry.name]


def test_training_ops_bench_checks_then_times(monkeypatch):
    from bench import training_ops
    text = training_ops.main(["--reps", "3", "--batch", "2", "--threads", "1"])
    rows = [line for line in text.splitlines() if line.startswith("| 1 |")]
    assert len(rows) == len(training_ops.UNIT_SHAPES) and "python -m bench.training_ops" in text
    fused = training_ops.XF.batch_norm_add_prelu
    monkeypatch.setattr(training_ops.XF, "batch_norm_add_prelu", lambda *a, **k: fused(*a, **k) * 1.001)
    with pytest.raises(AssertionError, match="fused output differs"):
        training_ops.main(["--reps", "3", "--batch", "2", "--threads", "1"])


def test_first_layer_report_is_written_between_the_markers(tmp_path):
    from bench import first_layer
    doc = tmp_path / "doc.md"
    doc.write_text(f"prose\n{first_layer.BEGIN}\nold figures\n{first_layer.END}\nmore prose\n")
    first_layer.write_between_markers(str(doc), "new figures")
    assert doc.read_text() == f"prose\n{first_layer.BEGIN}\nnew figures\n{first_layer.END}\nmore prose\n"
    (tmp_path / "plain.md").write_text("no markers")
    with pytest.raises(SystemExit, match="no .* markers"):
        first_layer.write_between_markers(str(tmp_path / "plain.md"), "x")


def test_free_binary_convs_keep_the_shapes_and_leave_the_model_alone():
    frozen = xnorconv.freeze(_Tiny(binary=True).eval())
    x = torch.randn(1, 3, 16, 16)
    floor = model_suite.free_binary_convs(frozen, x)
    assert isinstance(frozen.body[0], xnorconv.FrozenBinaryConv2d) and type(frozen.body[0]) is not type(floor.body[0])
    assert isinstance(floor.body[0], xnorconv.FrozenBinaryConv2d)  # the model's fused paths stay taken
    with torch.no_grad():
        assert floor(x).shape == frozen(x).shape
        h = frozen.stem(x)
        assert floor.body[0](h).shape == frozen.body[0](h).shape


def test_deployed_model_is_checked_before_timing(monkeypatch):
    def create(name, num_classes):
        return _Tiny(binary=True).eval() if name == "binary_dnet53" else _Tiny(False).eval()

    real_deployed = model_suite.deployed

    def broken(model, mode, example, workdir):
        m = real_deployed(model, mode, example, workdir)
        return (lambda x: m(x) + 1) if mode == "torchscript" else m  # a deployment that changed the result

    monkeypatch.setattr(model_suite, "deployed", broken)
    with pytest.raises(AssertionError, match="as torchscript differs from the eager model"):
        model_suite.run(("binary_dnet53",), 4, 16, 1, 3, create=create)
    with pytest.raises(ValueError, match="deploy mode must be one of"):
        model_suite.run(("binary_dnet53",), 4, 16, 1, 3, create=create, deploy=("onnx",))
    with pytest.raises(SystemExit):
        cli.parse_args(["--models", "--deploy", "eager,tflite"])
    assert cli.parse_args(["--models", "--deploy", "compile"]).deploy == ("compile",)


def test_a_model_that_cannot_deploy_in_a_mode_is_reported_not_timed():
    def create(name, num_classes):
        return _Tiny(binary=name == "binary_dnet53").eval()

    # PyTorch's FX int8 models do not go through torch.export, so they have no AOTInductor figure.
    r = model_suite.run(("binary_dnet53_int8",), 4, 16, 1, 3, create=create, deploy=("aoti",), breakdown_reps=3)
    e = r["models"][0]
    assert "aoti" in e["deploy_unavailable"] and "batch1_ms_aoti" not in e and e["batch1_ms"] > 0
    cols, table, summary = report.model_table({"models": r})
    assert "batch 1 ms/image (aoti)" in cols and table[0][cols.index("batch 1 ms/image (aoti)")] == "n/a"
    assert any(s.startswith("binary_dnet53_int8 has no aoti figure: ") for s in summary)


def test_model_check_is_asserted(monkeypatch):
    def create(name, num_classes):
        return _Tiny(binary=True).eval() if name == "binary_dnet53" else _Tiny(False).eval()

    real_freeze = xnorconv.freeze

    def broken_freeze(model):
        frozen = real_freeze(model)
        frozen.head.bias.data += 1  # a frozen model that no longer matches its reference path
        return frozen

    monkeypatch.setattr(model_suite.xnorconv, "freeze", broken_freeze)
    with pytest.raises(AssertionError, match="frozen model differs"):
        model_suite.run(("binary_dnet53",), 4, 16, 1, 3, create=create)


@pytest.mark.parametrize("margin", [1e-9, 0.5])
def test_model_check_accepts_tie_flips_only(margin):
    """A frozen model may binarize a value within rounding of its threshold the other way (then every later layer
    differs a little); the check accepts exactly that, and names a real difference."""
    model = _Tiny(binary=True).eval()
    entry = model_suite.Entry("binary_dnet53", "stand-in", xnorconv.freeze(model), unfrozen=model)

    def setting(value):
        def hook(layer, args):
            x = args[0].clone()
            x[0, 0, 3, 3] = value
            return (x,)
        return hook

    entry.unfrozen.body[0].register_forward_pre_hook(setting(margin))   # binarizes to +1
    entry.model.body[0].register_forward_pre_hook(setting(-margin))     # to -1
    if margin < 1e-6:
        agreement = model_suite.check([entry], 16)["binary_dnet53"]
        assert "after 1 tie flip(s) at body.0's input" in agreement
    else:
        with pytest.raises(AssertionError, match="the first binary layer whose input signs differ, body.0, differs in "
                                                 "1 of 4096 bits, up to \\|x - t\\| = 0.5"):
            model_suite.check([entry], 16)


def test_layer_correctness_is_asserted(monkeypatch):
    wrong = lambda *a, **k: reference_conv2d(*a, **k) + 2  # noqa: E731
    monkeypatch.setattr(layers, "reference_conv2d", wrong)
    with pytest.raises(AssertionError, match="differs from the reference"):
        layers.layer_rows([(16, 16, 8, 3, 1, 1)], 1, 1, 3, 0, ["scalar"], with_int8=False, with_openvino=False)


def test_each_timed_call_follows_untimed_calls_of_its_own():
    from bench import timing
    log = []
    fns = {name: (lambda name=name: log.append(name)) for name in "ab"}
    try:
        timing.configure_rewarm(0)
        interleaved(fns, 5, warmup=0)
        assert len(log) == 10  # cold: one call per round each, nothing else
        log.clear()
        assert timing.configure_rewarm(1e-4).startswith("warm")
        interleaved(fns, 5, warmup=0)
    finally:
        timing.configure_rewarm(timing.REWARM_S)
    # Warm: every round runs one implementation's untimed calls then its timed call, never another's in between.
    runs = [len(list(g)) for _, g in itertools.groupby(log)]
    assert len(runs) >= 5 and all(n >= 2 for n in runs) and sum(runs) == len(log)


def test_self_timed_samples():
    t = interleaved({"wall": lambda: time.sleep(0.002), "self": SelfTimed(lambda: 42.0)}, 4, warmup=1)
    # Wall samples are the call's duration in seconds: a 2 ms sleep, plus the timer's overhead.
    assert t["self"] == [42.0] * 4 and len(t["wall"]) == 4 and all(0.002 <= v < 0.5 for v in t["wall"]), t["wall"]


@pytest.mark.skipif(not peers.openvino_available(), reason="openvino not installed")
@pytest.mark.parametrize("shape", [(64, 64, 9, 3, 1, 1), (24, 17, 9, 3, 2, 1), (8, 3, 11, 5, 1, 2), (32, 16, 7, 1, 1, 0)])
def test_openvino_equals_plus_one_padded_reference(shape):
    cin, cout, hw, k, s, p = shape
    x = torch.randn(2, cin, hw, hw)
    w = torch.randn(cout, cin, k, k)
    flat = x.view(-1)  # the binarization edge: +0, -0, the smallest denormals of either sign
    flat[::29], flat[1::31], flat[2::37], flat[3::41] = 0.0, -0.0, -1.4e-45, 1.4e-45
    w.view(-1)[::7] = 0.0
    want = reference_conv2d(x, w, None, (s, s), (p,) * 4, (1, 1), 1, None, pad_value=1)
    got = peers.openvino_binary_conv(x, w, s, p, 1)()
    assert got.dtype == torch.float32 and got.is_contiguous() and torch.equal(got.double(), want)


@pytest.mark.skipif(not peers.openvino_available(), reason="openvino not installed")
def test_openvino_kernel_timer_reads_the_node_time():
    """On a layer of some 19M binary MACs the node's own time is well above the profiler's 1 us resolution and
    below the wall time of the two runs each call makes (seconds, not ms or us)."""
    x, w = torch.randn(1, 64, 32, 32), torch.randn(64, 64, 3, 3)
    timer = peers.OpenVinoKernelTimer(x, w, 1, 1, 1)
    t0 = time.perf_counter()
    node_s = timer()
    wall_s = time.perf_counter() - t0
    assert timer.exec_type and 2e-6 <= node_s < wall_s, (node_s, wall_s, timer.exec_type)


@pytest.mark.skipif(not peers.openvino_available(), reason="openvino not installed")
def test_openvino_wrong_shapes_are_reported_not_timed():
    rows = layers.layer_rows([(4, 8, 8, 3, 1, 1)], 1, 1, 3, 0, ["scalar"], with_int8=False)
    assert "openvino binary" not in rows[0]["ms"] and "not a multiple of 8" in rows[0]["notes"][0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when CUDA is absent")
def test_device_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(SystemExit, match="CUDA is not available"):
        cli.main(["--device", "cuda"])


def test_report_geomean_and_bad_shape():
    assert report.geomean([2, 8]) == pytest.approx(4)
    with pytest.raises(SystemExit):
        cli.parse_args(["--shape", "1,2,3"])
    assert os.path.basename(cli.__file__) == "__main__.py"


def test_backend_override_survives_the_kernel_hooks():
    """layer_rows times the profiling hooks inside use_backend(b) for every b: a hook naming another family must
    not change the family that the float-in/float-out timing of b runs."""
    x, w = torch.randn(1, 16, 8, 8), torch.randn(8, 16, 3, 3)
    other = xnorconv.backends()[0]
    with xnorconv.use_backend("scalar"):
        assert profiling.conv_kernel_ms(other, x, w, 1, 1, 0, 1) > 0
        assert profiling.peak_binary_macs_per_second(other, 1000) > 0
        assert xnorconv.current_backend(16, 3) == "scalar"


def test_readme_table_is_generated_from_a_saved_run():
    """README.md's performance table is the summary.md the bench wrote for docs/perf/threads1, and that file is
    what report.summary_markdown renders from the run's bench.json: no figure in it is typed by hand."""
    import importlib.util
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("sync_readme_perf", os.path.join(root, "tools", "sync_readme_perf.py"))
    sync = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sync)
    assert sync.main(["--check"]) == 0
    src = sync.BLOCK.search(open(os.path.join(root, "README.md")).read())["src"]
    with open(os.path.join(root, os.path.dirname(src), "bench.json")) as f:
        run = json.load(f)
    assert open(os.path.join(root, src)).read() == report.summary_markdown(run)
    assert run["env"]["command"] in open(os.path.join(root, "README.md")).read()


def test_from_with_out_rewrites_only_the_markdown(tmp_path, capsys):
    cli.main(TINY + ["--no-openvino", "--backend", "scalar", "--out", str(tmp_path)])
    capsys.readouterr()
    measured = {p: (tmp_path / p).read_bytes() for p in ("bench.json", "bench.csv")}
    for p in ("bench.md", "summary.md"):
        (tmp_path / p).unlink()
    cli.main(["--from", str(tmp_path / "bench.json"), "--out", str(tmp_path)])
    assert {p: (tmp_path / p).read_bytes() for p in measured} == measured
    summary = (tmp_path / "summary.md").read_text()
    assert "| 16,16,8,3,1,1 | " in summary and "**command**" in summary
    assert "| layer cin,cout,hw,k,s,p |" in (tmp_path / "bench.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible: the script would run the GPU check")
def test_gpu_check_script_fails_clearly_without_a_gpu():
    """tools/gpu_check.sh must not pass on a machine where every GPU test would skip."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "VIRTUAL_ENV": sys.prefix,
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    out = subprocess.run(["bash", os.path.join(root, "tools", "gpu_check.sh"), "unused-out-dir"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "gpu_check: no CUDA device is visible to torch" in out.stderr, out.stderr
    assert not os.path.exists(os.path.join(root, "unused-out-dir"))


def test_model_suite_int8_twins_of_the_reference_nets():
    # PyTorch's own int8 flow on each float twin, recorded with its agreement to the float model it came from.
    entries = model_suite.build(("resnet18_int8", "birealnet18_int8", "reactnet_a_int8"), 3, 32)
    agreement = model_suite.check(entries, 32)
    for e in entries:
        assert e.reference is not None and e.may_not_deploy
        assert agreement[e.name].startswith("cosine(int8, fp32 logits) = ")
    assert set(model_suite.TWINS["birealnet18"]) == {"birealnet18_fp32", "birealnet18_int8"}


def test_compare_conv_tables_reads_the_model_suites_per_convolution_table(tmp_path):
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def run_dir(name, ms):
        rows = [{"name": f"c{i}", "in_channels": 32, "out_channels": 16, "kernel": [1, 1], "stride": [1, 1],
                 "in_hw": [8, 8], "input_shortcut": True, "residual": False, "binary_ms": v} for i, v in enumerate(ms)]
        (tmp_path / name).mkdir()
        (tmp_path / name / "bench.json").write_text(json.dumps(
            {"models": {"breakdown": {"model": "binary_dnet53"}, "binary_convs": rows}}))

    run_dir("before-1", [0.2, 0.1])
    run_dir("before-2", [0.4, 0.1])
    run_dir("before-3", [0.3, 0.1])
    run_dir("after-1", [0.15, 0.1])
    tool = os.path.join(root, "tools", "compare_conv_tables.py")
    out = subprocess.run([sys.executable, tool, str(tmp_path / "before-*"), str(tmp_path / "after-*")],
                         capture_output=True, text=True, check=True).stdout
    assert "| c0 | 32->16 1x1/1 | 8x8 +shortcut | 0.3000 | 0.1500 | 0.50x |" in out
    assert "| total (2) |  |  | 0.400 | 0.250 | 0.62x |" in out
    wrong = subprocess.run([sys.executable, tool, str(tmp_path / "before-*"), str(tmp_path / "after-*"),
                            "--model", "reactnet_a"], capture_output=True, text=True)
    assert wrong.returncode != 0 and "has the convolutions of binary_dnet53, not reactnet_a" in wrong.stderr
