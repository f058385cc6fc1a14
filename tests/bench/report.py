"""Turn the bench results into goal rows (value, baseline, ratio, goal, met), a printed
table, and a PNG plot (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

__all__ = ["Row", "plot", "summarize", "table"]


@dataclass
class Row:
    metric: str
    value: Optional[float]
    unit: str
    baseline: Optional[float] = None  # the OpenSSH figure, when there is one
    ratio: Optional[float] = None
    goal: str = ""
    met: Optional[bool] = None


def _get(d: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return round(a / b, 3) if a is not None and b else None


def _throughput(r: dict[str, Any]) -> list[Row]:
    rows = []
    for path, base in (("dpanel", "openssh"), ("dpanel:aes128-gcm@openssh.com",
                                               "openssh:aes128-gcm@openssh.com"),
                       ("agent-ssh", "openssh-ssh")):
        for d in ("push", "pull"):
            v = _get(r, "paths", path, f"{d}_mbps")
            b = _get(r, "paths", base, f"{d}_mbps")
            if v is None and b is None:
                continue
            ratio = _ratio(v, b)
            rows.append(Row(f"throughput {path} {d} vs {base}", v, "MB/s", b, ratio,
                            ">= 0.8x", None if ratio is None else ratio >= 0.8))
    return rows


def _exec(r: dict[str, Any]) -> list[Row]:
    base = _get(r, "openssh_fresh", "median_s")
    rows = []
    for key, label in (("cold_cli", "cold exec (CLI)"), ("cold_api", "cold exec (API)")):
        v = _get(r, key, "median_s")
        rows.append(Row(label, v, "s", None, None, "< 1 s", None if v is None else v < 1.0))
    for key, label in (("warm_cli", "warm exec (CLI)"), ("warm_api", "warm exec (API)")):
        v = _get(r, key, "median_s")
        ratio = _ratio(v, base)
        rows.append(Row(label + " vs fresh ssh", v, "s", base, ratio, "<= 0.5x",
                        None if ratio is None else ratio <= 0.5))
    return rows


def _memory(r: dict[str, Any]) -> list[Row]:
    rows = []
    pss = _get(r, "sshd", "pss_kb_per_conn")
    rss = _get(r, "sshd", "rss_kb_per_conn")
    for n, at in (_get(r, "dpanel", "at") or {}).items():
        v = at.get("rss_kb_per_tunnel")
        for base, kind in ((pss, "PSS"), (rss, "RSS")):
            ratio = _ratio(v, base)
            rows.append(Row(f"tunnel server KB per tunnel at {n} vs sshd {kind}/conn", v, "KB",
                            base, ratio, "< 0.1x", None if ratio is None else ratio < 0.1))
    return rows


def _agent(r: dict[str, Any]) -> list[Row]:
    rows = []
    for variant in ("python", "frozen"):
        rss = _get(r, variant, "rss_kb")
        if rss is None:
            continue
        mb = round(rss / 1024, 1)
        rows.append(Row(f"agent ({variant}) idle RSS", mb, "MB", None, None, "<= 40 MB",
                        mb <= 40))
        rows.append(Row(f"agent ({variant}) sent per hour", _get(r, variant,
                                                                   "sent_bytes_per_hour"),
                        "B/h", None, None, "report"))
        rows.append(Row(f"agent ({variant}) on the wire per hour (est.)",
                        _get(r, variant, "wire_bytes_per_hour_est"), "B/h", None, None,
                        "report"))
    return rows


def _scale(r: dict[str, Any]) -> list[Row]:
    """Ratios here are against the goal (there is no OpenSSH counterpart)."""
    conn = r.get("connected_final", r.get("connected"))
    goal_a, goal_t = _get(r, "goal", "agents") or 0, _get(r, "goal", "tunnels") or 0
    rows = []
    for label, value, goal in (("scale: agents connected", conn, goal_a),
                               ("scale: agents online in manager", r.get("online_in_manager"),
                                goal_a),
                               ("scale: tunnels open", r.get("tunnels_open"), goal_t)):
        rows.append(Row(label, value, "", None, _ratio(value, goal), f">= {goal}",
                        None if value is None else value >= goal))
    return rows


def _image(r: dict[str, Any]) -> list[Row]:
    """The image helper's figures, as reported (no goals or baseline here)."""
    rows = []
    for key, value in r.items():
        if key == "seconds" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        unit = "s" if key.endswith("_s") else "MB" if key.endswith("_mb") else ""
        rows.append(Row(f"image: {key}", value, unit, goal="report"))
    return rows


def _enrol(r: dict[str, Any]) -> list[Row]:
    """Enrolments per second, per engine and path (no goal: a figure for docs/scale)."""
    return [Row(f"enrol {engine}: {how.replace('_', ' ')}", _get(r, engine, how, "per_s"),
                "/s", goal="report")
            for engine in ("sqlite", "postgresql") for how in (
                "registry_one_at_a_time", "api_one_at_a_time", "api_bulk")
            if _get(r, engine, how, "per_s") is not None]


