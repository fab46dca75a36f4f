"""An administrator's first hour, in a real browser: sign in, import, deploy, team and key, chat, usage, ledger.

The tests run in order and share one signed-in page.
"""
import httpx
import pytest
from playwright.sync_api import expect

pytestmark = [pytest.mark.browser, pytest.mark.e2e]
VARIANT = "browser-dense"
TEAM = "browser-team"
SLOW = 180_000  # ms: import and load run on the CPU of a small CI machine


def act_on(page, row_text: str, action: str) -> None:
    """Tick the changelist row naming row_text and run an admin action on it."""
    page.locator("#result_list tr", has=page.get_by_role("link", name=row_text, exact=True)) \
        .locator("input.action-select").check()
    page.select_option("select[name=action]", action)
    page.click("button[name=index]")


def test_sign_in_shows_the_dashboard(page, console_admin, shot):
    page.goto("/admin/")
    page.fill("#id_username", console_admin.username)
    page.fill("#id_password", console_admin.password)
    page.click("input[type=submit]")
    expect(page.locator("#dashboard")).to_be_visible()
    expect(page.locator("#egress-blocked")).to_have_text("0")
    expect(page.locator("#ledger-state")).to_have_text("intact")
    shot(page, "01-dashboard-empty")


def test_import_a_demo_model_and_watch_its_progress(page, box, shot):
    page.goto("/admin/appliance/modelvariant/add/")
    page.fill("#id_name", VARIANT)
    page.select_option("#id_kind", "dense")
    page.fill("#id_source_path", str(box.demo_dir / "demo-dense"))
    page.click("input[name=_save]")
    row = page.locator("#result_list tr", has=page.get_by_role("link", name=VARIANT, exact=True))
    expect(row.locator("progress")).to_be_visible()
    for _ in range(600):
        if "Ready" in row.inner_text():
            break
        page.wait_for_timeout(300)
        page.reload()
    expect(row).to_contain_text("Ready")
    expect(row).to_contain_text("100%")
    shot(page, "02-variant-imported")


def test_deploy_it(page, shot):
    page.goto("/admin/appliance/modelvariant/")
    act_on(page, VARIANT, "deploy")
    expect(page.locator(".messagelist")).to_contain_text("deploy requested")
    row = page.locator("#result_list tr", has=page.get_by_role("link", name=VARIANT, exact=True))
    for _ in range(600):
        if "Deployed" in row.inner_text():
            break
        page.wait_for_timeout(300)
        page.reload()
    expect(row).to_contain_text("Deployed")
    shot(page, "03-variant-deployed")


def test_create_a_team_with_limits_and_issue_a_key(page, box, shot):
    page.goto("/admin/appliance/team/add/")
    page.fill("#id_name", TEAM)
    page.fill("#id_requests_per_minute", "100")
    page.fill("#id_tokens_per_month", "1000000")
    page.click("input[name=_save]")
    expect(page.locator("#result_list")).to_contain_text("100 req/min")
    act_on(page, TEAM, "issue_key")
    key = page.locator(".messagelist code").inner_text()
    assert key.startswith("sk-box-")
    shot(page, "04-team-and-key")
    listed = httpx.get(f"{box.url}/v1/models", headers={"Authorization": f"Bearer {key}"}).json()
    assert VARIANT in [m["id"] for m in listed["data"]]


def test_chat_on_the_staff_page_streams_an_answer(page, shot):
    page.goto("/admin/chat/")
    page.select_option("#chat-model", VARIANT)
    page.fill("#chat-max-tokens", "12")
    page.fill("#chat-input", "How many experts work per token?")
    page.click("#chat-send")
    expect(page.locator("#chat-status")).to_contain_text("completion tokens", timeout=SLOW)
    expect(page.locator("#chat-log .msg.user")).to_contain_text("How many experts")
    assert page.locator("#chat-log .msg.assistant").inner_text().strip()
    assert page.locator("#chat-log .msg.error").count() == 0
    shot(page, "05-staff-chat")


def test_the_request_appears_in_the_ledger_view(page, console_admin, shot):
    page.goto("/admin/audit/auditevent/?action=chat.completion")
    expect(page.locator("#result_list")).to_contain_text(f"team:console-{console_admin.username}")
    expect(page.locator("#result_list")).to_contain_text(VARIANT)
    shot(page, "06-ledger")


# Needs the gatekeeper's settle() wired into appliance/api/views.py: usage is recorded there.
def test_the_request_appears_on_the_usage_page(page, console_admin, shot):
    page.goto("/admin/")
    expect(page.locator("#variant-states")).to_contain_text(VARIANT)
    shot(page, "07-dashboard-after-chat")
    page.goto(f"/admin/usage/variant/{VARIANT}/")
    shot(page, "08-usage-variant")
    page.goto(f"/admin/usage/team/console-{console_admin.username}/")
    shot(page, "09-usage-console-team")
    expect(page.locator("#requests-day")).not_to_have_text("0")
    expect(page.locator("#breakdown")).to_contain_text(VARIANT)
