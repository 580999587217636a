"""Presenting a run: terminal and Markdown tables, JSON / CSV / PNG files, and the change against a saved run.

A run is one JSON-ready dict: {"env": environment(...), "layers": {...} (layer suite), "models": {...} (model
suite)}; every function here reads only that dict, so a saved run can be re-rendered (python -m bench --from).
"""
import csv
import json
import math
import os

XNOR = "xnorconv "


def geomean(values):
    values = [v for v in values if v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def layer_names(layers):
    """Column order: xnorconv backends first, then the peers in order of first appearance."""
    names = [XNOR + b for b in layers["backends"]]
    for r in layers["rows"]:
        names += [n for n in r["ms"] if n not in names]
    return names


def _shape(r):
    return ",".join(map(str, r["shape"]))


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def header_lines(env, md=False):
    b = "**" if md else ""
    lines = [f"{b}date{b}: {env['date']}", f"{b}machine{b}: {env['machine']} [{env['cpu_features']}]",
             f"{b}threads{b}: {env['threads']}; torch {env['torch']}, xnorconv {env['xnorconv']}"
             + (f", openvino {env['openvino']}" if env.get("openvino") else "") + f", python {env['python']}",
             f"{b}command{b}: `{env['command']}`" if md else f"command: {env['command']}"]
    if env.get("allocator"):
        lines.append(f"{b}allocator{b}: {env['allocator']}")
    if env.get("timing"):
        lines.append(f"{b}timing{b}: {env['timing']}")
    return lines


def layer_table(run, md=False):
    """Rows: (header, [row values]) of the layer suite, plus the summary lines."""
    layers = run["layers"]
    rows, backends = layers["rows"], layers["backends"]
    best = backends[0]
    names = layer_names(layers)
    picks = "auto" in backends  # xnorconv auto = the backend the selector picks for the layer (no use_backend)
    cols = (["layer cin,cout,hw,k,s,p"] + (["auto picks"] if picks else []) + [f"{n} ms" for n in names]
            + [f"x fp32 {b}" for b in backends])
    has_ov = any("openvino binary" in r["ms"] for r in rows)
    if has_ov:
        cols.append(f"x openvino {best}")
    has_ovk = any("openvino" in r["kernel_best_ms"] for r in rows)
    cols += [f"kernel ms {best}"] + (["kernel ms openvino"] if has_ovk else []) + [f"kernel/peak {best}"]
    if has_ovk:
        cols.append("kernel/peak openvino")
    table = []
    for r in rows:
        line = [_shape(r)] + ([r["auto_backend"]] if picks else []) + [_fmt(r["ms"].get(n), ".4f") for n in names]
        line += [_fmt(r["ms"]["fp32 NCHW"] / r["ms"][XNOR + b], ".1f") for b in backends]
        if has_ov:
            ov = r["ms"].get("openvino binary")
            line.append(_fmt(ov / r["ms"][XNOR + best] if ov else None, ".2f"))
        line.append(_fmt(r["kernel_best_ms"][best], ".4f"))
        if has_ovk:
            line.append(_fmt(r["kernel_best_ms"].get("openvino"), ".4f"))
        line.append(f"{100 * r['kernel_fraction_of_peak'][best]:.0f}%")
        if has_ovk:
            f = r.get("openvino_kernel_fraction_of_peak")
            line.append("-" if f is None else f"{100 * f:.0f}%")
        table.append(line)
    summary = ["geometric mean speedup over fp32 NCHW: " + ", ".join(
        f"{b} {geomean(r['ms']['fp32 NCHW'] / r['ms'][XNOR + b] for r in rows):.1f}x" for b in backends)]
    for peer in ("int8", "openvino binary"):
        measured = [r for r in rows if peer in r["ms"]]
        if measured:
            wins = sum(r["ms"][XNOR + best] < r["ms"][peer] for r in measured)
            summary.append(f"xnorconv {best} faster than {peer} on {wins} of {len(measured)} layers")
    summary.append("peak probe (binary GMAC/s, best of the run x threads): " + ", ".join(
        f"{b} {rows[0]['peak_gmacs'][b]:.0f}" for b in backends if b != "auto"))
    summary.append("kernel = convolution pass alone on pre-packed input, timed after one untimed pass over the same "
                   "buffers, best of the run (openvino: its "
                   "BinaryConvolution node per OpenVINO's profiler, 1 us resolution); kernel/peak = its MAC rate over "
                   f"the best probe reading of its family ({best}: the family it picks; openvino: avx512)")
    for r in rows:
        summary += [f"{_shape(r)}: {n}" for n in r.get("notes", [])]
    return cols, table, summary


def summary_markdown(run):
    """The short form of a layer run, for the README: machine and command, then per layer the selector's pick and
    the medians of xnorconv, PyTorch fp32 and int8 and OpenVINO's BinaryConvolution (when measured), and the ratios.
    `python -m bench --out DIR` writes it to DIR/summary.md."""
    env, layers = run["env"], run["layers"]
    rows = layers["rows"]
    best = layers["backends"][0]
    peers = [p for p in ("int8", "openvino binary") if any(p in r["ms"] for r in rows)]
    label = {"int8": "PyTorch int8", "openvino binary": "OpenVINO binary"}
    cols = (["layer cin,cout,hw,k,s,p", "xnorconv picks", "xnorconv ms", "PyTorch fp32 ms"]
            + [f"{label[p]} ms" for p in peers] + ["x fp32"] + [f"x {label[p]}" for p in peers])
    table = []
    for r in rows:
        ours = r["ms"][XNOR + best]
        table.append([_shape(r), r.get("auto_backend", best), f"{ours:.4f}", f"{r['ms']['fp32 NCHW']:.4f}"]
                     + [_fmt(r["ms"].get(p), ".4f") for p in peers]
                     + [f"{r['ms']['fp32 NCHW'] / ours:.1f}"]
                     + [_fmt(r["ms"][p] / ours if p in r["ms"] else None, ".1f") for p in peers])
    out = [f"- **machine**: {env['machine']} [{env['cpu_features']}]",
           f"- **threads**: {env['threads']}; batch {layers['batch']}; torch {env['torch']}"
           + (f", openvino {env['openvino']}" if env.get("openvino") else ""),
           f"- **command**: `{env['command']}` ({env['date']})", "",
           render(cols, table, md=True), "",
           f"Medians of {layers['reps']} interleaved rounds, float32 tensor in and out (xnorconv: binarize, pack, "
           f"convolve, scale; pad_value {layers['pad_value']}); x = how many times faster xnorconv is. Geometric "
           f"mean over fp32: {geomean(r['ms']['fp32 NCHW'] / r['ms'][XNOR + best] for r in rows):.1f}x."]
    return "\n".join(out) + "\n"


def layer_preamble(run):
    l = run["layers"]
    return (f"batch {l['batch']}, {l['reps']} interleaved rounds per backend, medians in ms; xnorconv pad_value "
            f"{l['pad_value']}. Float32 tensor in, float32 tensor out (xnorconv: binarize + pack + conv + output "
            "stage, weights pre-packed). int8: PyTorch quantized conv (x86, channels_last) on quantized input, "
            "conversions excluded. openvino binary: OpenVINO BinaryConvolution float in/out (+1 padding).")


def model_table(run):
    m = run["models"]
    first_name = m["models"][0]["name"]
    modes = [d for d in m.get("deploy", ["eager"]) if d != "eager"]
    cols = (["model", "batch 1 ms/image"] + [f"batch 1 ms/image ({d})" for d in modes] + ["batch 8 ms/image"]
            + [f"batch 8 ms/image ({d})" for d in modes]
            + ["batch 8 images/s", "peak forward MB (batch 1)", "weights MB", "file MB",
               f"batch 1 time / {first_name}'s"])
    first = m["models"][0]["batch1_ms"]
    def per_image(e, batch, d):
        key = f"batch{batch}_ms_per_image_{d}"
        return f"{e[key]:.2f}" if key in e else "n/a"

    table = [[e["name"], f"{e['batch1_ms_per_image']:.2f}"] + [per_image(e, 1, d) for d in modes]
             + [f"{e['batch8_ms_per_image']:.2f}"] + [per_image(e, 8, d) for d in modes]
             + [f"{e['batch8_images_per_s']:.1f}", f"{e['peak_forward_bytes_batch1'] / 2**20:.2f}",
                f"{e['weight_bytes'] / 2**20:.3f}", f"{e['state_dict_bytes'] / 2**20:.3f}",
                f"{e['batch1_ms'] / first:.2f}"] for e in m["models"]]
    summary = [f"{e['name']}: {e['description']}; check: {e['check']}"
               + (f"; runs {e['memory_format']} (freeze's choice)" if e.get("memory_format", "n/a") != "n/a" else "")
               for e in m["models"]]
    if modes:
        summary.append("deployment modes: eager (nn.Module), " + ", ".join(
            {"torchscript": "torchscript (torch.jit.trace + torch.jit.freeze, no Python in the graph)",
             "aoti": "aoti (torch.export + AOTInductor package)",
             "compile": "compile (torch.compile, Inductor)"}[d] for d in modes)
                       + "; each checked against its eager model's output before timing")
        for e in m["models"]:
            for d, why in e.get("deploy_unavailable", {}).items():
                summary.append(f"{e['name']} has no {d} figure: {why}")
    if all("batch1_minor_faults" in e for e in m["models"]):
        summary.append("minor page faults per batch-1 pass (memory the allocator faults in again): "
                       + ", ".join(f"{e['name']} {e['batch1_minor_faults']:.0f}" for e in m["models"]))
    by = {e["name"]: e for e in m["models"]}
    # Runs saved before the "twins" key compared binary_dnet53 only.
    twins = m.get("twins", {"binary_dnet53": ["binary_dnet53_fp32", "binary_dnet53_int8"]})
    for binary_name, others in twins.items():
        if binary_name not in by:
            continue
        binary = by[binary_name]
        for other in (o for o in others if o in by):
            for d in ["eager"] + modes:
                suffix = "" if d == "eager" else f"_{d}"
                ratios = [f"batch {b} {by[other][f'batch{b}_ms{suffix}'] / binary[f'batch{b}_ms{suffix}']:.2f}x"
                          for b in (1, 8) if f"batch{b}_ms{suffix}" in by[other] and f"batch{b}_ms{suffix}" in binary]
                if ratios:
                    summary.append(f"frozen {binary_name} vs {other}, both {d}: " + ", ".join(ratios) + " faster")
    free = m.get("binary_convs_free")
    twin_name = next(iter(twins.get(free["model"], ())), None) if free else None
    if free and twin_name in by and free["model"] in by:
        for key in (k for k in free if k.startswith("batch1_ms")):  # batch1_ms (eager), batch1_ms_torchscript
            d = key[len("batch1_ms_"):] or "eager"
            if key in by[twin_name]:
                twin, binary = by[twin_name][key], by[free["model"]][key]
                summary.append(
                    f"{free['model']} with its binary convolutions free ({d}, batch 1): {free[key]:.2f} ms, the rest "
                    f"of the network; so against {twin_name} no binary kernel can give more than "
                    f"{twin / free[key]:.2f}x (now {twin / binary:.2f}x: the binary convolutions take "
                    f"{binary - free[key]:.2f} ms of {binary:.2f})")
    return cols, table, summary


def _epilogue_mark(row):
    """What the conv adds in its output stage: a residual tensor, or the shortcut it computes from its input."""
    return " +res" if row["residual"] else " +shortcut" if row.get("input_shortcut") else ""


def binary_conv_rows(run):
    rows = run["models"].get("binary_convs")
    if not rows:
        return None
    cols = ["binary conv", "cin->cout k/s", "input", "binary ms", "fp32 conv ms", "memory passes ms",
            "x fp32 conv", "binary / memory"]
    table = [[r["name"], f"{r['in_channels']}->{r['out_channels']} {r['kernel'][0]}x{r['kernel'][1]}/{r['stride'][0]}",
              f"{r['in_hw'][0]}x{r['in_hw'][1]} {r['input_dtype']}" + _epilogue_mark(r),
              f"{r['binary_ms']:.4f}", f"{r['fp32_ms']:.4f}", f"{r['memory_ms']:.4f}",
              f"{r['fp32_ms'] / r['binary_ms']:.1f}x", f"{r['binary_ms'] / r['memory_ms']:.2f}"] for r in rows]
    totals = {k: sum(r[k] for r in rows) for k in ("binary_ms", "fp32_ms", "memory_ms")}
    table.append([f"total ({len(rows)})", "", "", f"{totals['binary_ms']:.3f}", f"{totals['fp32_ms']:.3f}",
                  f"{totals['memory_ms']:.3f}", f"{totals['fp32_ms'] / totals['binary_ms']:.1f}x",
                  f"{totals['binary_ms'] / totals['memory_ms']:.2f}"])
    return cols, table


def breakdown_tables(run, top=12):
    b = run["models"]["breakdown"]
    mod_cols = ["module (self time)", "type", "self ms", "share"]
    mods = [[l["name"], l["type"], f"{l['self_ms']:.3f}", f"{100 * l['share']:.1f}%"] for l in b["layers"][:top]]
    op_cols = ["operator", "calls/pass", "self ms/pass", "share"]
    ops = [[o["op"], str(o["calls"]), f"{o['self_ms']:.3f}", f"{100 * o['share']:.1f}%"] for o in b["ops"][:top]]
    return (mod_cols, mods), (op_cols, ops)


def render(cols, table, md=False):
    if md:
        out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(cols))) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in table]
        return "\n".join(out)
    widths = [max(len(c), *(len(r[i]) for r in table)) if table else len(c) for i, c in enumerate(cols)]
    out = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cols, widths)))]
    out += ["  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths))) for r in table]
    return "\n".join(out)


def text(run, md=False):
    """The whole report, as terminal text or as Markdown for the README's performance section."""
    out = []
    env = run["env"]
    if md:
        out += ["### Performance", "", "Generated by `python -m bench --markdown`; every figure measured in one "
                "process, implementations interleaved, correctness asserted first.", ""]
        out += [f"- {l}" for l in header_lines(env, md=True)] + [""]
    else:
        out += ["# xnorconv benchmark"] + header_lines(env) + [""]
    if "layers" in run:
        out += ["#### Layers (DarkNet-53 at 128x128 unless --shape)" if md else "## layers", "",
                layer_preamble(run), ""]
        cols, table, summary = layer_table(run, md)
        out += [render(cols, table, md), ""]
        out += [f"- {s}" if md else s for s in summary] + [""]
    if "chain" in run:
        c = run["chain"]
        out += ["#### Two binary layers in a row" if md else "## two binary layers in a row", "",
                "conv -> BN -> binary conv -> BN (3x3, batch 1), frozen by xnorconv.freeze: the first layer hands the "
                "second floats (chain_signs=False) or its input signs as bool (chain_signs=True, the default). "
                f"{c['threads']} thread(s), median of {c['reps']} interleaved rounds, ms.", ""]
        cols = ["channels x hw", "float hand-over ms", "sign hand-over ms", "gain"]
        table = [[f"{r['channels']} x {r['hw']}", f"{r['ms']['float hand-over']:.4f}",
                  f"{r['ms']['sign hand-over']:.4f}", f"{r['gain']:.2f}x"] for r in c["rows"]]
        out += [render(cols, table, md), ""]
    if "scaling" in run:
        sc = run["scaling"]
        n = sc["threads"]
        out += [f"#### Thread scaling, 1 vs {n} threads" if md else f"## thread scaling, 1 vs {n} threads", "",
                "The op alone, batch 1, float in and out; thread counts alternate in blocks of 20 timed calls, "
                "medians in ms (auto: the selector's pick, named in 'runs'); speedup: the median over neighbouring "
                "block pairs of their ratio, which cancels the host's slow speed drifts.", ""]
        cols = ["layer cin,cout,hw,k,s,p", "backend", "runs", "1 thread ms", f"{n} threads ms", "speedup"]
        table = [[_shape(r), r["backend"], r["runs"], f"{r['ms_1']:.4f}", f"{r[f'ms_{n}']:.4f}",
                  f"{r['speedup']:.2f}x"] for r in sc["rows"]]
        out += [render(cols, table, md), ""]
    if "models" in run:
        m = run["models"]
        out += [("#### Models" if md else "## models") + f" ({m['size']}x{m['size']}, {m['threads']} thread(s), "
                f"{m['num_classes']} classes, median of {m['reps']} interleaved runs)", ""]
        cols, table, summary = model_table(run)
        out += [render(cols, table, md), ""]
        out += [f"- {s}" if md else s for s in summary] + [""]
        b = m["breakdown"]
        out += [f"Where {b['model']}'s time goes (batch {b['batch']}, {b['total_ms']:.2f} ms per pass with hooks):",
                ""]
        (mc, mt), (oc, ot) = breakdown_tables(run)
        out += [render(mc, mt, md), "", render(oc, ot, md), ""]
        conv_rows = binary_conv_rows(run)
        if conv_rows:
            out += [f"Each binary convolution of {b['model']} in place (batch 1, the tensors it gets in a forward pass, "
                    "interleaved medians): binary = the op with its fused shortcut add and PReLU; fp32 conv = the "
                    "float twin's convolution alone; memory passes = torch reading the input (and the residual) and "
                    "writing the output, the traffic no convolution of these tensors avoids (+shortcut: the op "
                    "computes the unit's shortcut from the input it reads anyway):", "",
                    render(*conv_rows, md), ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------------- files
def figures(run):
    """Every figure as a flat record: suite, item, metric, value, unit."""
    recs = []
    if "layers" in run:
        for r in run["layers"]["rows"]:
            item = _shape(r)
            for n, v in r["ms"].items():
                recs.append(("layers", item, f"{n} ms", v, "ms"))
                if n in r.get("gops", {}):
                    recs.append(("layers", item, f"{n} GOPS", r["gops"][n], "GOPS"))
            for b in run["layers"]["backends"]:
                recs += [("layers", item, f"speedup vs fp32 NCHW {XNOR}{b}", r["speedup_vs_fp32"][b], "x"),
                         ("layers", item, f"kernel fraction of peak {b}", r["kernel_fraction_of_peak"][b], "ratio"),
                         ("layers", item, f"peak probe {b}", r["peak_gmacs"][b], "GMAC/s")]
            for b in r["kernel_ms"]:
                recs += [("layers", item, f"kernel median ms {b}", r["kernel_ms"][b], "ms"),
                         ("layers", item, f"kernel best ms {b}", r["kernel_best_ms"][b], "ms")]
    if "scaling" in run:
        n = run["scaling"]["threads"]
        for r in run["scaling"]["rows"]:
            item = f"{_shape(r)} {r['backend']}"
            recs += [("scaling", item, "1 thread ms", r["ms_1"], "ms"),
                     ("scaling", item, f"{n} threads ms", r[f"ms_{n}"], "ms"),
                     ("scaling", item, f"speedup 1 -> {n} threads", r["speedup"], "x")]
    if "models" in run:
        for e in run["models"]["models"]:
            for k, v in e.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    unit = "bytes" if k.endswith("bytes") or "bytes" in k else (
                        "images/s" if k.endswith("per_s") else "ms" if "ms" in k else "count")
                    recs.append(("models", e["name"], k, v, unit))
        b = run["models"]["breakdown"]
        for l in b["layers"]:
            recs.append(("breakdown", f"{b['model']}:{l['name']}", "self ms", l["self_ms"], "ms"))
        for o in b["ops"]:
            recs.append(("breakdown-ops", f"{b['model']}:{o['op']}", "self ms", o["self_ms"], "ms"))
    return recs


def write_markdown(run, out_dir):
    """bench.md (the whole report as Markdown) and, for a layer run, summary.md (the README's table)."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "bench.md")]
    with open(paths[0], "w") as f:
        f.write(text(run, md=True) + "\n")
    if "layers" in run:
        paths.append(os.path.join(out_dir, "summary.md"))
        with open(paths[-1], "w") as f:
            f.write(summary_markdown(run))
    return paths


def write(run, out_dir):
    """bench.json (everything), bench.csv (every figure, one per line, with the environment), bench.md and
    summary.md (write_markdown), PNG plots."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "bench.json"), os.path.join(out_dir, "bench.csv")]
    with open(paths[0], "w") as f:
        json.dump(run, f, indent=1)
    env = run["env"]
    env_cols = ["date", "machine", "threads", "torch", "xnorconv", "openvino", "python", "command"]
    with open(paths[1], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["suite", "item", "metric", "value", "unit"] + env_cols)
        for rec in figures(run):
            w.writerow(list(rec) + [env.get(c, "") for c in env_cols])
    paths += write_markdown(run, out_dir)
    paths += plots(run, out_dir)
    return paths


def plots(run, out_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    env, paths = run["env"], []
    foot = f"{env['machine']}; {env['threads']} thread(s); {env['date']}"
    if "layers" in run:
        rows = run["layers"]["rows"]
        names = [n for n in layer_names(run["layers"]) if n != "fp32 NCHW"]
        fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows) + 3), 4.5))
        width = 0.8 / len(names)
        for i, n in enumerate(names):
            ys = [r["ms"]["fp32 NCHW"] / r["ms"][n] if n in r["ms"] else 0 for r in rows]
            ax.bar([j + i * width for j in range(len(rows))], ys, width, label=n)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], [_shape(r) for r in rows], rotation=20,
                      fontsize=8)
        ax.set_ylabel("speedup over PyTorch fp32 NCHW (x)")
        ax.set_title(f"binary convolution layers, batch {run['layers']['batch']}")
        ax.axhline(1, color="gray", lw=0.8)
        ax.legend(fontsize=8)
        fig.text(0.01, 0.01, foot, fontsize=7)
        fig.tight_layout(rect=(0, 0.04, 1, 1))
        paths.append(os.path.join(out_dir, "layers_speedup.png"))
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    if "models" in run:
        ms = run["models"]["models"]
        fig, ax = plt.subplots(figsize=(7, 4))
        labels = [e["name"] for e in ms]
        ax.barh(labels, [e["batch1_ms_per_image"] for e in ms], height=0.4, label="batch 1")
        ax.barh([j + 0.4 for j in range(len(ms))], [e["batch8_ms_per_image"] for e in ms], height=0.4,
                label="batch 8")
        ax.set_xlabel("ms per image")
        ax.invert_yaxis()
        ax.set_title(f"models at {run['models']['size']}x{run['models']['size']}")
        ax.legend(fontsize=8)
        fig.text(0.01, 0.01, foot, fontsize=7)
        fig.tight_layout(rect=(0, 0.04, 1, 1))
        paths.append(os.path.join(out_dir, "models_latency.png"))
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


