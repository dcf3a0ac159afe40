"""The `fastcnn` command (also `python -m fastcnn`).

    fastcnn info [--json]
        versions, build configuration, backends (with the reason when one is missing), CPU ISA,
        GPU, allocator setting.
    fastcnn bench [--op all|depthwise|grid_sample] [--quick] [--out DIR] [--rounds R] [--compile] ...
        races fastcnn's backends against PyTorch eager (and torch.compile) on the op's cases (every
        op by default), on CUDA when a GPU is visible, else on CPU; prints a table (and the ops'
        summary geometric means), writes DIR/<op>.json (results + environment), DIR/<op>.md
        (markdown table) and DIR/<op>.png (bar chart of the ratios).
    fastcnn report FILE.json [--long] [--output FILE.md]
        renders a results JSON as a markdown table (how the README table is regenerated).

Ops are the modules registered in fastcnn.bench_cases; the timing rules live in
fastcnn.benchmarking.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Any, Dict, List, Optional, Sequence

DTYPES = ("float32", "float16", "bfloat16", "float64")
ALLOCATORS = ("current", "default", "reuse", "both")


# ------------------------------------------------------------------------------------------------
# info


def _info_lines(env: Dict[str, Any]) -> List[str]:
    from . import _extension

    lines = [
        f"fastcnn {env['fastcnn']}" + (f" (git {env['git']})" if env.get("git") else ""),
        f"  location      {os.path.dirname(os.path.abspath(__file__))}",
        f"python {env['python']} on {env['platform']}",
        f"torch {env['torch']} (CUDA {env['torch_cuda'] or 'none'}, cuDNN {env['cudnn'] or 'none'}), "
        f"triton {env['triton'] or 'not installed'}, numpy {env['numpy'] or 'not installed'}",
        "build configuration (fastcnn._C):",
    ]
    if env["build_info"]:
        width = max(len(k) for k in env["build_info"])
        lines += [f"  {k:<{width}} {v}" for k, v in sorted(env["build_info"].items())]
    else:
        lines.append(f"  not loaded: {_extension.load_error()}")
    lines.append("backends:")
    for name, st in env["backends"].items():
        lines.append(f"  {name:<10} {'yes' if st['available'] else 'no ':<4} {st['reason']}")
    isa = env["isa"]
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in isa.items()
                      if k not in ("aten_capability", "gather_data_sampling"))
    lines += [
        f"CPU: {env['cpu']}, {env['cpu_count']} logical cores, torch threads {env['threads']}",
        f"  ISA: {flags}; ATen dispatches to {isa.get('aten_capability')}; gather data sampling: "
        f"{isa.get('gather_data_sampling') or 'unknown'}",
    ]
    if env.get("loadavg"):
        lines.append("  load average: " + " ".join(f"{x:.2f}" for x in env["loadavg"]))
    gpu = env["gpu"]
    lines.append(
        f"GPU: {gpu['name']} (sm_{gpu['capability'].replace('.', '')}, {gpu['memory_GiB']} GiB, "
        f"{gpu['count']} visible)" if gpu else "GPU: none visible (torch.cuda.is_available() is False)"
    )
    alloc = env["allocator"]
    lines.append(
        f"allocator: {alloc['name']}"
        + (f" (GLIBC_TUNABLES={alloc['GLIBC_TUNABLES']})" if alloc["GLIBC_TUNABLES"] else " (glibc defaults)")
        + f"; transparent huge pages: {alloc.get('transparent_hugepage') or 'unknown'}"
    )
    return lines


def cmd_info(args) -> int:
    from . import benchmarking

    env = benchmarking.environment()
    if args.json:
        print(json.dumps(env, indent=2, default=str))
    else:
        print("\n".join(_info_lines(env)))
    return 0


# ------------------------------------------------------------------------------------------------
# formatting


def _fmt_ms(v: Optional[float]) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if v < 0.1 else f"{v:.3f}" if v < 10 else f"{v:.1f}"


def _fmt_ratio(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}"


def _fmt_err(v: Optional[float]) -> str:
    if v is None:
        return "-"
    return "0" if v == 0 else "inf" if math.isinf(v) else f"{v:.1e}"


def _fmt_floor(v: Optional[float]) -> str:
    if v is None:
        return "-"
    pct = 100 * v
    return f"{pct:.1f}%" if pct < 10 else f"{pct:.0f}%"


LONG_COLUMNS = ("op", "case", "shape", "layout", "mode", "backend", "alloc", "time ms", "× torch", "max err",
                "% floor", "copy GB/s")


def _long_rows(results: Sequence[Dict[str, Any]]) -> List[List[str]]:
    rows = []
    for r in results:
        rows.append([
            r["op"], r["case"], r["shape"], r["layout"], r["mode"], r["provider"], r.get("allocator", "-"),
            _fmt_ms(r["time_ms"]), _fmt_ratio(r["ratio"]), _fmt_err(r["max_abs_error"]),
            _fmt_floor(r["floor_fraction"]) if r.get("error") is None else "error: " + r["error"][:60],
            f"{r['copy_bandwidth_GBps']:.0f}" if r.get("copy_bandwidth_GBps") else "-",  # beside this case
        ])
    return rows


def render_table(results: Sequence[Dict[str, Any]]) -> str:
    """Plain-text table, one row per result."""
    return _plain_table(LONG_COLUMNS, _long_rows(results), right_from=7)


def _plain_table(header: Sequence[str], body: Sequence[Sequence[str]], right_from: int) -> str:
    rows = [list(header)] + [list(row) for row in body]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    right = set(range(right_from, len(header)))
    out = []
    for k, row in enumerate(rows):
        out.append("  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in out)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]], right_from: int) -> List[str]:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if i >= right_from else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines


def _copy_range(record: Dict[str, Any], allocator: str) -> str:
    """The copy bandwidths measured beside this allocator's cases: median (min-max)."""
    seen = sorted(r["copy_bandwidth_GBps"] for r in record.get("results", [])
                  if r.get("allocator") == allocator and r.get("copy_bandwidth_GBps"))
    if not seen:
        return ""
    return f" (beside the cases: {statistics.median(seen):.1f} GB/s, {seen[0]:.1f}-{seen[-1]:.1f})"


