"""The bench report as types: `BenchReport` holds one `BenchResult` per artifact, runtime and size (and
a `Skipped` for each that could not run); `to_json` is the report file's object, `markdown` the table
`paragon-export bench` prints."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .roofline import Peak

FORMAT = "paragon-export/bench"
VERSION = 1

LATENCY_NOTE = "runtime time of one inference (Polygraphy last_inference_time), median and 90th percentile"
LIMIT_NOTE = ("macs_per_lr_pixel: multiply-accumulates of one inference per LR input pixel (ONNX: counted "
              "from the graph's Conv/ConvTranspose shapes; checkpoints: their conv calls; NCNN: its ONNX's count, "
              "stored at export; engines: none); "
              "gmac_s = that x pixels / median latency; peak_fraction = gmac_s / peak.fp32_gmac_s")
MEMORY_NOTE = ("peak_rss_mib: rise of the process's peak resident set over its size before the runner was built, "
               "through build and warm-up (weights + runtime workspace + activations); "
               "method VmHWM is exact per artifact, ru_maxrss is a lower bound")


@dataclass
class BenchResult:
    """One artifact on one runtime at one LR size; the fields are the JSON row's, in its order."""

    artifact: str
    name: str
    label: str  # the shortest path tail that tells same-named artifacts apart
    runtime: str
    form: str
    precision: str
    scale: int
    size: str  # HxW of the LR input
    input_hw: list[int]
    output_hw: list[int]
    runs: int
    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    throughput_img_s: float
    throughput_out_mpix_s: float
    peak_rss_mib: float
    memory_method: str
    baseline: bool
    speedup_vs_eager: float | None
    macs_per_lr_pixel: int | None
    gmac_s: float | None
    peak_fraction: float | None

    def cells(self) -> list[str]:
        vs = "baseline" if self.baseline else (f"{self.speedup_vs_eager:.2f}x" if self.speedup_vs_eager else "-")
        return [self.label, self.form, self.precision, self.size, f"{self.median_ms:.2f}", f"{self.p90_ms:.2f}",
                f"{self.throughput_img_s:.2f}", f"{self.throughput_out_mpix_s:.2f}", f"{self.peak_rss_mib:.1f}", vs,
                f"{self.macs_per_lr_pixel / 1e3:.1f}" if self.macs_per_lr_pixel else "-",
                f"{self.gmac_s:.2f}" if self.gmac_s else "-",
                f"{100 * self.peak_fraction:.0f}%" if self.peak_fraction else "-"]


@dataclass
class Skipped:
    """An artifact that could not run at a size here (foreign engine, runtime not installed, out of range)."""

    artifact: str
    size: str
    reason: str


@dataclass
class BenchSettings:
    threads: int
    runs: int
    warmup: int
    sizes: list[str]
    input: str = "crop of skimage astronaut.png (real photo), batch 1"


_HEAD = ["artifact", "runtime", "prec", "size", "median ms", "p90 ms", "img/s", "out MP/s", "peak MiB", "vs eager",
         "kMAC/px", "GMAC/s", "% peak"]


@dataclass
class BenchReport:
    created: str  # ISO time, UTC
    host: dict  # CPU, core count and library versions, as recorded
    settings: BenchSettings
    peak: Peak
    baseline: str | None  # the PyTorch eager checkpoint the ratios are against
    results: list[BenchResult] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def ratios(self) -> str:
        if self.baseline:
            return "speedup_vs_eager = eager median / this median, same size, same run (>1: faster)"
        return "no PyTorch checkpoint given, so no ratios (pass one, or --baseline)"

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "created": self.created, "host": self.host,
                "settings": asdict(self.settings), "latency": LATENCY_NOTE, "memory": MEMORY_NOTE,
                "limit": LIMIT_NOTE, "peak": asdict(self.peak),
                "baseline": {"artifact": self.baseline, "runtime": "torch eager fp32"} if self.baseline else None,
                "ratios": self.ratios, "results": [asdict(r) for r in self.results],
                "skipped": [asdict(s) for s in self.skipped]}

    def markdown(self) -> str:
        rows = [r.cells() for r in self.results]
        widths = [max(len(c) for c in col) for col in zip(_HEAD, *rows)]
        line = lambda cells: "| " + " | ".join(c.ljust(wd) for c, wd in zip(cells, widths)) + " |"  # noqa: E731
        out = [line(_HEAD), "|" + "|".join("-" * (wd + 2) for wd in widths) + "|", *map(line, rows)]
        out += [f"skipped {s.artifact} at {s.size}: {s.reason}" for s in self.skipped]
        st, pk = self.settings, self.peak
        out.append(f"threads {st.threads}, {st.runs} timed runs after {st.warmup} warm-up, {self.ratios}")
        out.append(f"% peak: of {pk.fp32_gmac_s:.1f} GMAC/s, this CPU's measured fp32 peak ({pk.isa}, "
                   f"{pk.threads} thread(s); MatMul probe)")
        return "\n".join(out)
