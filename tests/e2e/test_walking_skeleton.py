"""One user path through real processes: import through the worker, deploy, chat with the openai client."""
import json
import shutil

import httpx
import openai
import pytest

from tests.livebox import read_stream

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def key(box):
    return box.new_key("research")


@pytest.fixture(scope="module")
def dense(box):
    box.manage("import_model", str(box.demo_dir / "demo-dense"), "--name", "demo-dense", "--kind", "dense", "--wait")
    box.manage("deploy", "demo-dense", "--wait")
    return "demo-dense"


def client(box, key) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{box.url}/v1", api_key=key, max_retries=0, timeout=60)


def test_chat_completion_through_the_official_client(box, key, dense):
    reply = client(box, key).chat.completions.create(
        model=dense, messages=[{"role": "user", "content": "How many experts work per token?"}],
        max_tokens=12, temperature=0)
    assert reply.object == "chat.completion"
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens >= 1
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streaming_matches_the_non_streaming_answer(box, key, dense):
    messages = [{"role": "user", "content": "Describe the audit ledger."}]
    whole = client(box, key).chat.completions.create(model=dense, messages=messages, max_tokens=16, temperature=0)
    stream = client(box, key).chat.completions.create(
        model=dense, messages=messages, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True})
    text, usage, finish = read_stream(stream)
    assert text == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_models_lists_the_ready_variants(box, key, dense):
    ids = [m.id for m in client(box, key).models.list()]
    assert dense in ids


def test_the_chat_api_is_served_without_the_consoles_middleware(box, key):
    api = httpx.get(f"{box.url}/v1/models", headers={"Authorization": f"Bearer {key}"})
    console = httpx.get(f"{box.url}/admin/login/")
    assert api.status_code == 200 and "x-frame-options" not in api.headers  # no console middleware ran
    assert api.headers["x-content-type-options"] == "nosniff"  # Django's security middleware did
    assert console.status_code == 200 and console.headers["x-frame-options"] == "DENY"
    assert httpx.get(f"{box.url}/v1/no-such-route").status_code == 404


def test_missing_or_wrong_key_is_401(box, dense):
    with pytest.raises(openai.AuthenticationError):
        client(box, "sk-box-not-a-key").chat.completions.create(
            model=dense, messages=[{"role": "user", "content": "hi"}])
    response = httpx.post(f"{box.url}/v1/chat/completions", json={})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


def test_unknown_model_is_404(box, key, dense):
    with pytest.raises(openai.NotFoundError) as info:
        client(box, key).chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert "no-such-model" in str(info.value)


def test_malformed_json_is_400(box, key, dense):
    response = httpx.post(f"{box.url}/v1/chat/completions", content=b"{not json",
                          headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]["message"]


def test_invalid_parameter_is_400_naming_it(box, key, dense):
    with pytest.raises(openai.BadRequestError) as info:
        client(box, key).chat.completions.create(
            model=dense, messages=[{"role": "user", "content": "hi"}], temperature=7)
    assert info.value.body["param"] == "temperature"