def _env_summary(record: Dict[str, Any]) -> List[str]:
    lines = []
    for run in record.get("runs", []):
        env, fl = run["environment"], run.get("floors", {})
        where = (f"{env['gpu']['name']}" if env.get("gpu") and record.get("settings", {}).get("device", "").startswith("cuda")
                 else f"{env['cpu']}, {env['threads']} threads")
        lines.append(
            f"- allocator **{run['allocator']}**: {where}; torch {env['torch']} (CUDA {env['torch_cuda'] or 'none'}), "
            f"Triton {env['triton'] or 'none'}; fastcnn {env['fastcnn']}"
            + (f" ({env['git']})" if env.get("git") else "")
            + f"; {env['date']}; copy {fl.get('copy_bandwidth_GBps', 0):.1f} GB/s at the start"
            + _copy_range(record, run["allocator"]) + ", "
            f"matmul {fl.get('matmul_GFLOPs', 0):.0f} GFLOP/s"
        )
    return lines


def render_markdown(record: Dict[str, Any], long: bool = False) -> str:
    """Markdown for a results document. Wide (default): one row per case x layout x mode, per
    provider its speed-up over PyTorch eager (one figure per allocator setting) and its fraction
    of the floor. Long: one row per result."""
    results = record["results"]
    settings = record.get("settings", {})
    ops = sorted({r["op"] for r in results})
    title = ", ".join(ops) or "no results"
    out = [f"### fastcnn benchmark: {title} ({settings.get('device', '?')}, {settings.get('dtype', '?')})", ""]
    if long:
        out += _md_table(LONG_COLUMNS, _long_rows(results), right_from=7)
    else:
        allocs = list(dict.fromkeys(r.get("allocator", "-") for r in results))
        provs = [p for p in dict.fromkeys(r["provider"] for r in results) if p != "torch"]
        keys = list(dict.fromkeys((r["op"], r["case"], r["shape"], r["layout"], r["mode"]) for r in results))
        index = {(r["op"], r["case"], r["shape"], r["layout"], r["mode"], r["provider"], r.get("allocator", "-")): r
                 for r in results}
        alloc_note = " / ".join(allocs)
        header = ["case", "shape", "layout", "mode", f"torch ms ({allocs[0]})" if allocs else "torch ms"]
        for p in provs:
            header += [f"{p} × ({alloc_note})" if len(allocs) > 1 else f"{p} ×",
                       f"{p} % floor ({alloc_note})" if len(allocs) > 1 else f"{p} % floor"]
        rows = []
        for key in keys:
            base = index.get(key + ("torch", allocs[0]))
            row = [key[1], key[2], key[3], key[4], _fmt_ms(base["time_ms"]) if base else "-"]
            for p in provs:
                cells = [index.get(key + (p, a)) for a in allocs]
                row.append(" / ".join(_fmt_ratio(c["ratio"]) if c and not c.get("error") else "err" if c else "-"
                                      for c in cells))
                row.append(" / ".join(_fmt_floor(c["floor_fraction"]) if c and not c.get("error") else "-"
                                      for c in cells))
            rows.append(row)
        out += _md_table(header, rows, right_from=4)
        out += ["", "× = median over interleaved rounds of t(torch eager) / t(provider): above 1 is faster. "
                "% floor = max(bytes / copy bandwidth, flops / matmul rate) / time, the bandwidth that of a "
                "64 MiB copy timed in the same rounds."]
        for summary, header, rows in summary_tables(results, allocs):
            out += ["", summary.note, ""]
            out += _md_table(header, rows, right_from=4)
        det_header, det_rows = determinism_table(results, allocs)
        if det_rows:
            out += ["", DETERMINISM_NOTE, ""]
            out += _md_table(det_header, det_rows, right_from=4)
    out += ["", *_env_summary(record), ""]
    return "\n".join(out)


