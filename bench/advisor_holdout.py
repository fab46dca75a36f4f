"""Print the throughput model's error on every published point, the held-out ones apart: the honest figure.

    python bench/advisor_holdout.py            # errors under the stored factors (inference/fit/calibration/fitted.json)
    python bench/advisor_holdout.py --refit    # fit again from points.json and compare with the stored factors
    python bench/advisor_holdout.py --write    # fit again and store the result

Held-out points are never used to fit; the done-when of the advisor is that each lands within +-35%.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from inference.fit import calibration  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--refit", action="store_true", help="fit the factors again and show them next to the stored ones")
    parser.add_argument("--write", action="store_true", help="fit again and write calibration/fitted.json")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    profiles = calibration.load_profiles()
    fitted = None
    if args.refit or args.write:
        fitted = calibration.fit_all(profiles)
        stored = calibration.load_fitted() if calibration.FITTED_FILE.exists() else {}
        for engine, classes in fitted.items():
            for cls, entry in classes.items():
                old = stored.get(engine, {}).get(cls, {})
                print(f"{engine}/{cls}: " + ", ".join(f"{k} {entry[k]:g} (stored {old.get(k, '-')})"
                                                     for k in (*calibration.FACTORS, "uncertainty")))
        if args.write:
            calibration.FITTED_FILE.write_text(json.dumps(fitted, indent=1) + "\n", encoding="utf-8")
            print(f"written {calibration.FITTED_FILE.relative_to(ROOT)}")
    rows = calibration.evaluate(profiles, fitted)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'point':36} {'role':8} {'in/out x users':>18} {'measured':>9} {'predicted':>9} {'error':>7} "
          f"{'±stated':>7}  bound")
    for r in rows:
        w = r["workload"]
        shape = f"{w['input_tokens']}/{w['output_tokens']} x{w['concurrency']}"
        print(f"{r['id']:36} {r['role']:8} {shape:>18} {r['measured']['output_tokens_per_s']:9.1f} "
              f"{r['predicted']['output_tokens_per_s']:9.1f} {r['error']:+7.1%} {r['uncertainty']:7.0%}  {r['bound']}")
    held = [r for r in rows if r["role"] == "held_out"]
    worst = max(abs(r["error"]) for r in held)
    mean = sum(abs(r["error"]) for r in held) / len(held)
    print(f"held-out: {len(held)} points, mean |error| {mean:.1%}, worst {worst:.1%} "
          f"(done when every one is within ±{calibration.DONE_WHEN:.0%}: {'yes' if worst <= calibration.DONE_WHEN else 'NO'})")
    return 0 if worst <= calibration.DONE_WHEN else 1


if __name__ == "__main__":
    sys.exit(main())