def test_undeployed_variant_is_503(box, key):
    box.manage("import_model", str(box.demo_dir / "demo-distilled"), "--name", "idle-distilled",
               "--kind", "distilled", "--wait")
    response = httpx.post(f"{box.url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                          json={"model": "idle-distilled", "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 503
    assert "not loaded" in response.json()["error"]["message"]


@pytest.mark.parametrize("name,kind", [("demo-moe", "moe"), ("demo-distilled", "distilled")])
def test_every_demo_variant_serves_chat(box, key, name, kind):
    box.manage("import_model", str(box.demo_dir / name), "--name", name, "--kind", kind, "--wait")
    box.manage("deploy", name, "--wait")
    reply = client(box, key).chat.completions.create(
        model=name, messages=[{"role": "user", "content": "hello"}], max_tokens=8, temperature=0)
    assert reply.usage.completion_tokens >= 1


def test_undeploy_unloads(box, key):
    box.manage("import_model", str(box.demo_dir / "demo-dense"), "--name", "short-lived", "--kind", "dense", "--wait")
    box.manage("deploy", "short-lived", "--wait")
    box.manage("undeploy", "short-lived")
    body = {"model": "short-lived", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for _ in range(100):
        response = httpx.post(f"{box.url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, json=body)
        if response.status_code == 503:
            break
        import time
        time.sleep(0.2)
    assert response.status_code == 503


@pytest.mark.parametrize("spoil,message", [
    (lambda d: (d / "config.json").unlink(), "no config.json"),
    (lambda d: (d / "pytorch_model.bin").write_bytes(b"\x80\x04pickle"), "pickle"),
    (lambda d: (d / "config.json").write_text(json.dumps(
        {**json.loads((d / "config.json").read_text()), "auto_map": {"AutoModel": "x.Y"}})), "remote code"),
    (lambda d: [p.unlink() for p in d.glob("*.safetensors")], "no *.safetensors"),
])
def test_import_refuses_bad_directories(box, tmp_path, spoil, message):
    source = tmp_path / "candidate"
    shutil.copytree(box.demo_dir / "demo-dense", source)
    spoil(source)
    name = f"bad-{abs(hash(message)) % 10**6}"
    result = box.manage("import_model", str(source), "--name", name, "--kind", "dense", "--wait", check=False)
    assert result.returncode != 0
    assert message in result.stderr
    assert "failed" in result.stderr
    assert not (box.home / "models" / name).exists()


def test_tampered_variant_is_quarantined_not_loaded(box, key):
    box.manage("import_model", str(box.demo_dir / "demo-dense"), "--name", "tampered", "--kind", "dense", "--wait")
    weights = next((box.home / "models" / "tampered").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    result = box.manage("deploy", "tampered", "--wait", check=False)
    assert result.returncode != 0
    assert "has changed" in result.stderr
    shown = box.manage("shell", "--no-imports", "-c", "from appliance.models import ModelVariant as V; "
                       "print(V.objects.get(name='tampered').status)").stdout.strip()
    assert shown == "quarantined"


def test_audit_chain_verifies_and_records_without_text(box, key, dense):
    secret = "the quarterly numbers are confidential"
    client(box, key).chat.completions.create(model=dense, messages=[{"role": "user", "content": secret}],
                                             max_tokens=4)
    box.manage("audit_verify")
    dump = box.manage("shell", "--no-imports", "-c", "from audit.models import AuditEvent as E; "
                      "print('\\n'.join(f'{e.action} {e.outcome}' for e in E.objects.order_by('seq')))").stdout
    assert "chat.completion ok" in dump
    assert "variant.import ok" in dump
    assert "deployment.load ok" in dump
    assert "auth.failed denied" in dump
    bodies = box.manage("shell", "--no-imports", "-c", "from audit.models import AuditEvent as E; "
                        "print(b''.join(bytes(e.body) if not isinstance(e.body, str) else e.body.encode() "
                        "for e in E.objects.all()).decode())").stdout
    assert secret not in bodies


def test_audit_verify_fails_after_a_row_is_edited_in_the_database(box, key, dense):
    box.manage("audit_verify")
    refused = box.manage("shell", "--no-imports", "-c",
                         "from django.db import connection\n"
                         "try:\n"
                         "    connection.cursor().execute(\"UPDATE audit_auditevent SET outcome='ok' WHERE seq=2\")\n"
                         "except Exception as exc:\n"
                         "    print('refused:', exc)", check=False)
    assert "append-only" in refused.stdout  # the database itself refuses the edit
    original = box.manage("shell", "--no-imports", "-c", "from audit.models import AuditEvent as E; "
                          "print(E.objects.get(seq=2).target)").stdout.strip()
    # An attacker with the database owner's rights lifts the trigger and edits a row.
    edit = "from tests.audit.tamper import edit\nedit(2, target={!r})"
    box.manage("shell", "--no-imports", "-c", edit.format("someone-else"))
    try:
        result = box.manage("audit_verify", check=False)
        assert result.returncode == 1
        assert "event 2" in result.stderr
    finally:
        # Put the row back so the shared box's ledger verifies for later tests.
        box.manage("shell", "--no-imports", "-c", edit.format(original))
    box.manage("audit_verify")
