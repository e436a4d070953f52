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
PAGES = ["dashboard", "experiments", "datasets", "deployments", "playground", "ab-tests", "admin"]


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
    form = page.locator("#login-form")
    form.get_by_label("Email").fill(email)
    form.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()


def nav(page: Page, name: str) -> None:
    """Go to a page through the header's navigation."""
    page.get_by_role("navigation").get_by_role("link", name=name, exact=True).click()


def test_wrong_password_is_shown(page: Page) -> None:
    log_in(page, "not-the-password")
    expect(page.locator("#login-error")).to_contain_text("incorrect email or password")
    expect(page.locator("#app")).to_be_hidden()


def test_train_watch_deploy_and_chat(
    page: Page, stack: Stack, tiny_model: Path, alpaca_file: Path, tmp_path: Path
) -> None:
    stack.start_inference_worker()
    log_in(page)
    expect(page.locator("#me")).to_have_text(ADMIN_EMAIL)
    assert page.request.get("/ui/").headers["content-security-policy"].startswith("default-src 'self'")
    expect(page.locator("#page-dashboard")).to_be_visible()

    # A file the API refuses: the reason is shown at the upload, naming the line.
    nav(page, "Datasets")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "ok", "output": "fine"}\n{not json\n')
    page.locator("#upload-form [name=file]").set_input_files(str(broken))
    page.get_by_role("button", name="Upload").click()
    expect(page.locator("#upload-error")).to_contain_text("row 2: field '*': invalid JSON")
    page.locator("#upload-form [name=file]").set_input_files(str(alpaca_file))
    page.locator("#upload-form [name=name]").fill("ui-alpaca")
    page.get_by_role("button", name="Upload").click()
    expect(page.locator("#flash")).to_contain_text("uploaded ui-alpaca: alpaca, 16 rows")
    expect(page.locator("#upload-error")).to_be_empty()
    screenshot(page, "datasets")

    # Its page: the detected format, a preview table, and the report for the tiny model.
    page.get_by_role("link", name="ui-alpaca").click()
    expect(page).to_have_url(re.compile(r"#/datasets/[0-9a-f-]{36}$"))
    expect(page.locator("#dataset-facts")).to_contain_text("alpaca")
    expect(page.locator("#dataset-preview tbody tr")).not_to_have_count(0)
    expect(page.locator("#dataset-preview thead")).to_contain_text("instruction")
    page.locator("#report-form [name=base_model]").fill(str(tiny_model))
    page.get_by_role("button", name="Show report").click()
    expect(page.locator("#chart-histogram")).to_be_visible()
    expect(page.locator("#report-duplicates")).to_contain_text("12 exact")
    expect(page.locator("#report-truncation")).to_contain_text("0 rows")
    assert page.locator(".mask .trained").count() > 0 and page.locator(".mask-text .context").count() > 0
    screenshot(page, "dataset")

    nav(page, "Experiments")
    form = page.locator("#submit-form")
    form.locator("[name=name]").fill("ui-run")
    form.locator("[name=base_model]").fill(str(tiny_model))
    form.locator("[name=dataset_id]").select_option(label="ui-alpaca (16 rows)")
    form.locator("[name=recipe]").select_option("tiny_lora_cpu")
    expect(page.locator("#estimate")).to_contain_text("peak memory")  # the report's estimate for this pair
    form.locator("summary").click()  # every hyperparameter, generated from the API's schema, with its help
    expect(form.locator("#help-learning_rate")).to_contain_text("learning rate")
    form.locator("[name=learning_rate]").fill("2")  # past its bound: the 422 is shown at the field
    form.get_by_role("button", name="Submit").click()
    expect(form.locator("#err-learning_rate")).to_contain_text("less than or equal to 1")
    expect(form.locator("[name=learning_rate]")).to_have_attribute("aria-invalid", "true")
    form.locator("[name=learning_rate]").fill("")
    form.locator("[name=max_steps]").fill("20")
    # 8 micro-batches per step: the run lasts seconds, not a fraction of one, so its growth can be watched.
    form.locator("[name=gradient_accumulation_steps]").fill("8")
    form.get_by_role("button", name="Submit").click()
    row = page.locator("#experiments tbody tr", has_text="ui-run")
    expect(row).to_have_count(1)
    # Open it while it runs: its charts grow as the run logs, over the experiment's own event stream.
    row.get_by_role("link", name="ui-run").click()
    expect(page).to_have_url(re.compile(r"#/experiments/[0-9a-f-]{36}$"))
    run_url = page.url
    loss = page.locator("#chart-loss")
    seen = []
    while len(seen) < 600 and not (page.locator("#detail-status").text_content() or "").startswith("succeeded"):
        seen.append(int(loss.get_attribute("data-points") or 0))
        page.wait_for_timeout(100)
    expect(page.locator("#detail-status")).to_contain_text("succeeded", timeout=180_000)
    expect(loss).to_have_attribute("data-points", "11")  # 20 steps: the first, then a log every 2
    assert any(0 < n < 11 for n in seen), f"the chart did not grow while the run went on: {seen}"
    for panel in ("lr", "grad", "tps"):  # learning rate, grad norm, tokens/s: one chart each, with axes
        assert int(page.locator(f"#chart-{panel}").get_attribute("data-points") or 0) >= 5
    expect(page.locator("#chart-loss .u-axis")).to_have_count(2)
    expect(page.locator("#timeline")).to_contain_text("running")
    expect(page.locator("#timeline")).to_contain_text("succeeded")
    # The dataset repeats every row 4 times: the report's warning from the submit is on the page.
    expect(page.locator("#detail-warnings")).to_contain_text("warning: 12 exact and 0 near-duplicate rows")
    expect(page.locator("#lineage")).to_contain_text("dataset ui-alpaca")
    expect(page.locator("#artifacts")).to_contain_text("README.md")
    expect(page.locator("#model-card h3, #model-card h4").first).to_be_visible()  # Markdown, rendered as elements
    expect(page.locator("#log-tail")).not_to_be_empty()
    page.locator("#log-scale").check()  # the loss on a log scale, redrawn from the same points
    expect(page.locator("#chart-loss")).to_have_attribute("data-points", "11")
    screenshot(page, "experiment")
    # Back to the list with the browser's back button; the deep link opens the run again after a reload.
    page.go_back()
    expect(page.locator("#page-experiments")).to_be_visible()
    page.goto(run_url)
    expect(page.locator("#detail-title")).to_have_text("ui-run")

    # Two runs' loss on one chart.
    with stack.http() as http:
        dataset = next(d["id"] for d in http.get("/api/datasets/").json()["data"] if d["name"] == "ui-alpaca")
        body = {"name": "ui-second", "base_model": str(tiny_model), "dataset_id": dataset, "recipe": "tiny_lora_cpu"}
        http.post("/api/experiments/", json={**body, "hyperparameters": {"max_steps": 6, "logging_steps": 1}})
    nav(page, "Experiments")
    second = page.locator("#experiments tbody tr", has_text="ui-second")  # arrives over the live channel
    expect(second.locator(".status")).to_have_text("succeeded", timeout=180_000)
    row.get_by_role("checkbox").check()
    second.get_by_role("checkbox").check()
    page.get_by_role("button", name="Compare selected").click()
    expect(page.locator("#chart-compare")).to_have_attribute("data-series", "2")
    expect(page.locator("#chart-compare .u-legend")).to_contain_text("ui-second")
    screenshot(page, "experiments")

    # A run no live worker can take says why on its page (here: more GPUs than any worker has).
    with stack.http() as http:
        body = {"name": "ui-huge", "base_model": str(tiny_model), "dataset_id": dataset, "gpus": 64}
        huge = http.post("/api/experiments/", json=body).json()
        page.locator("#experiments tbody tr", has_text="ui-huge").get_by_role("link", name="ui-huge").click()
        expect(page.locator("#detail-waiting")).to_contain_text("waiting: asks for 64 GPUs")
        http.post(f"/api/experiments/{huge['id']}/stop")

    # Deploy the run from its page, and the base model beside it.
    page.goto(run_url)
    page.locator("#detail-actions").get_by_role("button", name="Deploy").click()
    expect(page.locator("#flash")).to_contain_text("deployed as ui-run-")
    model = (page.locator("#flash").text_content() or "").split("deployed as ")[1]
    expect(page.locator("#deployments tbody")).to_contain_text(model)
    page.locator("#deploy-form [name=base_model]").fill(str(tiny_model))
    page.locator("#deploy-form").get_by_role("button", name="Deploy").click()
    expect(page.locator("#flash")).to_contain_text(f"deployed as {tiny_model.name}-")  # named after the model
    base_model = (page.locator("#flash").text_content() or "").split("deployed as ")[1]

    # The deployment's own page: where it is placed, and a link that opens the playground with it chosen.
    page.locator("#deployments").get_by_role("link", name=model).click()
    expect(page).to_have_url(re.compile(r"#/deployments/[0-9a-f-]{36}$"))
    expect(page.locator("#deployment-placement tbody")).to_contain_text("ready", timeout=60_000)
    page.get_by_role("link", name="Chat with it").click()
    expect(page.locator("#chat-form [name=model]")).to_have_value(model)

    # Side by side: the same prompt and settings to both, both streaming.
    page.locator("#chat-form [name=model_b]").select_option(base_model)
    page.locator("#chat-form [name=system]").fill("Answer briefly.")
    page.locator("#chat-form [name=message]").fill("What is the capital of France?")
    page.locator("#chat-form [name=max_tokens]").fill("12")
    page.get_by_role("button", name="Send").click()
    # The page's policy forbids eval, so wait with a selector: both answers finished, or an error shown.
    page.locator("#chat-output-b[data-done='true'], #error:not(:empty)").first.wait_for(timeout=60_000)
    expect(page.locator("#chat-output")).to_have_attribute("data-done", "true")
    assert page.locator("#error").text_content() == "", page.locator("#error").text_content()
    assert (page.locator("#chat-output").text_content() or "").strip()
    assert (page.locator("#chat-output-b").text_content() or "").strip()
    expect(page.locator("#chat-title-b")).to_have_text(base_model)
    screenshot(page, "playground")

    # The deployments page: where each model is placed, and the requests it answered (flushed by the relay).
    nav(page, "Deployments")
    deployed = page.locator("#deployments tbody tr", has_text=model)
    expect(deployed).to_contain_text("ready")
    page.reload()  # the URL and the login survive a reload; the page re-reads the rates every few seconds
    expect(deployed.locator("td").nth(5)).to_have_text("0.2", timeout=20_000)  # 1 request in 5 minutes
    screenshot(page, "deployments")

    # An A/B test of the two: created, compared, voted on blind, and the vote on the leaderboard.
    nav(page, "A/B tests")
    ab = page.locator("#ab-form")
    ab.locator("[name=name]").fill("ui-ab")
    ab.locator("[name=deployment_a]").select_option(label=model)
    ab.locator("[name=deployment_b]").select_option(label=base_model)
    ab.locator("[name=prompts]").fill("Name a colour.\nCount to three.")
    ab.locator("[name=max_tokens]").fill("8")
    ab.get_by_role("button", name="Create").click()
    expect(page.locator("#ab-title")).to_have_text("ui-ab")
    page.get_by_role("button", name="Run compare").click()
    expect(page.locator("#ab-answers tbody tr")).to_have_count(2, timeout=60_000)
    expect(page.locator("#ballot-first")).not_to_be_empty()
    page.get_by_role("button", name="First is better").click()
    expect(page.locator("#flash")).to_have_text("vote recorded")
    screenshot(page, "ab-test")
    nav(page, "A/B tests")
    expect(page.locator("#leaderboard tbody tr", has_text=model).locator("td").last).to_have_text("1")  # its votes

    nav(page, "Dashboard")
    with stack.http() as http:  # the stack is shared with other tests: the count is what the API says
        succeeded = http.get("/api/experiments/?status=succeeded&limit=1").json()["count"]
    expect(page.locator("#count-succeeded .count")).to_have_text(str(succeeded))
    expect(page.locator("#recent tbody")).to_contain_text("ui-run")
    expect(page.locator("#fleet tbody")).to_contain_text("inference")
    screenshot(page, "dashboard")

    nav(page, "Experiments")
    page.locator("#submit-form [name=name]").fill("bad")
    page.locator("#submit-form [name=base_model]").fill("/no/such/model")
    page.get_by_role("button", name="Submit").click()
    expect(page.locator("#error")).to_contain_text("base_model")
    expect(page.locator("#err-base_model")).to_contain_text("not an allowed model")


def test_admin_page_keys_invitations_and_audit(page: Page, stack: Stack) -> None:
    log_in(page)
    nav(page, "Admin")
    page.locator("#key-form [name=name]").fill("ui-key")
    page.get_by_role("button", name="Create key").click()
    expect(page.locator("#new-key")).to_contain_text("ui-key (shown once")
    key = (page.locator("#new-key").text_content() or "").rsplit(" ", 1)[1]
    with stack.http() as http:  # the key shown works, once, as a bearer token
        assert http.get("/api/users/me", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    expect(page.locator("#api-keys tbody")).to_contain_text("ui-key")
    expect(page.locator("#api-keys tbody")).not_to_contain_text(key)  # only the prefix is listed
    page.locator("#invite-form [name=email]").fill("invitee@e2e.test")
    page.get_by_role("button", name="Invite").click()
    expect(page.locator("#invite-token")).to_contain_text("invitee@e2e.test")
    expect(page.locator("#invitations tbody")).to_contain_text("invitee@e2e.test")
    page.locator("#quota-form [name=max_queued_jobs]").fill("1000000")  # over the cap: the 422 names it
    page.get_by_role("button", name="Save quotas").click()
    expect(page.locator("#quota-form [name=max_queued_jobs]")).to_have_attribute("aria-invalid", "true")
    page.reload()  # the audit log has what was just done
    expect(page.locator("#audit tbody")).to_contain_text("api_key.create")
    screenshot(page, "admin")


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
    expect(page.get_by_role("navigation").get_by_role("link", name="Admin")).to_be_hidden()
    nav(page, "Experiments")
    expect(page.locator("#experiments tbody tr")).to_have_count(max(listed, 1))  # reads what the team has
    expect(page.locator("#submit-form")).to_be_hidden()
    expect(page.get_by_role("button", name="Stop")).to_have_count(0)
    expect(page.get_by_role("button", name="Deploy")).to_have_count(0)
    if listed:  # a run's own page offers no stop, clone or deploy either
        page.locator("#experiments tbody a").first.click()
        expect(page.locator("#detail-title")).not_to_be_empty()
        expect(page.locator("#detail-actions")).to_be_hidden()
    nav(page, "Datasets")
    expect(page.locator("#upload-form")).to_be_hidden()
    nav(page, "Deployments")
    expect(page.locator("#deploy-form")).to_be_hidden()
    expect(page.get_by_role("button", name="Retire")).to_have_count(0)
    nav(page, "A/B tests")
    expect(page.locator("#ab-form")).to_be_hidden()


def test_every_page_passes_an_accessibility_scan_at_both_widths(browser: Browser, stack: Stack) -> None:
    """axe-core (vendored, served by the API) on every page: no serious or critical violations, at laptop and
    phone width. The scan is script run in the page, so this context alone bypasses the page's CSP."""
    context = browser.new_context(base_url=stack.url, viewport=LAPTOP, bypass_csp=True)
    page = context.new_page()
    try:
        log_in(page)
        expect(page.locator("#me")).to_have_text(ADMIN_EMAIL)
        with stack.http() as http:  # one object of each kind, for the pages of one object
            objects = {
                "experiment": http.get("/api/experiments/?limit=1").json()["data"],
                "dataset": http.get("/api/datasets/?limit=1").json()["data"],
                "ab-test": http.get("/api/ab-testing/?limit=1").json()["data"],
            }
        routes = {name: f"/#/{name}" for name in PAGES} | {
            kind: f"/#/{kind}s/{rows[0]['id']}" for kind, rows in objects.items() if rows
        }
        found = {}
        for name, url in routes.items():
            page.goto(url)
            expect(page.locator(f"#page-{name}")).to_be_visible()
            page.wait_for_timeout(500)  # its tables fill (the team's live stream keeps the network busy)
            page.add_script_tag(url="/ui/vendor/axe/axe.min.js")
            for label, size in (("laptop", LAPTOP), ("phone", PHONE)):
                page.set_viewport_size(size)
                found[f"{name}@{label}"] = page.evaluate(
                    """async () => (await axe.run(document, {resultTypes: ["violations"]})).violations
                        .filter((v) => v.impact === "serious" || v.impact === "critical")
                        .map((v) => `${v.id} (${v.impact}): ${v.nodes.map((n) => n.target.join(" ")).join(", ")}`)"""
                )
            page.set_viewport_size(LAPTOP)
        assert not any(found.values()), {k: v for k, v in found.items() if v}
        # The scan does find what it should: an input without a label is critical.
        page.goto("/#/playground")
        expect(page.locator("#page-playground")).to_be_visible()
        page.add_script_tag(url="/ui/vendor/axe/axe.min.js")
        page.evaluate("() => document.querySelector('#page-playground').append(document.createElement('input'))")
        broken = page.evaluate("async () => (await axe.run(document)).violations.map((v) => v.id)")
        assert "label" in broken, broken

        # A file dropped on the upload's drop zone becomes the upload's file.
        page.goto("/#/datasets")
        expect(page.locator("#page-datasets")).to_be_visible()  # its handlers are wired by then
        dropped = page.evaluate_handle(
            """() => { const t = new DataTransfer();
                       t.items.add(new File(['{"instruction": "a", "output": "b"}\\n'], "dropped.jsonl"));
                       return t; }"""
        )
        page.dispatch_event("#drop-zone", "drop", {"dataTransfer": dropped})
        expect(page.locator("#drop-zone")).to_contain_text("dropped.jsonl")
        assert page.evaluate("() => document.querySelector('#upload-file').files[0].name") == "dropped.jsonl"
    finally:
        context.close()