def summary_tables(results: Sequence[Dict[str, Any]], allocs: Optional[Sequence[str]] = None):
    """Per op that declares a Summary (fastcnn.bench_cases) and has results in it:
    (summary, header, rows) of the geometric means of each provider's ratios over each group."""
    from . import bench_cases

    if allocs is None:
        allocs = list(dict.fromkeys(r.get("allocator", "-") for r in results))
    alloc_note = " / ".join(allocs)
    tables = []
    for op in dict.fromkeys(r["op"] for r in results):
        summary = bench_cases.summary(op)
        if summary is None:
            continue
        mine = [r for r in results if r["op"] == op]
        provs = [p for p in dict.fromkeys(r["provider"] for r in mine) if p != "torch"]
        rows = _geomean_rows(mine, provs, allocs, summary)
        if rows:
            header = [summary.column, "batch", "layout", "mode"] + [f"{p} × ({alloc_note})" for p in provs]
            tables.append((summary, header, rows))
    return tables


def _geomean_rows(results: Sequence[Dict[str, Any]], provs: Sequence[str], allocs: Sequence[str],
                  summary) -> List[List[str]]:
    """The results of `summary`'s groups by group, layout and mode (and batch when by_batch)."""
    groups: Dict[tuple, Dict[tuple, List[tuple]]] = {}
    batches: Dict[tuple, Dict[Any, None]] = {}
    cases: Dict[tuple, Dict[str, None]] = {}
    for r in results:
        label = summary.group_of(r["case"])
        if label is None or r["provider"] == "torch" or r.get("error") or not r.get("ratio"):
            continue
        n = r["params"].get("N")
        key = (label, n if summary.by_batch else None, r["layout"], r["mode"])
        weight = r["params"].get("repeat", 1)
        groups.setdefault(key, {}).setdefault((r["provider"], r.get("allocator", "-")), []).append((r["ratio"], weight))
        batches.setdefault(key, {})[n] = None
        cases.setdefault(key, {})[r["case"]] = None
    rows = []
    for key, cells in groups.items():
        label, _, layout, mode = key
        expected = summary.expected(label)
        if expected is not None and len(cases[key]) < expected:
            label = f"{label} ({len(cases[key])} of {expected} cases)"
        row = [label, "/".join(str(n) for n in batches[key]), layout, mode]
        for p in provs:
            figures = []
            for a in allocs:
                pairs = cells.get((p, a))
                if not pairs:
                    figures.append("-")
                    continue
                total = sum(w for _, w in pairs)
                figures.append(_fmt_ratio(math.exp(sum(w * math.log(x) for x, w in pairs) / total)))
            row.append(" / ".join(figures))
        rows.append(row)
    return rows


