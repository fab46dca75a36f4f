"""Schemathesis against a live web process: no 5xx and no response that breaks /v1/openapi.json."""
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

# What the API or the importer makes of a request, not what the database or broker can change: CI runs it once.
pytestmark = [pytest.mark.e2e, pytest.mark.backend_neutral]
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_headers_conformance,response_schema_conformance")


@pytest.fixture(scope="module")
def fuzz_key(box):
    box.manage("import_model", str(box.demo_dir / "demo-dense"), "--name", "fuzz-dense", "--kind", "dense", "--wait")
    box.manage("deploy", "fuzz-dense", "--wait")
    return box.new_key("fuzzers")


def test_the_schema_is_served_and_names_the_loaded_variant(box, fuzz_key):
    doc = httpx.get(f"{box.url}/v1/openapi.json").json()
    assert "fuzz-dense" in doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]["model"]["examples"]


def test_schemathesis_finds_no_server_error_and_no_schema_violation(box, fuzz_key, tmp_path):
    cli = Path(sys.executable).with_name("schemathesis")
    result = subprocess.run(
        [str(cli), "run", f"{box.url}/v1/openapi.json", "--url", f"{box.url}/v1", "--checks", CHECKS,
         "-H", f"Authorization: Bearer {fuzz_key}", "--max-examples", "40", "--seed", "20240601",
         "--workers", "1", "--request-timeout", "120", "--phases", "examples,coverage,fuzzing",
         "--output-sanitize", "false", "--report", "junit", "--report-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=1200, cwd=tmp_path)  # its example cache stays out of the repo
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
