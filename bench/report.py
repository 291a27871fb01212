"""The publish benchmark's table and its section of ``bench/RESULTS.md``."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from statistics import median

from .load import Run

PACKAGES = (
    "hypercorn",
    "uvicorn",
    "granian",
    "httptools",
    "quart",
    "fastapi",
    "uvloop",
    "flask",
    "gunicorn",
    "grpcio",
    "google-cloud-pubsub",
)
CEILING, GLOBAL, LOOPGATE = "quart-noop", "flask-global", "loopgate"
TUNED_CEILING, FASTAPI_PEER = "quart-noop-gc", "fastapi-peer"
# Each loopgate setup and the server it runs under.
LOOPGATES = {"loopgate": "Hypercorn", "loopgate-uvicorn": "uvicorn", "loopgate-granian": "granian"}
# The Quart no-op under the same server as a loopgate setup: the most any Quart app serves there.
CEILINGS = {"loopgate": CEILING, "loopgate-uvicorn": "quart-noop-uvicorn"}
TARGET_RATIO, TARGET_MPS, TARGET_CONNECTIONS = 0.90, 100_000, 256


@dataclass
class Conditions:
    """The machine and the options of one run."""

    started: str
    nproc: int
    cpu: str
    load_start: tuple[float, float, float]
    python: str
    versions: dict[str, str]
    wrk: str
    commit: str
    options: str
    load_end: tuple[float, float, float] = (0.0, 0.0, 0.0)
    minutes: float = 0.0
    notes: list[str] = field(default_factory=list)
    _t0: float = field(default_factory=lambda: dt.datetime.now().timestamp())

    @classmethod
    def now(cls, args: argparse.Namespace) -> Conditions:
        cpu = next(
            (
                line.split(":", 1)[1].strip()
                for line in _read("/proc/cpuinfo").splitlines()
                if line.startswith("model name")
            ),
            platform.processor() or "unknown",
        )
        versions = {}
        for name in PACKAGES:
            try:
                versions[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                versions[name] = "-"
        wrk = _output(["wrk", "--version"]).splitlines()
        return cls(
            started=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            nproc=os.cpu_count() or 0,
            cpu=cpu,
            load_start=os.getloadavg(),
            python=platform.python_version(),
            versions=versions,
            wrk=" ".join(wrk[0].split()[:2]) if wrk else "wrk",
            commit=_output(["git", "rev-parse", "--short", "HEAD"]).strip() or "-",
            options=" ".join(sys.argv[1:]) or "(defaults)",
        )

    def finish(self) -> None:
        self.load_end = os.getloadavg()
        self.minutes = (dt.datetime.now().timestamp() - self._t0) / 60

    def markdown(self) -> str:
        load = ", ".join(f"{x:.2f}" for x in self.load_start)
        load_end = ", ".join(f"{x:.2f}" for x in self.load_end)
        versions = ", ".join(f"{k} {v}" for k, v in self.versions.items())
        return (
            f"- date: {self.started}; commit {self.commit}; run took {self.minutes:.1f} min\n"
            f"- machine: nproc {self.nproc}, {self.cpu}; shared with other work\n"
            f"- load average (1, 5, 15 min): {load} at start, {load_end} at end\n"
            f"- Python {self.python}; {versions}; {self.wrk}\n"
            f"- options: `python -m bench.publish {self.options}`"
        ) + "".join(f"\n- {note}" for note in self.notes)


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _output(command: list[str]) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _pick(runs: list[Run], setup: str, connections: int, messages: int = 1) -> list[Run]:
    return [
        r
        for r in runs
        if r.setup == setup and r.connections == connections and r.messages == messages
    ]


def _per_round_ratio(top: list[Run], bottom: list[Run], metric: str = "rps") -> float | None:
    """The median over rounds of ``top``'s ``metric`` over ``bottom``'s in the same round."""
    pairs = [
        getattr(a, metric) / getattr(b, metric)
        for a, b in zip(top, bottom, strict=False)
        if getattr(b, metric) > 0
    ]
    return median(pairs) if pairs else None


def render_table(runs: list[Run], conditions: Conditions) -> str:
    """Markdown tables of medians over rounds, the targets, and the run's conditions."""
    single = sorted(
        {(r.connections, r.setup) for r in runs if r.messages == 1},
        key=lambda item: (item[0], SETUP_ORDER.get(item[1], 9)),
    )
    lines = [
        "| setup | conns | req/s | vs Quart no-op | vs Flask global | p50 ms | p99 ms | errors "
        "| server CPU ms/req | emulator CPU ms/req | req/s per round |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for connections, setup in single:
        chosen = _pick(runs, setup, connections)
        ceiling = _per_round_ratio(chosen, _pick(runs, CEILING, connections))
        versus = _per_round_ratio(chosen, _pick(runs, GLOBAL, connections))
        lines.append(
            f"| {setup} | {connections} | {median(r.rps for r in chosen):,.0f} "
            f"| {_pct(ceiling)} | {_x(versus)} "
            f"| {median(r.p50_ms for r in chosen):.1f} | {median(r.p99_ms for r in chosen):.1f} "
            f"| {sum(r.errors for r in chosen)} "
            f"| {median(_per_request(r.server_cpu, r) for r in chosen):.2f} "
            f"| {median(_per_request(r.emulator_cpu, r) for r in chosen):.2f} "
            f"| {' / '.join(f'{r.rps:,.0f}' for r in chosen)} |"
        )
    lines += _versus_peers(runs)
    batched = sorted({(r.connections, r.messages) for r in runs if r.messages > 1})
    if batched:
        lines += [
            "",
            "| loopgate, batched | conns | messages/s | req/s | p50 ms | p99 ms "
            "| errors | server CPU us/msg | emulator CPU us/msg | messages/s per round |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for connections, messages in batched:
            chosen = _pick(runs, LOOPGATE, connections, messages)
            lines.append(
                f"| {messages} msgs/request | {connections} "
                f"| {median(r.mps for r in chosen):,.0f} | {median(r.rps for r in chosen):,.0f} "
                f"| {median(r.p50_ms for r in chosen):.1f} "
                f"| {median(r.p99_ms for r in chosen):.1f} "
                f"| {sum(r.errors for r in chosen)} "
                f"| {median(_per_message(r.server_cpu, r) for r in chosen):.1f} "
                f"| {median(_per_message(r.emulator_cpu, r) for r in chosen):.1f} "
                f"| {' / '.join(f'{r.mps:,.0f}' for r in chosen)} |"
            )
    lines += ["", *_targets(runs), "", *_noise(runs), "", conditions.markdown()]
    return "\n".join(lines)


SETUP_ORDER = {
    "flask-per-request": 0,
    "flask-global": 1,
    "fastapi-peer": 2,
    "fastapi-noop": 3,
    "quart-noop": 4,
    "quart-noop-gc": 5,
    "quart-noop-uvicorn": 6,
    "loopgate": 7,
    "loopgate-uvicorn": 8,
    "loopgate-granian": 9,
}


def _versus_peers(runs: list[Run]) -> list[str]:
    """loopgate under each server against the peers a user would otherwise write, same rounds.

    Ratios are medians of per-round ratios (req/s: higher is better for loopgate; p99: lower).
    """
    ours = [key for key in LOOPGATES if any(r.setup == key for r in runs)]
    if not ours:
        return []
    labels = dict(LOOPGATES)
    if any(r.setup == CEILINGS["loopgate-uvicorn"] for r in runs):
        # The ceiling itself against the peers: what no Quart app on uvicorn can pass.
        ours.append(CEILINGS["loopgate-uvicorn"])
        labels[CEILINGS["loopgate-uvicorn"]] = "(Quart no-op, uvicorn: no publish)"
    lines = [
        "",
        "loopgate under each server against its peers, same run (ratios: medians of per-round "
        "ratios, loopgate over the peer; for p99 below 1 is better):",
        "",
        "| loopgate under | conns | req/s | p99 ms | req/s vs FastAPI peer "
        "| p99 vs FastAPI peer | req/s vs Flask global | p99 vs Flask global "
        "| req/s vs Quart no-op, same server |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for connections in sorted({r.connections for r in runs if r.messages == 1}):
        for key in ours:
            mine = _pick(runs, key, connections)
            if not mine:
                continue
            cells = []
            for peer in (FASTAPI_PEER, GLOBAL):
                theirs = _pick(runs, peer, connections)
                cells.append(_x(_per_round_ratio(mine, theirs)))
                p99 = _per_round_ratio(mine, theirs, "p99_ms")
                cells.append(
                    "-" if p99 is None else f"{_x(p99)} ({median(r.p99_ms for r in theirs):.1f} ms)"
                )
            ceiling = (
                _per_round_ratio(mine, _pick(runs, CEILINGS[key], connections))
                if key in CEILINGS
                else None
            )
            lines.append(
                f"| {labels[key]} | {connections} | {median(r.rps for r in mine):,.0f} "
                f"| {median(r.p99_ms for r in mine):.1f} | {' | '.join(cells)} | {_pct(ceiling)} |"
            )
    return lines


def _targets(runs: list[Run]) -> list[str]:
    lines = [f"Targets (loopgate at {TARGET_CONNECTIONS} connections, same run):"]
    ours = _pick(runs, LOOPGATE, TARGET_CONNECTIONS)
    ceiling = _per_round_ratio(ours, _pick(runs, CEILING, TARGET_CONNECTIONS))
    if ceiling is not None:
        lines.append(
            f"- req/s at least {TARGET_RATIO:.0%} of the no-op ceiling: "
            f"{ceiling:.0%} -> {'met' if ceiling >= TARGET_RATIO else 'NOT met'}"
        )
    tuned = _per_round_ratio(ours, _pick(runs, TUNED_CEILING, TARGET_CONNECTIONS))
    if tuned is not None:
        lines.append(
            f"  (against the no-op with loopgate's garbage-collection settings: {tuned:.0%})"
        )
    peers = _pick(runs, GLOBAL, TARGET_CONNECTIONS)
    if ours and peers:
        mine, theirs = median(r.p99_ms for r in ours), median(r.p99_ms for r in peers)
        lines.append(
            f"- p99 no worse than the global client's: {mine:.1f} ms vs {theirs:.1f} ms "
            f"-> {'met' if mine <= theirs else 'NOT met'}"
        )
    batched = [r for r in runs if r.setup == LOOPGATE and r.messages > 1]
    for size in sorted({r.messages for r in batched}):
        best = max(
            median(r.mps for r in batched if r.connections == c and r.messages == size)
            for c in {r.connections for r in batched if r.messages == size}
        )
        lines.append(
            f"- {TARGET_MPS:,} messages/s with batched requests of {size} messages: {best:,.0f} "
            f"-> {'met' if best >= TARGET_MPS else 'NOT met'}"
        )
    return lines


def _noise(runs: list[Run]) -> list[str]:
    wrk = max((r.wrk_cpu / r.seconds for r in runs), default=0.0)
    other = [r.other_cpu / r.seconds for r in runs]
    return [
        f"Load generator: wrk used at most {wrk:.0%} of one core in any run. Other processes on "
        f"the machine used {median(other) if other else 0:.2f} cores (median over runs, max "
        f"{max(other, default=0):.2f}) of {os.cpu_count()} while measuring."
    ]


def _per_request(cpu: float, run: Run) -> float:
    return 1000 * cpu / run.requests if run.requests else 0.0


def _per_message(cpu: float, run: Run) -> float:
    """Microseconds of CPU per message."""
    return 1e6 * cpu / (run.requests * run.messages) if run.requests else 0.0


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def write_results(path: Path, runs: list[Run], conditions: Conditions) -> None:
    """Replace (or add) the "Publish" section of ``path``, keeping any other section."""
    section = (
        "## Publish\n\nHTTP publish through each setup, 2 workers each, one Pub/Sub emulator, "
        "loopback only; medians over interleaved rounds (ratios are medians of per-round "
        "ratios). Written by `python -m bench.publish`.\n\n" + render_table(runs, conditions) + "\n"
    )
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(r"^## Publish\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + section
    path.write_text(text)
