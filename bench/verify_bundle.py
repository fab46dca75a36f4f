"""Measure verify.py's speed on synthetic bundles, up to a 1,000,000-event one.

    .venv/bin/python bench/verify_bundle.py [--sizes 100000 1000000]

Builds each bundle exactly as the box would (canonical events chained by hash, heartbeat
checkpoints signed by a fresh Ed25519 key, consistency proofs), without a database, then times
`python3 verify.py BUNDLE --pubkey-fingerprint FP` as an auditor would run it.
"""
import argparse
import base64
import json
import subprocess
import sys
import tempfile
import time
import zipfile
from hashlib import sha256
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat  # noqa: E402

from audit.merkle import MerkleTree  # noqa: E402
from audit.verifier import GENESIS_HASH, canonical, fingerprint, format_checkpoint_body, key_id  # noqa: E402

ORIGIN = "bench.example/llm-appliance/audit"
TEAMS = ["research", "sales", "legal", "finance"]


def build(path: Path, count: int, per_checkpoint: int = 5000) -> str:
    """Write a bundle of count events with a checkpoint every per_checkpoint events; return the key's fingerprint."""
    private = Ed25519PrivateKey.generate()
    public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    start, lines, leaves, prev = 1_700_000_000, [], [], GENESIS_HASH
    notes, sizes = [], []
    for seq in range(1, count + 1):
        body = canonical({
            "seq": seq, "time": f"2024-01-01T00:00:{seq % 60:02d}.000000Z", "actor": f"team:{TEAMS[seq % 4]}",
            "action": "chat.completion", "target": "demo-dense", "outcome": "ok", "prev_hash": prev,
            "details": {"key": "ab12cd", "model": "demo-dense", "prompt_tokens": 200 + seq % 50,
                        "completion_tokens": 100, "prompt_digest": "hmac-sha256:" + "ab" * 32,
                        "completion_digest": "hmac-sha256:" + "cd" * 32, "finish_reason": "stop",
                        "duration_ms": 700}})
        lines.append(body)
        leaves.append(sha256(b"\x00" + body).digest())
        prev = sha256(body).hexdigest()
    tree = MerkleTree(leaves)
    for index, size in enumerate(list(range(per_checkpoint, count, per_checkpoint)) + [count]):
        text = format_checkpoint_body(ORIGIN, size, tree.root(size), start + 60 * index)
        blob = key_id(ORIGIN, public) + private.sign(text.encode())
        notes.append(f"{text}\n\u2014 {ORIGIN} {base64.b64encode(blob).decode()}\n")
        sizes.append(size)
    sizes = [0] + sizes
    proofs = [{"from": a, "to": b, "hashes": [h.hex() for h in tree.consistency_proof(a, b)]}
              for a, b in zip(sizes, sizes[1:])]
    end = start + 60 * (len(notes) - 1)
    manifest = canonical({"format": "llm-appliance-audit-export/1", "origin": ORIGIN,
                          "key_fingerprint": fingerprint(public), "export_time": end, "since": start,
                          "until": end, "since_iso": "", "until_iso": "", "first_seq": 1, "last_seq": count,
                          "prev_hash": GENESIS_HASH, "tree_size": count, "heartbeat_s": 60, "max_gap_s": 180})
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
        bundle.writestr("manifest.json", manifest)
        bundle.writestr("manifest.sig", json.dumps({"fingerprint": fingerprint(public),
                                                    "signature": base64.b64encode(private.sign(manifest)).decode()}))
        bundle.writestr("keys.json", json.dumps({"keys": [{"name": ORIGIN, "public_key": base64.b64encode(public).decode()}],
                                                 "rotations": []}))
        bundle.writestr("checkpoints.json", json.dumps(notes))
        bundle.writestr("proofs.json", json.dumps(proofs))
        bundle.writestr("frontier.json", json.dumps({"size": 0, "hashes": []}))
        bundle.writestr("events.jsonl", b"".join(line + b"\n" for line in lines))
        bundle.writestr("verify.py", (ROOT / "audit" / "verifier.py").read_bytes())
    return fingerprint(public)


def main() -> None:
    """Build each bundle, verify it with verify.py in a fresh interpreter, and print events/s."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-verify-"))
    verifier = work / "verify.py"
    verifier.write_bytes((ROOT / "audit" / "verifier.py").read_bytes())
    for count in args.sizes:
        path = work / f"bundle-{count}.zip"
        started = time.perf_counter()
        fp = build(path, count)
        built = time.perf_counter() - started
        started = time.perf_counter()
        run = subprocess.run([sys.executable, "-I", str(verifier), str(path), "--pubkey-fingerprint", fp],
                             cwd=work, capture_output=True, text=True)
        elapsed = time.perf_counter() - started
        size_mb = path.stat().st_size / 1e6
        print(f"{count:>9,} events ({size_mb:.0f} MB zip, built in {built:.0f} s): verify.py {elapsed:.1f} s, "
              f"{count / elapsed:,.0f} events/s, exit {run.returncode}: {run.stdout.strip()[:60]}")


if __name__ == "__main__":
    main()