# ---------------------------------------------------------------------------------------------------- compare
def compare(run, old):
    """Lines showing the change of every time-like figure against a saved run (negative % = faster now)."""
    out = [f"# change against the run of {old['env']['date']} ({old['env']['command']})",
           f"# machine then: {old['env']['machine']}, threads {old['env']['threads']}; now: {run['env']['machine']}, "
           f"threads {run['env']['threads']}"]
    rows = []

    def add(item, metric, new, was, unit):
        rows.append([item, metric, f"{was:.4g}", f"{new:.4g}", unit, f"{100 * (new / was - 1):+.1f}%" if was else "-"])

    if "layers" in run and "layers" in old:
        then = {_shape(r): r for r in old["layers"]["rows"]}
        for r in run["layers"]["rows"]:
            o = then.get(_shape(r))
            if o is None:
                continue
            for n, v in r["ms"].items():
                if n in o["ms"]:
                    add(_shape(r), n, v, o["ms"][n], "ms")
    if "models" in run and "models" in old:
        then = {e["name"]: e for e in old["models"]["models"]}
        for e in run["models"]["models"]:
            o = then.get(e["name"])
            if o is None:
                continue
            latencies = [k for k in e if "_ms_per_image" in k]
            for k in latencies + ["peak_forward_bytes_batch1", "state_dict_bytes"]:
                if k in o and k in e:
                    add(e["name"], k, e[k], o[k], "bytes" if "bytes" in k else "ms")
    if not rows:
        out.append("nothing in common with the saved run (different suites or shapes)")
        return "\n".join(out)
    out.append(render(["item", "figure", "then", "now", "unit", "change"], rows))
    return "\n".join(out)