DETERMINISTIC_SUFFIX = ",deterministic]"
DETERMINISM_NOTE = ("Cost of determinism: time under torch.use_deterministic_algorithms(True) / time of the "
                    "default (atomic) kernels, median of the per-round ratios (above 1 is slower):")


def determinism_table(results: Sequence[Dict[str, Any]], allocs: Optional[Sequence[str]] = None):
    """(header, rows): for every provider `name[backend,deterministic]` whose `name[backend]` ran on
    the same case, t(deterministic) / t(default) per case x layout x mode, from the interleaved
    per-round times (the ratio of the medians where the rounds do not pair up)."""
    import statistics

    if allocs is None:
        allocs = list(dict.fromkeys(r.get("allocator", "-") for r in results))
    index = {(r["op"], r["case"], r["shape"], r["layout"], r["mode"], r["provider"], r.get("allocator", "-")): r
             for r in results}
    pairs = [(p, p[: -len(DETERMINISTIC_SUFFIX)] + "]")
             for p in dict.fromkeys(r["provider"] for r in results) if p.endswith(DETERMINISTIC_SUFFIX)]
    pairs = [(det, base) for det, base in pairs if any(r["provider"] == base for r in results)]
    if not pairs:
        return [], []

    def relative(det, base):
        if not det or not base or det.get("error") or base.get("error") or not det.get("time_ms") \
                or not base.get("time_ms"):
            return None
        dt, bt = det.get("times_ms") or [], base.get("times_ms") or []
        if dt and len(dt) == len(bt) and all(t > 0 for t in bt):
            return statistics.median(d / b for d, b in zip(dt, bt))
        return det["time_ms"] / base["time_ms"]

    alloc_note = " / ".join(allocs)
    header = ["case", "shape", "layout", "mode"] + [
        f"{base} deterministic / default" + (f" ({alloc_note})" if len(allocs) > 1 else "") for _, base in pairs]
    rows = []
    for key in dict.fromkeys((r["op"], r["case"], r["shape"], r["layout"], r["mode"]) for r in results):
        cells, found = [], False
        for det, base in pairs:
            figures = [relative(index.get(key + (det, a)), index.get(key + (base, a))) for a in allocs]
            found = found or any(f is not None for f in figures)
            cells.append(" / ".join(_fmt_ratio(f) for f in figures))
        if found:
            rows.append([key[1], key[2], key[3], key[4], *cells])
    return header, rows


def render_summaries(results: Sequence[Dict[str, Any]]) -> str:
    """Plain-text geometric means (the ops' Summary groups) and cost of determinism, '' if none."""
    out = []
    for summary, header, rows in summary_tables(results):
        out += ["", summary.note, _plain_table(header, rows, right_from=4)]
    det_header, det_rows = determinism_table(results)
    if det_rows:
        out += ["", DETERMINISM_NOTE, _plain_table(det_header, det_rows, right_from=4)]
    return "\n".join(out)


