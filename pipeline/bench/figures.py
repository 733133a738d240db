"""The benchmark's figures and the design's performance targets (docs/benchmarks.md), rendered from a ``bench.json`` (no torch here:
``report --bench`` renders a committed result without running anything)."""

from __future__ import annotations

from typing import Any

from pipeline.core.errors import UserError
from pipeline.report.results import is_number

# `bench --profile gpu` (pipeline/bench/gpu.py) times these classifiers: one tuple for the run and its rows
GPU_ARCHS = ("preact-resnet18", "wrn-28-10")

# the design's performance targets (docs/benchmarks.md). The extract ones are shown both per view (fixed costs left out: what scales
# with the data) and for the whole command at the bench's size, where start-up, reading shards
# and the probe are a larger share than in a full-size extraction.
TARGETS = {"extract_over_forward": ("<=", 1.05), "extract_stage_over_forward": ("<=", 1.05),
           "multi_over_single_per_timestep": ("<=", 1.1),
           "train_cached_over_plain": ("<=", 1.03), "reader_over_train": (">=", 20.0),
           "reader_rss_growth_fraction": ("<=", 0.05), "extract_2proc_speedup": (">=", 1.7),
           "extract_2proc_speedup_without_fixed": (">=", 1.7), "images_rss_growth_fraction": ("<=", 0.05),
           "images_stream_over_ram": ("<=", 1.05), "images_reader_over_train": (">=", 20.0),
           "ingest_prepare_rss_growth_fraction": ("<=", 0.05), "ingest_extract_rss_growth_fraction": ("<=", 0.05)}
TARGETS |= {f"{arch}_cached_over_plain": TARGETS["train_cached_over_plain"] for arch in GPU_ARCHS}  # any device
# the GPU profile's rows: the CIFAR-sized UNet and, per classifier, the three AT steps
GPU_ROWS = [("diffusion UNet parameters, millions", "unet_params_m"),
            ("extract views/s (fp32, UNet to mid_block)", "extract_views_per_s_fp32"),
            ("bare forward views/s (bf16 autocast)", "bare_forward_views_per_s_bf16"),
            ("extract peak GPU MiB", "extract_peak_mb")]
for _arch in GPU_ARCHS:
    GPU_ROWS += [(f"{_arch}: plain AT s/step (PGD-10, batch 512)", f"{_arch}_plain_s_per_step"),
                 (f"{_arch}: AT+DRA cached s/step", f"{_arch}_cached_s_per_step"),
                 (f"{_arch}: AT+DRA online s/step", f"{_arch}_online_s_per_step"),
                 (f"{_arch}: cached / plain", f"{_arch}_cached_over_plain"),
                 (f"{_arch}: online / cached", f"{_arch}_online_over_cached"),
                 *[(f"{_arch}: peak GPU MiB, {step}", f"{_arch}_{step}_peak_mb") for step in ("plain", "cached", "online")]]
GPU_ROWS += [("online targets (GPU, bf16 autocast) vs CPU fp32: min cosine", "online_vs_cpu_fp32_min_cosine"),
             ("  max abs difference", "online_vs_cpu_fp32_max_abs_diff")]

ROWS = [("extract pass / bare forward", "extract_over_forward"),
        ("  whole stage (with fixed costs)", "extract_stage_over_forward"),
        ("AT+DRA cached / plain AT (RAM)", "train_cached_over_plain"),
        ("AT+DRA cached / plain AT (streamed)", "train_stream_over_plain"),
        ("AT+DRA online / cached", "train_online_over_cached"),
        ("AT+DRA online whole UNet / cached", "train_online_full_over_cached"),
        ("reader / training samples/s", "reader_over_train"),
        ("reader peak RSS MiB (cache > budget)", "reader_peak_rss_mb"),
        ("reader peak RSS MiB (half the cache)", "reader_peak_rss_mb_half"),
        ("  RSS growth / added cache", "reader_rss_growth_fraction"),
        ("reader baseline RSS MiB (no reads)", "reader_rss_baseline_mb"),
        ("reader budget MiB", "reader_budget_mb"), ("reader cache MiB", "reader_cache_mb"),
        ("bytes per view on disk", "bytes_per_view"), ("compression ratio", "compression_ratio"),
        ("T x L target sets in one pass / one set", "multi_over_single"),
        ("  per timestep", "multi_over_single_per_timestep"),
        ("extract 2 processes / 1", "extract_2proc_speedup"),
        ("  without fixed costs", "extract_2proc_speedup_without_fixed"),
        ("train peak RSS MiB, small image part", "images_peak_rss_mb_small"),
        ("train peak RSS MiB, 10x larger part", "images_peak_rss_mb_big"),
        ("  RSS growth / added image data", "images_rss_growth_fraction"),
        ("image data added MiB", "images_added_mb"),
        ("step, images streamed / in RAM", "images_stream_over_ram"),
        ("image + target reader / training samples/s", "images_reader_over_train"),
        ("  with views replayed (assemble)", "images_pipeline_over_train"),
        ("train setup s, large part (checks)", "images_setup_s_big"),
        ("prepare peak RSS MiB, small npz set", "ingest_prepare_peak_rss_mb_small"),
        ("prepare peak RSS MiB, 10x larger set", "ingest_prepare_peak_rss_mb_big"),
        ("  RSS growth / added image data", "ingest_prepare_rss_growth_fraction"),
        ("extract peak RSS MiB, small set", "ingest_extract_peak_rss_mb_small"),
        ("extract peak RSS MiB, 10x larger set", "ingest_extract_peak_rss_mb_big"),
        ("  RSS growth / added image data", "ingest_extract_rss_growth_fraction"),
        ("ingest image data added MiB", "ingest_added_mb"),
        ("prepare images/s (large set, npy)", "ingest_prepare_per_s"),
        ("extract images/s (large set, 1 view, UNet to its first block)", "ingest_extract_per_s"),
        ("prepare png / npy seconds (small set)", "ingest_prepare_png_over_npy_s"),
        ("extract png / npy seconds (small set)", "ingest_extract_png_over_npy_s"),
        ("shards png / npy bytes (random pixels)", "ingest_shard_png_over_npy_bytes"),
        ("prepare hours for 20M images, 2 cores", "ingest_prepare_hours_20m"),
        ("extract hours for 20M images, 2 cores, UNet to its first block", "ingest_extract_io_hours_20m"),
        *GPU_ROWS]


