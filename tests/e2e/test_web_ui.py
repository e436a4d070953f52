"""The web UI in a real browser (Debian's Chromium driven by Playwright) against the real stack: log in,
upload a dataset, submit an experiment and watch its status change live, see its loss chart, deploy it,
and chat with it in the playground."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, ViewportSize, expect, sync_playwright

from tests.e2e.stack import ADMIN_EMAIL, ADMIN_PASSWORD, Stack

pytestmark = pytest.mark.e2e
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
LAPTOP: ViewportSize = {"width": 1280, "height": 800}
PHONE: ViewportSize = {"width": 390, "height": 844}
SHOTS = Path(__file__).resolve().parents[2] / "screenshots"
PAGES = ["experiments", "datasets", "deployments", "playground"]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if CHROMIUM is None:
        pytest.fail("no chromium on PATH: install Debian's chromium (make test does where it can)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser, stack: Stack) -> Iterator[Page]:
    context = browser.new_context(base_url=stack.url, viewport=LAPTOP)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda message: _console_error(message, errors))
    yield page
    context.close()
    assert not errors, f"JavaScript or console errors: {errors}"


def _console_error(message: ConsoleMessage, errors: list[str]) -> None:
    # A 4xx the page asked for on purpose (a bad upload, a wrong password) is logged by the browser as a
    # failed resource; the page shows it to the user, which the tests check. Anything else is an error.
    if message.type == "error" and not re.search(r"Failed to load resource: .* status of 4\d\d", message.text):
        errors.append(message.text)


def screenshot(page: Page, name: str) -> None:
    """The page at laptop and at phone width, saved for people to look at (screenshots/, not committed)."""
    SHOTS.mkdir(exist_ok=True)
    for label, size in (("laptop", LAPTOP), ("phone", PHONE)):
        page.set_viewport_size(size)
        page.screenshot(path=str(SHOTS / f"{name}-{label}.png"), full_page=True)
    page.set_viewport_size(LAPTOP)


def log_in(page: Page, password: str = ADMIN_PASSWORD, email: str = ADMIN_EMAIL) -> None:
    page.goto("/")
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()


def test_wrong_password_is_shown(page: Page) -> None:
    log_in(page, "not-the-password")
    expect(page.locator("#login-error")).to_contain_text("incorrect email or password")
    expect(page.locator("#app")).to_be_hidden()


def test_train_watch_deploy_and_chat(page: Page, stack: Stack, tiny_model: Path, alpaca_file: Path) -> None:
    stack.start_inference_worker()
    log_in(page)
    expect(page.locator("#me")).to_have_text(ADMIN_EMAIL)
    assert page.request.get("/ui/").headers["content-security-policy"].startswith("default-src 'self'")

    page.get_by_role("link", name="Datasets").click()
    page.locator("#upload-form [name=file]").set_input_files(str(alpaca_file))
    page.locator("#upload-form [name=name]").fill("ui-alpaca")
    page.get_by_role("button", name="Upload").click()
    expect(page.locator("#datasets tbody")).to_contain_text("ui-alpaca")

    page.get_by_role("link", name="Experiments").click()
    form = page.locator("#submit-form")
    form.locator("[name=name]").fill("ui-run")
    form.locator("[name=base_model]").fill(str(tiny_model))
    form.locator("[name=dataset_id]").select_option(label="ui-alpaca (16 rows)")
    form.locator("[name=recipe]").select_option("tiny_lora_cpu")
    form.locator("summary").click()  # every hyperparameter, generated from the API's schema, with its help
    expect(form.locator("#help-learning_rate")).to_contain_text("learning rate")
    form.locator("[name=learning_rate]").fill("2")  # past its bound: the 422 is shown at the field
    form.get_by_role("button", name="Submit").click()
    expect(form.locator("#err-learning_rate")).to_contain_text("less than or equal to 1")
    expect(form.locator("[name=learning_rate]")).to_have_attribute("aria-invalid", "true")
    form.locator("[name=learning_rate]").fill("")
    form.locator("[name=max_steps]").fill("20")
    form.get_by_role("button", name="Submit").click()
    row = page.locator("#experiments tbody tr", has_text="ui-run")
    expect(row).to_have_count(1)
    # Open it while it runs: its charts grow as the run logs, over the experiment's own event stream.
    row.get_by_role("button", name="Details").click()
    loss = page.locator("#chart-loss")
    seen = []
    while len(seen) < 120 and not (page.locator("#detail-status").text_content() or "").startswith("succeeded"):
        seen.append(int(loss.get_attribute("data-points") or 0))
        page.wait_for_timeout(500)
    # No reload from here on: the status changes arrive over the team's live channel.
    expect(row.locator(".status")).to_have_text("succeeded", timeout=180_000)
    expect(page.locator("#detail-status")).to_contain_text("succeeded")
    expect(loss).to_have_attribute("data-points", "11")  # 20 steps: the first, then a log every 2
    assert any(0 < n < 11 for n in seen), f"the chart did not grow while the run went on: {seen}"
    for panel in ("lr", "grad", "tps"):  # learning rate, grad norm, tokens/s: one chart each, with axes
        assert int(page.locator(f"#chart-{panel}").get_attribute("data-points") or 0) >= 5
    expect(page.locator("#chart-loss .u-axis")).to_have_count(2)
    # The dataset repeats every row 4 times: the report's warning from the submit is on the page.
    expect(page.locator("#detail-warnings")).to_contain_text("warning: 12 exact and 0 near-duplicate rows")
    page.locator("#log-scale").check()  # the loss on a log scale, redrawn from the same points
    expect(page.locator("#chart-loss")).to_have_attribute("data-points", "11")

    # Two runs' loss on one chart.
    with stack.http() as http:
        dataset = next(d["id"] for d in http.get("/api/datasets/").json()["data"] if d["name"] == "ui-alpaca")
        body = {"name": "ui-second", "base_model": str(tiny_model), "dataset_id": dataset, "recipe": "tiny_lora_cpu"}
        http.post("/api/experiments/", json={**body, "hyperparameters": {"max_steps": 6, "logging_steps": 1}})
    second = page.locator("#experiments tbody tr", has_text="ui-second")
    expect(second.locator(".status")).to_have_text("succeeded", timeout=180_000)
    row.get_by_role("checkbox").check()
    second.get_by_role("checkbox").check()
    page.get_by_role("button", name="Compare selected").click()
    expect(page.locator("#chart-compare")).to_have_attribute("data-series", "2")
    expect(page.locator("#chart-compare .u-legend")).to_contain_text("ui-second")
    screenshot(page, "experiment")

    # A run no live worker can take says why on its page (here: more GPUs than any worker has).
    with stack.http() as http:
        dataset = next(d["id"] for d in http.get("/api/datasets/").json()["data"] if d["name"] == "ui-alpaca")
        body = {"name": "ui-huge", "base_model": str(tiny_model), "dataset_id": dataset, "gpus": 64}
        huge = http.post("/api/experiments/", json=body).json()
        big_row = page.locator("#experiments tbody tr", has_text="ui-huge")  # arrives over the live channel
        big_row.get_by_role("button", name="Details").click()
        expect(page.locator("#detail-waiting")).to_contain_text("waiting: asks for 64 GPUs")
        http.post(f"/api/experiments/{huge['id']}/stop")

    row.get_by_role("button", name="Deploy").click()
    expect(page.locator("#error")).to_contain_text("deployed as ui-run-")
    model = (page.locator("#error").text_content() or "").split("deployed as ")[1]
    expect(page.locator("#deployments tbody")).to_contain_text(model)

    page.get_by_role("link", name="Playground").click()
    page.locator("#chat-form [name=model]").select_option(model)
    page.locator("#chat-form [name=message]").fill("What is the capital of France?")
    page.locator("#chat-form [name=max_tokens]").fill("12")
    page.get_by_role("button", name="Send").click()
    # The page's policy forbids eval, so wait with a selector: the answer finished, or an error shown.
    page.locator("#chat-output[data-done='true'], #error:not(:empty)").first.wait_for(timeout=60_000)
    assert page.locator("#error").text_content() == "", page.locator("#error").text_content()
    assert (page.locator("#chat-output").text_content() or "").strip()

    page.get_by_role("link", name="Experiments").click()
    page.locator("#submit-form [name=name]").fill("bad")
    page.locator("#submit-form [name=base_model]").fill("/no/such/model")
    page.get_by_role("button", name="Submit").click()
    expect(page.locator("#error")).to_contain_text("base_model")
    expect(page.locator("#err-base_model")).to_contain_text("not an allowed model")


def test_a_viewer_is_not_offered_writes(page: Page, stack: Stack) -> None:
    with stack.http() as http:
        team = http.get("/api/users/me").json()["teams"][0]["id"]
        invite = http.post(
            f"/api/teams/{team}/invitations",
            json={"email": "viewer@e2e.test", "role": "viewer"},
            headers=stack.jwt_headers,
        )
        assert invite.status_code == 201, invite.text
        accepted = http.post(
            "/api/invitations/accept", json={"token": invite.json()["token"], "password": "viewer-password"}
        )
        assert accepted.status_code == 200, accepted.text
        listed = min(http.get("/api/experiments/?limit=100").json()["count"], 100)
    log_in(page, "viewer-password", "viewer@e2e.test")
    expect(page.locator("#me")).to_have_text("viewer@e2e.test")
    expect(page.locator("#experiments tbody tr")).to_have_count(listed)  # reads what the team has
    expect(page.locator("#submit-form")).to_be_hidden()
    expect(page.get_by_role("button", name="Stop")).to_have_count(0)
    expect(page.get_by_role("button", name="Deploy")).to_have_count(0)
    page.get_by_role("link", name="Datasets").click()
    expect(page.locator("#upload-form")).to_be_hidden()


def test_every_page_passes_an_accessibility_scan_at_both_widths(browser: Browser, stack: Stack) -> None:
    """axe-core (vendored, served by the API) on every page: no serious or critical violations, at laptop and
    phone width. The scan is script run in the page, so this context alone bypasses the page's CSP."""
    context = browser.new_context(base_url=stack.url, viewport=LAPTOP, bypass_csp=True)
    page = context.new_page()
    try:
        log_in(page)
        expect(page.locator("#me")).to_have_text(ADMIN_EMAIL)
        found = {}
        for name in PAGES:
            page.goto(f"/#{name}")
            expect(page.locator(f"#page-{name}")).to_be_visible()
            page.wait_for_timeout(500)  # its tables fill (the team's live stream keeps the network busy)
            screenshot(page, name)
            page.add_script_tag(url="/ui/vendor/axe/axe.min.js")
            for label, size in (("laptop", LAPTOP), ("phone", PHONE)):
                page.set_viewport_size(size)
                found[f"{name}@{label}"] = page.evaluate(
                    """async () => (await axe.run(document, {resultTypes: ["violations"]})).violations
                        .filter((v) => v.impact === "serious" || v.impact === "critical")
                        .map((v) => `${v.id} (${v.impact}): ${v.nodes.map((n) => n.target.join(" ")).join(", ")}`)"""
                )
        assert not any(found.values()), {k: v for k, v in found.items() if v}
        # The scan does find what it should: an input without a label is critical.
        page.evaluate("() => document.querySelector('#page-playground').append(document.createElement('input'))")
        broken = page.evaluate("async () => (await axe.run(document)).violations.map((v) => v.id)")
        assert "label" in broken, broken
    finally:
        context.close()