def plot(record: Dict[str, Any], path: str) -> Optional[str]:
    """Bar chart of the ratios vs PyTorch eager: one panel per mode x layout, bars per provider
    (hatched for the 'reuse' allocator). Returns the path, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter
    except ImportError:
        return None
    results = [r for r in record["results"] if r["provider"] != "torch"]
    modes = list(dict.fromkeys(r["mode"] for r in record["results"])) or ["-"]
    layouts = list(dict.fromkeys(r["layout"] for r in record["results"])) or ["-"]
    provs = list(dict.fromkeys(r["provider"] for r in results))
    allocs = list(dict.fromkeys(r.get("allocator", "-") for r in results))
    series = [(p, a) for p in provs for a in allocs]
    cases = list(dict.fromkeys((r["case"], r["shape"]) for r in record["results"]))
    width = max(8.0, 0.22 * len(cases) * max(1, len(series)) + 2)
    fig, axes = plt.subplots(len(modes), len(layouts), figsize=(width, 3.6 * len(modes)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    bar = 0.8 / max(1, len(series))
    all_ratios = [r["ratio"] for r in results if r.get("ratio")]
    span = max([1.25] + [max(x, 1 / x) * 1.15 for x in all_ratios])  # symmetric around 1 on a log axis
    ticks = [2.0**e for e in range(-12, 13) if 1 / span <= 2.0**e <= span]
    for i, mode in enumerate(modes):
        for j, layout in enumerate(layouts):
            ax = axes[i][j]
            ax.axhline(1.0, color="black", linewidth=0.8)
            for s, (p, a) in enumerate(series):
                xs, ys = [], []
                for c, (case, shape) in enumerate(cases):
                    match = [r for r in results if r["mode"] == mode and r["layout"] == layout and r["case"] == case
                             and r["shape"] == shape and r["provider"] == p and r.get("allocator", "-") == a
                             and r.get("ratio")]
                    if match:
                        xs.append(c + (s - (len(series) - 1) / 2) * bar)
                        ys.append(match[0]["ratio"])
                label = p if len(allocs) == 1 else f"{p} ({a} alloc)"
                # Bars grow from 1: up when faster than PyTorch eager, down when slower.
                ax.bar(xs, [y - 1 for y in ys], bar, bottom=1.0, label=label, color=colors[provs.index(p) % len(colors)],
                       hatch="//" if a == "reuse" else None, edgecolor="white" if a != "reuse" else "black",
                       linewidth=0.3)
            ax.set_yscale("log")
            ax.set_ylim(1 / span, span)
            ax.yaxis.set_major_locator(FixedLocator(ticks))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_xlim(-0.6, len(cases) - 0.4)
            ax.set_title(f"{mode}, {layout}", fontsize=9)
            ax.set_xticks(range(len(cases)))
            ax.set_xticklabels([f"{case}\n{shape}" for case, shape in cases], rotation=60, ha="right", fontsize=6)
            ax.set_ylabel("× PyTorch eager (>1 faster)", fontsize=8)
            ax.tick_params(axis="y", labelsize=7)
            if not series:
                ax.text(0.5, 0.5, "no provider besides PyTorch eager ran", ha="center", va="center",
                        transform=ax.transAxes)
            elif i == 0 and j == 0:
                ax.legend(fontsize=7)
    env = record["runs"][0]["environment"] if record.get("runs") else {}
    settings = record.get("settings", {})
    where = env.get("gpu", {}).get("name") if env.get("gpu") and str(settings.get("device", "")).startswith("cuda") \
        else f"{env.get('cpu', '?')}, {env.get('threads', '?')} threads"
    fig.suptitle(f"fastcnn {', '.join(sorted({r['op'] for r in record['results']}))} on {where}; "
                 f"torch {env.get('torch', '?')}, {settings.get('dtype', '?')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------
# bench


class _Progress:
    """tqdm when installed, else a counter on stderr."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.enabled, self.started = total, 0, enabled, False
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, file=sys.stderr, unit="case", dynamic_ncols=True)
            except ImportError:
                self.bar = None

    def __call__(self, label: str) -> None:
        if not self.enabled:
            return
        if self.started:
            self._advance()
        self.started = True
        if self.bar is not None:
            self.bar.set_description(label)
        else:
            print(f"[{self.done + 1}/{self.total}] {label}", file=sys.stderr, flush=True)

    def _advance(self):
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)

    def close(self):
        if self.enabled and self.started:
            self._advance()
        if self.bar is not None:
            self.bar.close()


def _dtype(name: str):
    import torch

    return getattr(torch, name)