def check(res: Any) -> dict:
    """A ``bench.json`` the renderers can read, or one line saying why not."""
    if not isinstance(res, dict) or not isinstance(res.get("machine"), dict):
        raise UserError("a bench result is a JSON object with a 'machine' entry (what `pipeline bench` writes)")
    bad = [key for _, key in ROWS if measured(res, key) and not is_number(res[key])]
    if bad or not any(measured(res, key) for _, key in ROWS):
        raise UserError(f"bench result: no figures, or figures that are not finite numbers ({', '.join(bad)})")
    return res


def measured(res: dict, key: str) -> bool:
    """Whether ``res`` measured ``key`` (null: not measured there, e.g. GPU memory on the CPU)."""
    return res.get(key) is not None


def _num(value: float) -> str:
    return f"{value:.3f}" if value == 0 or abs(value) >= 0.01 else f"{value:.2e}"


def _mark(key: str, value: float, bold: str = "") -> str:
    target = TARGETS.get(key)
    if not target:
        return ""
    met = value <= target[1] if target[0] == "<=" else value >= target[1]
    return f"{target[0]} {target[1]:g}: {'met' if met else f'{bold}MISSED{bold}'}"


def machine_line(res: dict) -> str:
    m = res["machine"]
    return (f"{m.get('cpu')}, {m.get('cores')} cores, {m.get('torch_threads')} torch threads, "
            f"{m.get('gpu') or 'no GPU'}{f', torch {t}' if (t := m.get('torch')) else ''}; 1-minute load {m.get('load_avg_1m')} -> {res.get('load_avg_1m_end')}")


def table(res: dict) -> str:
    """The figures as the text table `pipeline bench` prints."""
    lines = [f"{'figure':40s} {'value':>10s}  target", "-" * 64]
    lines += [f"{label:40s} {_num(res[key]):>10s}  {_mark(key, res[key])}" for label, key in ROWS if measured(res, key)]
    return "\n".join(lines + [f"machine: {machine_line(res)}"])


def markdown(res: dict) -> str:
    """The figures as a Markdown table with the machine and the run's length (README block)."""
    lines = ["| figure | key | value | target |", "|---|---|---|---|"]
    lines += [f"| {label.strip()} | `{key}` | {_num(res[key])} | {_mark(key, res[key], '**')} |"
              for label, key in ROWS if measured(res, key)]
    per_set = res.get("multi_bytes_per_view_per_set")
    if isinstance(per_set, dict) and all(is_number(v) for v in per_set.values()):
        lines += ["", "Feature bytes per view on disk, per target set of the multi-target store: "
                  + ", ".join(f"{name} {v:.1f}" for name, v in per_set.items()) + "."]
    if isinstance(res.get("multi_method"), str):
        lines += ["", f"T x L: {res['multi_method']}."]
    if isinstance(res.get("images_method"), str):
        lines += ["", f"Images ({res.get('images_rows_small')} / {res.get('images_rows_big')} rows): "
                  f"{res['images_method']}."]
    lines += _ingest_tables(res)
    seconds = res.get("seconds")
    lines += ["", f"Machine: {machine_line(res)}"
              + (f"; the whole benchmark took {seconds / 60:.1f} min." if is_number(seconds) else ".")]
    return "\n".join(lines)


def _ingest_tables(res: dict) -> list[str]:
    """The ingest runs (prepare and extract of each npz set) and the encodings compared."""
    runs, enc = res.get("ingest_runs"), res.get("ingest_encodings")
    if not isinstance(runs, dict) or not isinstance(enc, dict):
        return []
    mib = 2**20
    lines = ["", "| run | rows | npz MiB | shards MiB | store MiB | prepare s | prepare img/s | prepare peak RSS MiB "
             "| extract s | extract img/s | extract peak RSS MiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {name} | {r['rows']} | {r['npz_bytes'] / mib:.0f} | {r['shard_bytes'] / mib:.0f} | "
              f"{r['store_bytes'] / mib:.0f} | {r['prepare_s']:.1f} | {r['prepare_per_s']:.0f} | "
              f"{r['prepare_peak_rss_mb']:.0f} | {r['extract_s']:.1f} | {r['extract_per_s']:.0f} | "
              f"{r['extract_peak_rss_mb']:.0f} |" for name, r in runs.items()]
    lines += ["", "| images | member | bytes per image (raw) | encode/s | decode/s |", "|---|---|---|---|---|"]
    lines += [f"| {name.rsplit('_', 1)[0]} | {name.rsplit('_', 1)[1]} | {e['bytes_per_image']:.0f} "
              f"({e['raw_bytes_per_image']}) | {e['encode_per_s']:.0f} | {e['decode_per_s']:.0f} |"
              for name, e in enc.items()]
    if isinstance(res.get("ingest_extract_note"), str):
        lines += ["", f"Prepare ran with {res.get('ingest_workers')} worker processes; {res['ingest_extract_note']}."]
    return lines
