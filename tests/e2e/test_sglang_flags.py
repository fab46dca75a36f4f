"""SGLang's own parser on the fit plan's command lines (tests marked sglang: `pytest -m sglang`, CI's external-engine
step). SGLang's PyPI build is CUDA-only, so on this CPU its integration is tested as far as its argument parser:
bench/peers_setup.sh sglang installs SGLang without its CUDA dependencies, beside a CPU torch, for this."""
import os
from pathlib import Path

import pytest

from appliance.engine_plan import check_flags, launch_plan
from inference.fit.engine_flags import NodeLaunch

pytestmark = pytest.mark.sglang
DEFAULT_PYTHON = Path(os.environ.get("BENCH_PEERS_HOME", "/work/.cache/bench")) / "sglang-venv" / "bin" / "python"


@pytest.fixture
def sglang(settings):
    python = os.environ.get("APPLIANCE_SGLANG_PYTHON") or str(DEFAULT_PYTHON)
    if not os.access(python, os.X_OK):
        pytest.fail(f"the SGLang tests need SGLang's parser: {python} is missing (bash bench/peers_setup.sh sglang, "
                    "or set APPLIANCE_SGLANG_PYTHON)")
    settings.SGLANG_PYTHON = python


@pytest.mark.parametrize("plan,hardware", [("ep16", "2x8xH200"), ("tp8-dpattn", "8xH200"), ("dp4-tp2", "8xH200"),
                                           ("tp16", "2x8xH100")])
def test_sglangs_own_parser_takes_every_nodes_command_of_a_plan(sglang, plan, hardware):
    planned = launch_plan("sglang", hardware, plan, 8192, "bf16", head="10.0.0.1")
    assert check_flags("sglang", planned.launches, "/models/r1") == ["ok"] * len(planned.launches)


def test_sglangs_own_parser_refuses_a_bad_flag_naming_it(sglang):
    bad = [NodeLaunch(0, ("--tp-size", "two"), "sglang"), NodeLaunch(0, ("--no-such-flag",), "sglang"),
           NodeLaunch(0, ("--kv-cache-dtype", "fp8"), "sglang")]
    verdicts = check_flags("sglang", bad, "/models/r1")
    assert "--tp-size" in verdicts[0] and "invalid int value" in verdicts[0]
    assert "unrecognized arguments: --no-such-flag" in verdicts[1]
    assert "--kv-cache-dtype" in verdicts[2] and "invalid choice" in verdicts[2]


def test_fit_says_sglangs_parser_accepts_the_plan(sglang, capsys):
    from django.core.management import call_command

    call_command("fit", "/models/r1", "--engine-flags", "--engine", "sglang", "--plan", "ep16", "--hardware",
                 "2x8xH200", "--head-address", "10.0.0.1")
    assert "SGLang's own parser accepts every command line" in capsys.readouterr().out
