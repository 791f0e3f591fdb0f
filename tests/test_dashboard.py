"""GET /dashboard in headless Chromium (Debian's chromium, driven by playwright's Python client;
playwright's own browser download is never used): the page loads without console errors, the
loss chart has points on a log axis, a parent whose files were pruned is shown as pruned (not as a
version one can go to), a rollback through the button changes the active version, and a prompt
runs against a pinned version. The screenshot lands in the test's temporary directory, or where
$LLMOS_DASHBOARD_SCREENSHOT says (`make dashboard-screenshot` refreshes docs/dashboard.png for the
README): a clean checkout stays clean after its own tests."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from conftest import ADMIN, LiveServer, admin_headers, make_settings, wait_for
from playwright.sync_api import ConsoleMessage, expect, sync_playwright

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


def newest(checkpoints: dict) -> int:
    return max(c["version"] for c in checkpoints["checkpoints"])


def orphans(checkpoints: dict) -> list[int]:
    """Listed versions whose parent is not listed: it was pruned."""
    stored = {c["version"] for c in checkpoints["checkpoints"]}
    return [c["version"] for c in checkpoints["checkpoints"] if c["parent_version"] not in stored | {None}]


def test_dashboard_in_a_real_browser(tmp_path: Path) -> None:
    assert shutil.which(CHROMIUM), f"{CHROMIUM} is missing: `make install` installs Debian's chromium (apt-get)"
    # Two versions kept besides 0 and the active one: the third prunes the first, the second's parent.
    settings = make_settings(tmp_path / "data", **{"train.passes_per_batch": 8, "registry.keep_last": 2})
    with LiveServer(settings) as srv, srv.client() as http:
        # A few versions, each from its own batch, so the loss curves have several points.
        for batch in range(3):
            texts = [{"text": f"The capital of Zorbia is Quellton, number {batch * 10 + i}."} for i in range(10)]
            assert http.post("/v1/texts", json={"items": texts}).status_code == 202
            wait_for(lambda b=batch: newest(http.get("/v1/checkpoints").json()) >= b + 1, timeout=60)
        # The cycle that published the newest version prunes just after.
        wait_for(lambda: orphans(http.get("/v1/checkpoints").json()), timeout=30)
        assert http.post("/v1/admin/trainer/pause", headers=admin_headers()).status_code == 200
        cps = http.get("/v1/checkpoints").json()
        active = cps["active_version"]
        target = next(c["version"] for c in cps["checkpoints"] if c["version"] != active and c["status"] == "promoted")
        stored = {c["version"] for c in cps["checkpoints"]}
        pruned_parent = orphans(cps)
        assert pruned_parent, cps

        problems: list[str] = []
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1200, "height": 900})

            def on_console(msg: ConsoleMessage) -> None:
                if msg.type == "error":
                    problems.append(f"console: {msg.text}")

            page.on("console", on_console)
            page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
            page.goto(srv.url + "/dashboard")
            page.wait_for_selector("body[data-loaded=true]", timeout=20_000)

            expect(page.locator("#active-version")).to_have_text(f"v{active}")
            expect(page.locator("#trainer-state")).to_have_text("paused")
            rows = page.locator("#checkpoints tbody tr")
            expect(rows).to_have_count(len(cps["checkpoints"]))
            # The chart: one x per checkpoint at least, and real loss values on its series.
            xs, ys = page.evaluate(
                """() => {
                    const d = window.llmosChart.data;
                    const ys = d.slice(1).flat().filter((v) => typeof v === "number");
                    return [d[0].length, ys.length];
                }"""
            )
            assert xs >= 3 and ys >= 3, (xs, ys)
            # Logarithmic: held-out and anchor loss, far below prequential loss, are not squashed to zero.
            assert page.evaluate("() => window.llmosChart.scales.y.distr") == 3  # uPlot's log distribution

            # A pruned parent says so and offers nothing to click; a stored one links to its row.
            for version in pruned_parent:
                row = page.locator(f"#checkpoints tr[data-version='{version}']")
                parent = row.locator("td.parent")
                expect(parent).to_contain_text("(pruned)")
                expect(parent.locator("a, button")).to_have_count(0)
            linked = [c for c in cps["checkpoints"] if c["parent_version"] in stored]
            assert linked, cps
            for c in linked:
                link = page.locator(f"#checkpoints tr[data-version='{c['version']}'] td.parent a")
                expect(link).to_have_attribute("href", f"#checkpoint-v{c['parent_version']}")
                expect(link).not_to_contain_text("pruned")

            # Try a prompt against a pinned (older) version; the answer is that version's.
            page.select_option("#try-model", f"llmos@{target}")
            page.fill("#try-prompt", "The capital of Zorbia")
            page.fill("#try-max-tokens", "24")
            page.click("#try-submit")
            expect(page.locator("#try-meta")).to_contain_text(f"llmos@{target}", timeout=20_000)
            body = {"model": f"llmos@{target}", "prompt": "The capital of Zorbia", "max_tokens": 24, "temperature": 0}
            expected = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
            expect(page.locator("#try-output")).to_have_text(expected)

            # Roll back through the button: it asks for the admin token, then confirms.
            page.locator(f"#checkpoints tr[data-version='{target}'] button.rollback").click()
            expect(page.locator("#rollback-dialog")).to_be_visible()
            expect(page.locator("#rollback-version")).to_have_text(str(target))
            page.fill("#admin-token", ADMIN)
            page.click("#rollback-confirm")
            expect(page.locator("#rollback-dialog")).to_be_hidden()
            expect(page.locator("#active-version")).to_have_text(f"v{target}", timeout=10_000)
            assert http.get("/v1/trainer").json()["active_version"] == target
            expect(page.locator(f"#checkpoints tr[data-version='{target}']")).to_have_class("active")

            shot = Path(os.environ.get("LLMOS_DASHBOARD_SCREENSHOT") or tmp_path / "dashboard.png")
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            browser.close()
        assert problems == []