def _mode(text: str) -> str:
    """argparse type of --modes: a base mode, optionally with the one argument to differentiate."""
    from .benchmarking import BACKWARD_MODES, split_mode

    base, arg = split_mode(text)
    if base not in ("forward", *BACKWARD_MODES) or (arg is not None and (base == "forward" or not arg)):
        raise argparse.ArgumentTypeError(
            f"invalid mode {text!r}: forward, forward+backward, backward, or forward+backward[ARG]")
    return text


def _select_shapes(op, args):
    shapes = op.shapes(quick=args.quick, batches=args.batch)
    if args.cases:
        shapes = [s for s in shapes if any(fnmatch.fnmatch(s.name, pat) for pat in args.cases)]
    return shapes


def _child_env(alloc: str) -> Dict[str, str]:
    from .benchmarking import REUSE_TUNABLES

    env = dict(os.environ)
    kept = [t for t in env.get("GLIBC_TUNABLES", "").split(":")
            if t and not t.startswith(("glibc.malloc.mmap_max=", "glibc.malloc.trim_threshold="))]
    if alloc == "reuse":
        kept.append(REUSE_TUNABLES)
    if kept:
        env["GLIBC_TUNABLES"] = ":".join(kept)
    else:
        env.pop("GLIBC_TUNABLES", None)
    return env


