"""Monitoring that pages: the shipped Prometheus config, alert rules and Grafana dashboard.

promtool (Debian's prometheus package, which .ci/run installs) checks the files
and runs the alerts against made-up series; every metric name that the rules
and the dashboard use is one that autopause registers. A real Prometheus
scraping a running process is in integration/test_monitoring.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client import REGISTRY
from prometheus_client.metrics_core import Metric

import consumer.metrics  # noqa: F401  (registers every metric of autopause)

from ..helpers.config import ROOT
from ..helpers.monitoring import CONFIG, DASHBOARD, GRAFANA, RULES, dashboard_queries, promtool, rules

# Metrics the main branch is adding; they may appear in the rules and the dashboard before
# they are registered. The main branch empties this list as they land.
PLANNED_METRICS: set[str] = set()
# what Grafana substitutes before a query reaches Prometheus
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "1h", "$price_per_second": "0.00003025"}


def grafana_to_promql(query: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        query = query.replace(variable, value)
    return query


_IDENTIFIER = re.compile(r"(?<![A-Za-z0-9_:])((?:autopause|rabbitmq)_[A-Za-z0-9_:]*)")


def used_metric_names() -> dict[str, set[str]]:
    """Metric names in the rules and the dashboard, by where they are used."""
    used: dict[str, set[str]] = {}
    for rule in rules():
        for name in _IDENTIFIER.findall(rule["expr"]):
            used.setdefault(name, set()).add(f"alert {rule['alert']}")
    for query in dashboard_queries():
        for name in _IDENTIFIER.findall(query):
            used.setdefault(name, set()).add("dashboard")
    return used


def exported_names(families: list[Metric]) -> set[str]:
    """Every series name a registry family can expose, samples or not (labelled metrics start empty)."""
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("_sum", "_count", "_created", ""),
        "info": ("_info",),
    }
    names = set()
    for family in families:
        names |= {family.name + suffix for suffix in suffixes.get(family.type, ("",))}
        names |= {sample.name for sample in family.samples}
    return names


# -- the files --------------------------------------------------------------------------------


def test_promtool_accepts_the_rules_and_the_config() -> None:
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rules())} rules found" in checked.stdout
    checked = promtool("check", "config", str(CONFIG))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_every_alert_says_what_and_how_urgent() -> None:
    names = [rule["alert"] for rule in rules()]
    assert len(names) == len(set(names))
    for rule in rules():
        assert rule["labels"]["severity"] in ("page", "ticket"), rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert len(rule["annotations"]["description"]) > 40, rule["alert"]


def test_the_dashboard_queries_parse_as_promql(tmp_path: Path) -> None:
    as_rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": grafana_to_promql(query)}
                    for i, query in enumerate(dashboard_queries())
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(as_rules))
    checked = promtool("check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_every_autopause_metric_used_is_registered() -> None:
    exported = exported_names(list(REGISTRY.collect()))
    used = {name: where for name, where in used_metric_names().items() if name.startswith("autopause_")}
    missing = {name: sorted(where) for name, where in used.items() if name not in exported | PLANNED_METRICS}
    assert not missing, f"used but not registered by autopause: {missing}"
    landed = PLANNED_METRICS & exported
    assert not landed, f"registered now, take them out of PLANNED_METRICS: {sorted(landed)}"
    assert "autopause_paused_in_use_total" in used


def test_the_dashboard_shows_what_operators_ask_for() -> None:
    queries = " ".join(dashboard_queries())
    for needed in (
        'to_state="PAUSED"',  # pauses
        'reason="resumed"',  # resumes
        "autopause_paused_in_use_total",
        'autopause_sessions{state="PAUSED"}',  # savings
        "autopause_events_ingested_total",
        "autopause_ingest_lag_seconds_bucket",
        "autopause_queue_messages",
        "autopause_tick_seconds_bucket",
        "autopause_ticks_total",  # ticks and skips
        "autopause_e2b_call_seconds_bucket",
        "autopause_pause_calls_total",  # errors and 429s
    ):
        assert needed in queries, needed


def test_grafana_provisions_the_datasource_and_the_dashboard() -> None:
    (source,) = yaml.safe_load((GRAFANA / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    board = json.loads(DASHBOARD.read_text())
    uids = {target["datasource"]["uid"] for panel in board["panels"] for target in panel.get("targets", [])}
    assert uids == {source["uid"]}
    (provider,) = yaml.safe_load((GRAFANA / "dashboards" / "autopause.yml").read_text())["providers"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    grafana_mounts = {v.split(":")[1]: v.split(":")[0] for v in compose["services"]["grafana"]["volumes"]}
    assert grafana_mounts[provider["options"]["path"]] == "./deploy/grafana/dashboards"
    assert grafana_mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"


# -- the alerts, against made-up series --------------------------------------------------------

# (alert, input series {series: values}, eval time, the labels of each alert expected to fire)
ALERT_CASES: list[tuple[str, dict[str, str], str, list[dict[str, str]]]] = [
    ("AutopausePausedInUse", {'autopause_paused_in_use_total{instance="w"}': "0 0 1+0x30"}, "5m", [{}]),
    ("AutopausePausedInUse", {'autopause_paused_in_use_total{instance="w"}': "0 0 1+0x30"}, "20m", []),
    ("AutopausePausedInUse", {'autopause_paused_in_use_total{instance="w"}': "0+0x30"}, "20m", []),
    (
        "AutopauseNoSuccessfulTick",
        {"autopause_last_successful_tick_timestamp_seconds": "0+60x3 180+0x20"},
        "10m",
        [{}],
    ),
    (
        "AutopauseNoSuccessfulTick",
        {"autopause_last_successful_tick_timestamp_seconds": "0+60x20"},
        "10m",
        [],
    ),
    ("AutopauseKillSwitchLeftOn", {"autopause_auto_pause_enabled": "0+0x1500"}, "23h", []),
    ("AutopauseKillSwitchLeftOn", {"autopause_auto_pause_enabled": "0+0x1500"}, "24h5m", [{}]),
    ("AutopauseKillSwitchLeftOn", {"autopause_auto_pause_enabled": "1+0x1500"}, "24h5m", []),
    (
        "AutopauseIngestNotConsuming",
        {'autopause_queue_consumers{queue="autopause.events"}': "2 2 0+0x10"},
        "8m",
        [{"queue": "autopause.events"}],
    ),
    (
        "AutopauseIngestNotConsuming",
        {'autopause_queue_consumers{queue="autopause.events"}': "2+0x10"},
        "8m",
        [],
    ),
    (
        "AutopauseIngestStale",
        {"autopause_ingest_watermark_lag_seconds": "10 10 400+60x20"},
        "10m",
        [{}],
    ),
    (
        "AutopauseDeadLettersGrowing",
        {'autopause_queue_messages{queue="autopause.events.dlq"}': "0 0 0 1+1x40"},
        "20m",
        [{"queue": "autopause.events.dlq"}],
    ),
    (
        "AutopauseDeadLettersGrowing",
        {'autopause_queue_messages{queue="autopause.events.dlq"}': "5+0x40"},
        "20m",
        [],
    ),
    (
        "AutopausePauseFailures",
        {
            'autopause_pause_calls_total{outcome="paused"}': "0+60x60",
            'autopause_pause_calls_total{outcome="retryable"}': "0+30x60",
        },
        "30m",
        [{}],
    ),
    (
        "AutopausePauseFailures",
        {
            'autopause_pause_calls_total{outcome="paused"}': "0+60x60",
            'autopause_pause_calls_total{outcome="retryable"}': "0+1x60",
        },
        "30m",
        [],
    ),
    (
        "AutopauseQueueNearlyFull",
        {
            'autopause_queue_messages{queue="autopause.events"}': "900000+0x20",
            'autopause_queue_limit{queue="autopause.events"}': "1000000+0x20",
        },
        "10m",
        [{"queue": "autopause.events"}],
    ),
    (
        "AutopauseIngestDown",
        {'up{job="autopause", role="ingest", instance="a"}': "1 1 0+0x10"},
        "8m",
        [{}],
    ),
    (
        "AutopauseIngestDown",
        {'up{job="autopause", role="ingest", instance="a"}': "1+0x10"},
        "8m",
        [],
    ),
]


def test_the_alerts_fire_on_their_conditions_and_stay_quiet_otherwise(tmp_path: Path) -> None:
    # annotations are checked above; without them promtool compares the labels alone
    loaded = yaml.safe_load(RULES.read_text())
    for group in loaded["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(loaded))
    severity = {rule["alert"]: rule["labels"]["severity"] for rule in rules()}
    tests = []
    for alert, series, at, firing in ALERT_CASES:
        tests.append(
            {
                "interval": "1m",
                "input_series": [{"series": name, "values": values} for name, values in series.items()],
                "alert_rule_test": [
                    {
                        "eval_time": at,
                        "alertname": alert,
                        "exp_alerts": [
                            {"exp_labels": {"severity": severity[alert], **labels}} for labels in firing
                        ],
                    }
                ],
            }
        )
    spec = {"rule_files": ["alerts.yml"], "evaluation_interval": "1m", "tests": tests}
    (tmp_path / "alerts_test.yml").write_text(yaml.safe_dump(spec))
    checked = promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert {alert for alert, *_ in ALERT_CASES} >= {
        "AutopausePausedInUse",
        "AutopauseNoSuccessfulTick",
        "AutopauseKillSwitchLeftOn",
        "AutopauseIngestNotConsuming",
        "AutopauseDeadLettersGrowing",
        "AutopausePauseFailures",
        "AutopauseQueueNearlyFull",
    }
