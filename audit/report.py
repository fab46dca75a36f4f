"""Gather the figures of the auditor's report from the exported events and checkpoints."""
from collections import Counter, defaultdict
from datetime import datetime, timezone


def _utc(seconds: int) -> str:
    """Return Unix seconds as a readable UTC time."""
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def build_report(manifest: dict, events: list[dict], checkpoints: list, status: str, generated: datetime) -> dict:
    """Return the report's figures: requests, tokens, egress, attestations, checkpoints, status."""
    per_team, per_model, per_day = Counter(), Counter(), defaultdict(Counter)
    tokens = defaultdict(lambda: [0, 0])
    failures, blocked, attestations, actions = Counter(), [], [], Counter()
    for event in events:
        actions[event["action"]] += 1
        details = event.get("details") or {}
        if event["action"] == "chat.completion":
            team = event["actor"].removeprefix("team:")
            model = details.get("model") or event["target"]
            per_team[team] += 1
            per_model[model] += 1
            per_day[event["time"][:10]][team] += 1
            tokens[team][0] += int(details.get("prompt_tokens") or 0)
            tokens[team][1] += int(details.get("completion_tokens") or 0)
            if event["outcome"] != "ok":
                failures[team] += 1
        elif event["action"] == "egress.blocked":
            blocked.append({"seq": event["seq"], "time": event["time"], "destination": event["target"],
                            "process": details.get("process", ""), "caller": details.get("caller", "")})
        elif event["action"] == "network.attestation":
            snap = details.get("snapshot") or {}
            attestations.append({"seq": event["seq"], "time": event["time"], "outcome": event["outcome"],
                                 "outside": snap.get("established_outside_allowlist"),
                                 "listening": len(snap.get("listening") or [])})
    gaps = [b.time - a.time for a, b in zip(checkpoints, checkpoints[1:])]
    return {
        "title": "Audit report",
        "generated": generated.strftime("%Y-%m-%d %H:%M:%S UTC"),
        "period": (manifest["since_iso"], manifest["until_iso"]),
        "origin": manifest["origin"], "fingerprint": manifest["key_fingerprint"],
        "export_time": _utc(manifest["export_time"]),
        "seq_range": (manifest["first_seq"], manifest["last_seq"]), "events": len(events),
        "actions": sorted(actions.items(), key=lambda kv: (-kv[1], kv[0])),
        "per_team": sorted(per_team.items(), key=lambda kv: (-kv[1], kv[0])),
        "per_model": sorted(per_model.items(), key=lambda kv: (-kv[1], kv[0])),
        "per_day": {day: dict(teams) for day, teams in sorted(per_day.items())},
        "tokens": {team: tuple(t) for team, t in sorted(tokens.items())},
        "failures": dict(failures),
        "blocked": blocked,
        "attestations": attestations,
        "attestation_alerts": sum(1 for a in attestations if a["outcome"] != "ok"),
        "checkpoints": {
            "count": len(checkpoints),
            "first": (checkpoints[0].size, _utc(checkpoints[0].time)) if checkpoints else None,
            "last": (checkpoints[-1].size, _utc(checkpoints[-1].time)) if checkpoints else None,
            "longest_gap_s": max(gaps, default=0), "max_gap_s": manifest["max_gap_s"],
        },
        "status": status,
    }