def _strip_options(argv: Sequence[str], names: Sequence[str]) -> List[str]:
    """argv without `--name value` / `--name=value` for each of `names`."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in names:
            skip = True
            continue
        if any(a.startswith(n + "=") for n in names):
            continue
        out.append(a)
    return out


def _bench_in_children(args, argv: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """Runs the benchmark once per allocator setting in a fresh process (GLIBC_TUNABLES is read at
    process start) and merges the documents, per op."""
    from .benchmarking import merge_records

    allocs = ["default", "reuse"] if args.allocator == "both" else [args.allocator]
    child_argv = _strip_options(argv, ("--allocator", "--out")) + ["--allocator", "current", "--no-plot", "--quiet"]
    per_op: Dict[str, List[Dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="fastcnn-bench-") as tmp:
        for alloc in allocs:
            out = os.path.join(tmp, alloc)
            cmd = [sys.executable, "-m", "fastcnn", *child_argv, "--out", out]
            print(f"== allocator {alloc}: {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
            rc = subprocess.call(cmd, env=_child_env(alloc))
            if rc != 0:
                raise SystemExit(f"fastcnn bench: the run with the {alloc} allocator failed (exit {rc})")
            for name in sorted(os.listdir(out)):
                if name.endswith(".json"):
                    with open(os.path.join(out, name)) as f:
                        record = json.load(f)
                    per_op.setdefault(record.get("settings", {}).get("op", name[:-5]), []).append(record)
    return {op: merge_records(records) for op, records in per_op.items()}


def _bench_here(args, on_record=None) -> Dict[str, Dict[str, Any]]:
    """Runs the benchmarks in this process; on_record(name, record) as soon as an op is done, so a
    crash in a later op (a first run on a new GPU) keeps the earlier ones."""
    import torch

    from . import bench_cases, benchmarking

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = _dtype(args.dtype)
    records = {}
    ops = bench_cases.names() if args.op in (None, "all") else [args.op]
    for name in ops:
        op = bench_cases.get(name)
        shapes = _select_shapes(op, args)
        if not shapes:  # e.g. --cases names another op's cases only
            continue
        layouts = [l for l in (args.layouts or op.LAYOUTS) if l in op.LAYOUTS]
        # A mode naming an argument runs only for ops that have it.
        modes = [m for m in (args.modes or op.MODES) if benchmarking.split_mode(m)[1] in (None, *op.ARG_NAMES)]
        if not modes:
            continue
        progress = _Progress(len(shapes) * len(layouts) * len(modes), enabled=not args.quiet)
        try:
            rows = benchmarking.run_op(
                op, device=device, dtype=dtype, shapes=shapes, layouts=layouts, modes=modes,
                providers=args.providers, compile=args.compile, rounds=args.rounds, min_rounds=min(3, args.rounds),
                min_time=args.min_time, max_time=args.max_time, check=not args.no_check, seed=args.seed,
                progress=progress,
            )
        finally:
            progress.close()
        settings = {
            "op": name, "device": device, "dtype": args.dtype, "quick": args.quick, "rounds": args.rounds,
            "min_time_s": args.min_time, "max_time_s": args.max_time, "compile": args.compile,
            "layouts": layouts, "modes": modes, "batches": args.batch, "cases": args.cases,
            "providers": args.providers, "seed": args.seed, "check": not args.no_check,
            "reference_dtype": str(benchmarking.reference_dtype(device, dtype, op)).replace("torch.", ""),
            "baseline": benchmarking.BASELINE,
        }
        records[name] = benchmarking.run_record(rows, device=device, dtype=dtype, settings=settings)
        if on_record is not None:
            on_record(name, records[name])
    if not records:
        raise SystemExit(f"fastcnn bench: nothing of {', '.join(ops)} matches --cases {' '.join(args.cases or [])} "
                         f"--modes {' '.join(args.modes or [])}")
    return records


def cmd_bench(args, argv: Sequence[str]) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rounds is None:
        args.rounds = 5 if args.quick else 15
    if args.min_time is None:
        args.min_time = 0.005 if args.quick else 0.02
    if args.max_time is None:
        args.max_time = 5.0 if args.quick else 60.0
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.allocator != "current" and torch.device(device).type != "cpu":
        print("fastcnn bench: --allocator sets glibc's host malloc, which GPU outputs never use; ignored",
              file=sys.stderr)
        args.allocator = "current"
    os.makedirs(args.out, exist_ok=True)
    written: Dict[str, List[str]] = {}

    def write(name, record):
        record.setdefault("settings", {})["command"] = "fastcnn " + " ".join(argv)
        # fp32 keeps <op>.*; other dtypes get their own files, so one folder holds both.
        stem = name if args.dtype == "float32" else f"{name}-{args.dtype}"
        base = os.path.join(args.out, stem)
        with open(base + ".json", "w") as f:
            json.dump(record, f, indent=1, default=str)
            f.write("\n")
        with open(base + ".md", "w") as f:
            f.write(render_markdown(record))
        written[name] = [base + ".json", base + ".md"]
        if not args.no_plot:
            png = plot(record, base + ".png")
            if png:
                written[name].append(png)
            else:
                print("fastcnn bench: matplotlib is not installed; no chart", file=sys.stderr)

    if args.allocator == "current":
        records = _bench_here(args, on_record=write)
    else:
        records = _bench_in_children(args, argv)
        for name, record in records.items():
            write(name, record)
    for name, record in records.items():
        if not args.quiet:
            if args.markdown:
                print(render_markdown(record))
            else:
                print(render_table(record["results"]))
                summaries = render_summaries(record["results"])
                if summaries:
                    print(summaries)
            print("\nwrote " + ", ".join(written[name]))
        if args.quiet:
            continue
        loads = [run["environment"].get("loadavg") for run in record["runs"]]
        cores = record["runs"][0]["environment"].get("cpu_count") or 1 if record["runs"] else 1
        if any(l and l[0] > cores for l in loads):
            hint = " (try --threads 1 on a busy machine)" if torch.get_num_threads() > 1 else ""
            print(f"fastcnn bench: warning: load average above {cores} during the run; CPU figures are noisy{hint}",
                  file=sys.stderr)
    return 0


def update_between_markers(document: str, name: str, text: str) -> str:
    """`document` with the text between `<!-- fastcnn-bench:NAME -->` and
    `<!-- /fastcnn-bench:NAME -->` replaced by `text`."""
    begin, end = f"<!-- fastcnn-bench:{name} -->", f"<!-- /fastcnn-bench:{name} -->"
    i, j = document.find(begin), document.find(end)
    if i < 0 or j < i:
        raise SystemExit(f"fastcnn report: markers {begin} ... {end} not found; put them where the table goes")
    return document[: i + len(begin)] + "\n" + text.strip("\n") + "\n" + document[j:]


def cmd_report(args) -> int:
    from .benchmarking import merge_records

    records = []
    for path in args.files:
        with open(path) as f:
            records.append(json.load(f))
    text = render_markdown(merge_records(records) if len(records) > 1 else records[0], long=args.long)
    if args.update:
        name = args.name or os.path.splitext(os.path.basename(args.files[0]))[0]
        with open(args.update) as f:
            document = f.read()
        updated = update_between_markers(document, name, text)  # raises before the file is touched
        with open(args.update, "w") as f:
            f.write(updated)
        print(f"updated the {name!r} table in {args.update}")
        return 0
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    else:
        print(text)
    return 0


# ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from . import bench_cases

    parser = argparse.ArgumentParser(prog="fastcnn", description="fastcnn: information and benchmarks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="versions, build configuration, backends, CPU ISA, GPU")
    p.add_argument("--json", action="store_true", help="print the environment record as JSON")

    p = sub.add_parser("bench", help="race fastcnn against PyTorch on real-model shapes")
    p.add_argument("--op", default="all", choices=["all", *bench_cases.names()],
                   help="op to benchmark (the modules of fastcnn.bench_cases; default all)")
    p.add_argument("--quick", action="store_true",
                   help="5 rounds on a subset (depthwise: batch 1, no 31x31; grid_sample: the first three shapes): "
                        "about a minute per op on 2 CPU cores")
    p.add_argument("--out", default=os.path.join("bench", "out"), help="directory for <op>.json/.md/.png")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 15; 5 with --quick)")
    p.add_argument("--min-time", type=float, help="seconds per measurement; calls are repeated to reach it")
    p.add_argument("--max-time", type=float,
                   help="seconds per case x layout x mode; rounds shrink (to 3 at least) to fit (default 60)")
    p.add_argument("--compile", action="store_true", help="also race torch.compile (slow to compile on CPU)")
    p.add_argument("--layouts", nargs="+", choices=("nchw", "channels_last"))
    p.add_argument("--modes", nargs="+", type=_mode,
                   help="forward, forward+backward, backward, or forward+backward[ARG]: only ARG needs a gradient "
                        "(grid_sample: forward+backward[theta]); default: the op's own")
    p.add_argument("--batch", nargs="+", type=int,
                   help="batch sizes: of depthwise's model-layer cases (default 1 32); for grid_sample they replace "
                        "each case's own")
    p.add_argument("--cases", nargs="+", metavar="GLOB",
                   help="only cases whose name matches, e.g. 'mbv1-*' k7 (depthwise), mnist28 (grid_sample)")
    p.add_argument("--providers", nargs="+", help="only these providers, e.g. torch 'fastcnn[cpu]'")
    p.add_argument("--device", help="cpu or cuda (default: cuda when a GPU is visible)")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--threads", type=int, help="torch.set_num_threads before timing")
    p.add_argument("--allocator", default="current", choices=ALLOCATORS,
                   help="glibc malloc setting: as this process has it (current), or re-run in child processes "
                        "with the default, the reuse (mmap_max=0) setting, or both")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-check", action="store_true", help="skip the error check against the reference")
    p.add_argument("--no-plot", action="store_true", help="no PNG chart")
    p.add_argument("--markdown", action="store_true", help="print the markdown table instead of the plain one")
    p.add_argument("--quiet", action="store_true", help="no progress and no table")

    p = sub.add_parser("report", help="render results JSON as a markdown table")
    p.add_argument("files", nargs="+", help="results JSON written by `fastcnn bench` (several are merged)")
    p.add_argument("--long", action="store_true", help="one row per result instead of one per case")
    p.add_argument("--output", "-o", help="write to this file instead of stdout")
    p.add_argument("--update", metavar="FILE",
                   help="replace the table between <!-- fastcnn-bench:NAME --> and <!-- /fastcnn-bench:NAME --> "
                        "in FILE (e.g. README.md)")
    p.add_argument("--name", help="NAME of the markers for --update (default: the JSON file's stem)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command == "info":
        return cmd_info(args)
    if args.command == "bench":
        return cmd_bench(args, argv)
    if args.command == "report":
        return cmd_report(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
