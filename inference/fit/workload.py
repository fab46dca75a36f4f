"""A serving workload as a buyer states it: prompt and answer lengths, how many users at once (or a request rate)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

MAX_TOKENS = 10_000_000  # longer than any context a model in the table supports
MAX_CONCURRENCY = 1_000_000
ARRIVALS = ("closed", "burst")
SPREADS = ("fixed", "exponential")


class WorkloadError(ValueError):
    """A workload spec that cannot be read; the message names the bad part."""


@dataclass(frozen=True)
class Workload:
    """Mean prompt and answer tokens, and the load: users at once (closed loop), a burst, or a request rate."""

    input_tokens: int
    output_tokens: int
    concurrency: int | None = None
    rate_per_s: float | None = None  # requests per second; concurrency follows from it (Little's law)
    prefix_hit: float = 0.0  # fraction of prompt tokens found in the prefix cache
    # closed: each user sends the next request when the last answer is done (chat, vllm bench --max-concurrency);
    # burst: all requests arrive at once (vllm bench without a rate), so TTFT includes the wait for the others' prefill.
    arrival: str = "closed"
    # fixed: every answer has the mean length (vllm bench's random dataset); exponential: answer lengths are
    # long-tailed around the mean (chat transcripts such as ShareGPT), so a burst ends with a few long answers
    # decoded at a small batch.
    output_spread: str = "fixed"

    @property
    def context(self) -> int:
        """Return the tokens a sequence holds at the end of its answer."""
        return self.input_tokens + self.output_tokens

    def to_dict(self) -> dict:
        """Return the workload as JSON-ready values."""
        return asdict(self)

    def with_concurrency(self, concurrency: int) -> "Workload":
        """Return the same workload at another concurrency (closed loop, no rate)."""
        return Workload(self.input_tokens, self.output_tokens, concurrency, None, self.prefix_hit, self.arrival,
                        self.output_spread)


_KEYS = {"in": "input_tokens", "input": "input_tokens", "out": "output_tokens", "output": "output_tokens",
         "concurrency": "concurrency", "c": "concurrency", "users": "concurrency", "rate": "rate_per_s",
         "hit": "prefix_hit", "prefix_hit": "prefix_hit", "arrival": "arrival", "spread": "output_spread"}


def parse_workload(spec: str) -> Workload:
    """Parse 'in=1000,out=1000,concurrency=64' (also rate=R requests/s, hit=0.5, arrival=burst,
    spread=exponential) into a Workload."""
    if not spec or not spec.strip():
        raise WorkloadError("empty workload; write e.g. in=1000,out=1000,concurrency=64")
    values: dict = {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        key, sep, raw = part.partition("=")
        field = _KEYS.get(key.strip().lower())
        if not sep or field is None:
            raise WorkloadError(f"bad workload part {part!r} in {spec!r}; use in=, out=, concurrency=, rate=, hit=, arrival=, spread=")
        if field in values:
            raise WorkloadError(f"workload part {part!r} repeats {key.strip()!r} in {spec!r}")
        values[field] = _value(field, raw.strip(), part, spec)
    for needed in ("input_tokens", "output_tokens"):
        if needed not in values:
            raise WorkloadError(f"workload {spec!r} has no {'in' if needed == 'input_tokens' else 'out'}=N")
    if "concurrency" in values and "rate_per_s" in values:
        raise WorkloadError(f"workload {spec!r} gives both concurrency and rate; give one")
    if "concurrency" not in values and "rate_per_s" not in values:
        values["concurrency"] = 1
    return Workload(**values)


def _value(field: str, raw: str, part: str, spec: str):
    """Return one checked workload value."""
    try:
        if field in ("arrival", "output_spread"):
            choices = ARRIVALS if field == "arrival" else SPREADS
            match = [c for c in choices if c.startswith(raw.lower())] if raw else []
            if len(match) != 1:
                raise ValueError
            return match[0]
        if field in ("rate_per_s", "prefix_hit"):
            value = float(raw)
            ok = 0 < value <= 1e6 if field == "rate_per_s" else 0 <= value < 1
        else:
            value = int(raw)
            limit = MAX_CONCURRENCY if field == "concurrency" else MAX_TOKENS
            ok = 1 <= value <= limit
    except ValueError:
        ok = False
    if not ok:
        rules = {"input_tokens": f"a whole number of tokens from 1 to {MAX_TOKENS:,}",
                 "output_tokens": f"a whole number of tokens from 1 to {MAX_TOKENS:,}",
                 "concurrency": f"a whole number of users from 1 to {MAX_CONCURRENCY:,}",
                 "rate_per_s": "requests per second above 0", "prefix_hit": "a fraction from 0 up to (not including) 1",
                 "arrival": f"one of {', '.join(ARRIVALS)}", "output_spread": f"one of {', '.join(SPREADS)}"}
        raise WorkloadError(f"bad value in workload part {part!r} of {spec!r}: {rules[field]}")
    return value