def _api_load(r: dict[str, Any]) -> list[Row]:
    from .api_load import rows

    return list(rows(r))


def _scp(r: dict[str, Any]) -> list[Row]:
    from .scp_paths import rows

    return list(rows(r))


def _jobs(r: dict[str, Any]) -> list[Row]:
    """Parts dispatched per second (cold tunnels: each part opens its device's tunnel)."""
    if "parts_per_s" not in r:
        return []
    return [Row(f"jobs: parts per second, {r['agents']} simulated agents", r["parts_per_s"],
                "/s", goal="report")]


def _update(r: dict[str, Any]) -> list[Row]:
    from .update_link import rows

    return list(rows(r))


def _web(r: dict[str, Any]) -> list[Row]:
    from .web import rows

    return list(rows(r))


def _remote_exec(r: dict[str, Any]) -> list[Row]:
    from .remote_exec import rows

    return list(rows(r))


_SECTIONS: dict[str, Callable[[dict[str, Any]], list[Row]]] = {
    "throughput": _throughput, "scp": _scp, "exec": _exec, "remote_exec": _remote_exec,
    "api_load": _api_load, "memory": _memory,
    "agent_idle": _agent,
    "scale": _scale, "enrol": _enrol, "image": _image, "update": _update,
    "jobs": _jobs, "web": _web,
}


def summarize(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[Row] = []
    for name, fn in _SECTIONS.items():
        if isinstance(results.get(name), dict):
            rows += fn(results[name])
    return [asdict(r) for r in rows]


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def table(rows: list[dict[str, Any]]) -> str:
    head = ("metric", "value", "unit", "openssh", "ratio", "goal", "met")
    lines = [[r["metric"], _fmt(r["value"]), r["unit"], _fmt(r["baseline"]), _fmt(r["ratio"]),
              r["goal"], {True: "yes", False: "NO", None: "-"}[r["met"]]] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line) for line in lines]
    return "\n".join(out)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    fig.suptitle("dPanel Edge vs OpenSSH on " + str(_get(results, "meta", "host")))

    ax = axes[0][0]
    paths = _get(results, "throughput", "paths") or {}
    names = [n for n in paths if n != "loopback"]
    for i, d in enumerate(("push", "pull")):
        vals = [paths[n].get(f"{d}_mbps") or 0 for n in names]
        ax.bar([x + i * 0.4 for x in range(len(names))], vals, 0.4, label=d)
    ax.set_xticks([x + 0.2 for x in range(len(names))],
                  [n.replace("@openssh.com", "").replace(":", "\n") for n in names], fontsize=7)
    ax.set_ylabel("MB/s")
    ax.set_title("throughput through a reverse tunnel (median)")
    ax.legend()

    ax = axes[0][1]
    ex = results.get("exec") or {}
    keys = ["openssh_fresh", "warm_cli", "warm_api", "cold_cli", "cold_api", "cli_startup"]
    keys = [k for k in keys if _get(ex, k, "median_s") is not None]
    ax.bar(keys, [ex[k]["median_s"] for k in keys],
           color=["grey" if k.startswith(("openssh", "cli")) else "tab:blue" for k in keys])
    ax.axhline(1.0, color="red", linestyle=":", label="cold goal 1 s")
    if _get(ex, "openssh_fresh", "median_s"):
        ax.axhline(0.5 * ex["openssh_fresh"]["median_s"], color="orange", linestyle="--",
                   label="warm goal 0.5x fresh ssh")
    ax.set_ylabel("seconds")
    ax.set_title("exec latency of `true` (median)")
    ax.tick_params(axis="x", labelsize=7)
    ax.legend()

    ax = axes[1][0]
    mem = results.get("memory") or {}
    labels, vals = [], []
    for n, at in (_get(mem, "dpanel", "at") or {}).items():
        if at.get("rss_kb_per_tunnel") is not None:
            labels.append(f"dpanel\n@{n}")
            vals.append(at["rss_kb_per_tunnel"])
    for k in ("pss_kb_per_conn", "rss_kb_per_conn"):
        if _get(mem, "sshd", k) is not None:
            labels.append("sshd " + k.split("_")[0].upper())
            vals.append(mem["sshd"][k])
    ax.bar(labels, vals, color=["tab:blue" if x.startswith("dpanel") else "grey"
                                for x in labels])
    ax.set_yscale("log")
    ax.set_ylabel("KB per open tunnel (log)")
    ax.set_title("memory per tunnel")

    ax = axes[1][1]
    sc = results.get("scale") or {}
    for proc in ("stack", "broker", "sim"):
        rss = _get(sc, "steady_usage_with_tunnels", proc, "rss_kb") or _get(
            sc, "steady_usage", proc, "rss_kb")
        if rss:
            ax.bar(proc, rss / 1024)
    ax.set_ylabel("RSS MB")
    ax.set_title(f"scale: {sc.get('connected_final', sc.get('connected', '?'))} agents, "
                 f"{sc.get('tunnels_open', '?')} tunnels (stack = manager+tunnel+API)",
                 fontsize=9)
    fig.tight_layout()
    tmp = path.with_suffix(".png.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(path)
