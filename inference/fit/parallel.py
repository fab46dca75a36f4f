"""Parallel plans: how a deployment splits a model over its GPUs ('tp8', 'tp8-dpattn', 'dp8-ep8', 'ep72', 'dp4-tp2').

A plan says, for one copy of the model (a replica), how attention and the experts are split:
- tpN: tensor parallel over N GPUs, attention and MLP alike (vLLM's and SGLang's default);
- tpN-dpattn: SGLang's --enable-dp-attention: each GPU runs attention for its own sequences, the MoE is TP;
- dpN-epN / epN: data-parallel attention and expert parallelism over N GPUs, possibly over several boxes;
- dpR-tpT: R independent replicas of tpT (a dense model that fits on fewer GPUs than the box has);
- any of them with -offload: routed experts live and run in host RAM (KTransformers-style).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass


class PlanError(ValueError):
    """A plan that cannot be read or does not match the hardware; the message names the bad part."""


@dataclass(frozen=True)
class Plan:
    """One parallel layout; gpus = replicas x replica_gpus."""

    label: str
    replica_gpus: int  # GPUs one copy of the weights is split over
    replicas: int = 1
    attention_dp: int = 1  # attention groups inside a replica, each decoding its own sequences
    experts: str = "tp"  # "tp": every expert split over the replica's GPUs; "ep": whole experts per GPU
    offload: bool = False

    @property
    def gpus(self) -> int:
        """Return every GPU the plan uses."""
        return self.replicas * self.replica_gpus

    @property
    def attention_tp(self) -> int:
        """Return the GPUs one attention group is split over."""
        return self.replica_gpus // self.attention_dp

    def to_dict(self) -> dict:
        """Return the plan as JSON-ready values."""
        return {**asdict(self), "gpus": self.gpus}


_PART = re.compile(r"^(tp|dp|ep)(\d+)$|^(dpattn|offload)$")


def parse_plan(text: str, gpus: int) -> Plan:
    """Return the plan `text` names for a deployment of `gpus` GPUs, or raise PlanError naming what is wrong."""
    label = (text or "").strip().lower()
    if not label:
        raise PlanError("empty plan; write e.g. tp8, tp8-dpattn, dp8-ep8, ep16 or dp4-tp2")
    degrees: dict[str, int] = {}
    flags: set[str] = set()
    for part in label.split("-"):
        match = _PART.match(part)
        if not match:
            raise PlanError(f"bad plan part {part!r} in {text!r}; use tpN, dpN, epN, dpattn or offload")
        if match.group(3):
            flags.add(match.group(3))
            continue
        kind, n = match.group(1), int(match.group(2))
        if n < 1 or kind in degrees:
            raise PlanError(f"plan part {part!r} in {text!r} is zero or repeated")
        degrees[kind] = n
    plan = _assemble(label, degrees, flags, text)
    if gpus and plan.gpus != gpus:
        raise PlanError(f"plan {text!r} uses {plan.gpus} GPUs but the hardware has {gpus}")
    if not gpus and plan.gpus != 1:
        raise PlanError(f"plan {text!r} splits over {plan.gpus} GPUs but the hardware has none (CPU only)")
    return plan


def _assemble(label: str, degrees: dict[str, int], flags: set[str], text: str) -> Plan:
    """Return the Plan for parsed parts."""
    tp, dp, ep = degrees.get("tp"), degrees.get("dp"), degrees.get("ep")
    offload = "offload" in flags
    if ep:
        if tp or (dp and dp != ep) or "dpattn" in flags:
            raise PlanError(f"plan {text!r}: expert parallelism runs attention data-parallel over the same GPUs; "
                            f"write ep{ep} or dp{ep}-ep{ep}")
        return Plan(label, ep, 1, ep, "ep", offload)
    if "dpattn" in flags:
        if not tp or dp:
            raise PlanError(f"plan {text!r}: dpattn goes with tpN (e.g. tp8-dpattn)")
        return Plan(label, tp, 1, tp, "tp", offload)
    if tp and dp:
        return Plan(label, tp, dp, 1, "tp", offload)  # dp replicas of tp
    if dp:
        return Plan(label, 1, dp, 1, "tp", offload)
    return Plan(label, tp or 1, 1, 1, "tp", offload)


def default_plan(engine: str, gpus: int, moe: bool, latent_kv: bool, offload: bool = False) -> Plan:
    """Return the plan an engine runs a model with when none is named."""
    gpus = max(1, gpus)  # a CPU-only box runs one copy on the host
    suffix = "-offload" if offload else ""
    if engine == "sglang" and moe and latent_kv and gpus > 1 and not offload:
        # GPUStack's performance lab found --enable-dp-attention the best SGLang setting for DeepSeek-R1 on 8xH200.
        return parse_plan(f"tp{gpus}-dpattn", gpus)
    if gpus == 1:
        return parse_plan("tp1" + suffix, 1)
    return parse_plan(f"tp{gpus}{suffix}", gpus)
