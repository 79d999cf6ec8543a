"""The dashboard as a person sees it: headless Chromium against a real node, on both backends.

One browser serves the whole module. Every check waits for what the page
shows (the page refreshes itself), never for a fixed time.
"""
from __future__ import annotations

import os
import signal
import urllib.parse
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator
from zoneinfo import ZoneInfo

import pytest
from harness import Dashboard, result, submit, wait_for
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from poltergust.dashboard.screenshot import chrome, sample_bucket

VIEWER_ZONE = "Asia/Kolkata"
"""Not UTC, and half an hour off: times must be shown in the viewer's zone."""


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    driver = chrome(1280, 900, VIEWER_ZONE)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


@pytest.fixture
def start_dashboard(tmp_path: Path, bucket, request: pytest.FixtureRequest) -> Iterator[Callable[..., Dashboard]]:
    started: list[Dashboard] = []

    def start(*extra: str) -> Dashboard:
        env = dict(os.environ)
        if hasattr(bucket, "gcs"):
            env["STORAGE_EMULATOR_HOST"] = bucket.gcs.url
        dashboard = Dashboard(tmp_path, bucket.url("pipeline"), env, *extra)
        started.append(dashboard)
        return dashboard

    yield start
    for dashboard in started:
        dashboard.stop()


def rows(browser) -> dict[str, str]:
    """What the pipeline table shows: {name: state}, read in one go (the page refreshes itself)."""
    return dict(browser.execute_script(
        "return [...document.querySelectorAll('table.pipelines tbody tr[data-pipeline]')]"
        ".map(row => [row.dataset.pipeline, row.querySelector('.badge').textContent])"))


def row_text(browser, name: str) -> str:
    return browser.execute_script(
        "const row = [...document.querySelectorAll('table.pipelines tbody tr[data-pipeline]')]"
        ".find(row => row.dataset.pipeline === arguments[0]); return row ? row.innerText : ''", name)


def statuses(browser) -> dict[str, str]:
    """What the nodes table shows: {node: status badge}."""
    return dict(browser.execute_script(
        "return [...document.querySelectorAll('tr[data-node]')]"
        ".map(row => [row.dataset.node, row.querySelector('.badge').textContent])"))


def click(browser, by: str, selector: str) -> None:
    """Click an element of a live part of the page, looking it up again if a refresh replaced it."""
    from selenium.common.exceptions import StaleElementReferenceException

    def attempt() -> bool:
        try:
            browser.find_element(by, selector).click()
            return True
        except StaleElementReferenceException:
            return False

    wait_for(attempt, 10, f"to click {selector}", interval=0.1)


def shown(browser, condition: Callable[[], object], timeout: float, what: str) -> object:
    """Wait until the page shows something; stale elements (the page refreshed under us) just mean: look again."""
    from selenium.common.exceptions import StaleElementReferenceException

    def look() -> object:
        try:
            return condition()
        except StaleElementReferenceException:
            return None

    return wait_for(look, timeout, what, interval=0.2)


def test_pipelines_in_every_state_filters_live_log_and_a_silent_node(
    start_node, start_dashboard, bucket, luigid, browser, environment_yaml: str, tmp_path: Path,
) -> None:
    node = start_node("node-a", "--max-concurrent", "1", "--heartbeat-interval", "1", "--log-upload-interval", "2")
    task = {"module": "poltergust_testpipes"}
    submit(bucket, "good", {**task, "name": "Touch", "out-dir": str(tmp_path / "good")}, environment_yaml)
    result(bucket, "good", "done")
    submit(bucket, "bad", {**task, "name": "Fail", "out-dir": str(tmp_path / "bad")}, environment_yaml)
    result(bucket, "bad", "error")
    submit(bucket, "chatty", {**task, "name": "Chatty", "out-dir": str(tmp_path / "chatty"), "seconds": 90,
                              "interval": 0.3}, environment_yaml)
    wait_for(lambda: b"chatty line" in (bucket.read(bucket.log_name("chatty", "node-a")) or b""), 90, "chatty to print")
    submit(bucket, "waiting", {**task, "name": "Touch", "out-dir": str(tmp_path / "waiting")}, environment_yaml)
    dashboard = start_dashboard("--scheduler-url", luigid.url)

    # The list: each pipeline with its state, the running one with its node, the error with its reason.
    browser.get(dashboard.url)
    expected = {"good": "done", "bad": "error", "chatty": "running", "waiting": "queued"}
    shown(browser, lambda: rows(browser) == expected, 30, f"the list to show {expected}")
    assert "on node-a" in row_text(browser, "chatty")
    assert "a luigi task failed" in row_text(browser, "bad")
    counts = dict(browser.execute_script(
        "return [...document.querySelectorAll('[data-count]')].map(el => [el.dataset.count, el.textContent])"))
    assert counts == {"queued": "1", "running": "1", "done": "1", "error": "1"}
    assert browser.find_element(By.ID, "zone").text in (VIEWER_ZONE, "Asia/Calcutta")  # ICU's older name
    stamp, text = browser.execute_script(
        "const t = document.querySelector('tr[data-pipeline=good] time'); "
        "return [t.getAttribute('datetime'), t.textContent]")
    local = datetime.fromisoformat(stamp).astimezone(ZoneInfo(VIEWER_ZONE))
    assert f":{local.minute:02d}" in text and "UTC" not in text, f"{stamp} shown as {text}"

    # The filters: by state, then by name.
    click(browser, By.CSS_SELECTOR, ".segmented a[data-filter=error]")
    shown(browser, lambda: rows(browser) == {"bad": "error"}, 15, "only the failed pipeline")
    browser.get(dashboard.url)
    search = browser.find_element(By.ID, "q")
    search.send_keys("chat", Keys.ENTER)
    shown(browser, lambda: rows(browser) == {"chatty": "running"}, 15, "only chatty")
    assert urllib.parse.parse_qs(urllib.parse.urlparse(browser.current_url).query)["q"] == ["chat"]

    # One pipeline: its log, growing while the run goes on; its config, environment and luigid's page.
    click(browser, By.LINK_TEXT, "chatty")
    log = shown(browser, lambda: browser.find_elements(By.CSS_SELECTOR, "pre.log[data-node=node-a]"), 15,
                "node-a's log")[0]
    first = shown(browser, lambda: "chatty line" in log.text and len(log.text), 15, "luigi's output in the log")
    shown(browser, lambda: len(log.text) > first + 40, 30, "the log to grow while chatty runs")
    assert "Chatty" in browser.find_element(By.ID, "document").text
    assert "poltergust-testpipes" in browser.find_element(By.ID, "environment").text
    assert "taskId=Chatty" in browser.find_element(By.ID, "luigi-link").get_attribute("href")

    # Nodes: alive while it heartbeats, gone once it stops (frozen, as a stalled machine would be).
    browser.get(dashboard.url + "/nodes")
    shown(browser, lambda: statuses(browser).get("node-a") == "alive", 15, "node-a alive")
    os.kill(node.process.pid, signal.SIGSTOP)
    try:
        shown(browser, lambda: statuses(browser).get("node-a") == "gone", 30, "node-a shown as gone")
    finally:
        os.kill(node.process.pid, signal.SIGCONT)
    node.stop()
    shown(browser, lambda: statuses(browser).get("node-a") == "stopped", 30, "node-a stopped after a clean shutdown")


@pytest.mark.parametrize("backend", ["local"], indirect=True)
def test_pages_read_only_and_files_outside_the_buckets_stay_hidden(
    start_dashboard, bucket, browser, tmp_path: Path,
) -> None:
    sample_bucket(bucket.root, datetime.now(timezone.utc))
    secret = tmp_path / "secret.yaml"
    secret.write_text("dependencies: [do-not-show-this]\n")
    bucket.upload("pipeline/sneaky.config.yaml", f"environment: file://{secret}\ntask: {{name: T, module: m}}\n")

    stamp = "[poltergust 2024-05-01 10:00:00Z]"
    for generation, node, text in ((100, "node-a", "first try\nfinished locally: error\nclaimed the run\n"),
                                   (200, "node-a", "finished locally: done\nclaimed the run\n"),
                                   (200, "node-b", "second try\nfinished locally: done\n")):
        bucket.upload(f"_poltergust/logs/pipeline/replay/{generation}/{node}.log.txt", f"{stamp} starts\n{text}")
    bucket.upload("pipeline/replay.done.yaml", "environment: e.yaml\ntask: {name: T, module: m}\n")

    def files() -> dict[str, tuple[int, int]]:
        return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(bucket.root.rglob("*"))}

    before = files()
    dashboard = start_dashboard()
    browser.get(dashboard.url)
    shown(browser, lambda: len(rows(browser)) == 50, 15, "a first page of 50 pipelines")
    names = set(rows(browser))
    click(browser, By.CSS_SELECTOR, ".pager a[rel=next]")
    shown(browser, lambda: rows(browser) and not names & set(rows(browser)), 15, "the second page, other pipelines")

    browser.get(f"{dashboard.url}/pipeline?path=0&name=replay")
    runs = lambda: browser.execute_script(  # noqa: E731
        "return [...document.querySelectorAll('table.runs tr[data-generation]')]"
        ".map(row => [row.dataset.generation, row.querySelector('.badge').textContent])")
    shown(browser, lambda: runs() == [["200", "done"], ["100", "error"]], 15, "both submissions, newest first")
    assert "second try" in browser.find_element(By.CSS_SELECTOR, "pre.log[data-node=node-b]").text
    click(browser, By.LINK_TEXT, "#100")
    shown(browser, lambda: "first try" in browser.find_element(By.CSS_SELECTOR, "pre.log[data-node=node-a]").text,
          15, "the first submission's log")

    browser.get(f"{dashboard.url}/pipeline?path=0&name=sneaky")
    shown(browser, lambda: "outside the buckets this dashboard reads" in browser.page_source, 15, "the refusal")
    assert "do-not-show-this" not in browser.page_source
    browser.get(f"{dashboard.url}/nodes")
    shown(browser, lambda: statuses(browser) == {"node-eu-1": "alive", "node-eu-2": "alive", "node-eu-3": "gone"},
          15, "the sample's nodes")
    assert browser.find_elements(By.CSS_SELECTOR, "tr[data-node=node-eu-3] .disk.low"), "a nearly full disk is flagged"
    assert files() == before, "the dashboard wrote nothing"
