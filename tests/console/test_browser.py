"""The console in a real browser (Debian's chromium, driven by Selenium) against the embedded
stack during a short stream: registry, validator, scorer, label join, monitor and the query
service run as processes; events and their labels are streamed; the monitor raises a real
alert. Screenshots of the main pages go to demo-output/console/."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from pydantic import SecretStr

from scoremesh.contract.codec import codec
from services.common.devstack import free_port
from services.common.settings import Settings
from services.trainer.datasets import credit_events
from tests.console.factories import drift_record, publish_stats
from tests.helpers import ServiceProcess, produce, register_model, wait_for_log
from tests.query.conftest import TOKEN

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "demo-output" / "console"
CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
SERVICES = ("registry", "validator", "scorer", "label-join", "monitor", "query")
EVENTS = 1200
T = TypeVar("T")

needs_browser = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="Debian's chromium and chromium-driver are not installed "
    "(apt-get install chromium chromium-driver; .ci/run installs them), so the console's "
    "browser test cannot run here",
)


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="scoremesh-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--window-size=1400,1000",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def eventually(check: Callable[[], T | None], what: str, timeout_s: float = 30.0) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:.0f}s")
        time.sleep(0.2)


def screenshot(driver: Any, name: str) -> Path:
    """The whole page from its top, not just the window (Chrome DevTools' full capture)."""
    import base64

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    driver.execute_script("window.scrollTo(0, 0)")
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot",
        {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
        },
    )
    path = SCREENSHOTS / f"{name}.png"
    path.write_bytes(base64.b64decode(shot["data"]))
    return path


def page_errors(driver: Any) -> list[str]:
    """Script errors and blocked resources (a CSP violation shows up here too)."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def version_stage(driver: Any, version: str) -> str:
    from selenium.webdriver.common.by import By

    row = driver.find_element(By.CSS_SELECTOR, f'#versions tr[data-version="{version}"]')
    return str(row.find_element(By.CSS_SELECTOR, ".stage").text)


async def stream(settings: Settings) -> None:
    """Events one second of event time apart, each followed by its label."""
    encode_event, encode_label = codec("Event").encode, codec("Label").encode
    pairs = list(credit_events(EVENTS, seed=77, id_prefix="console"))
    await produce(
        settings, "events.raw", [(e["entity_id"].encode(), encode_event(e)) for e, _ in pairs]
    )
    labels = [
        (
            e["event_id"].encode(),
            encode_label(
                {"event_id": e["event_id"], "value": y, "label_time": e["event_time"] + 5_000}
            ),
        )
        for e, y in pairs
    ]
    await produce(settings, "labels", labels)


async def wait_for(
    client: httpx.AsyncClient, path: str, ready: Callable[[Any], bool], timeout_s: float = 90.0
) -> Any:
    deadline = time.monotonic() + timeout_s
    body: Any = None
    while time.monotonic() < deadline:
        response = await client.get(path)
        if response.status_code == 200:
            body = response.json()
            if ready(body):
                return body
        await asyncio.sleep(0.3)
    raise AssertionError(f"{path} never got there in {timeout_s:.0f}s: {str(body)[:2000]}")


@needs_browser
async def test_the_console_in_a_browser_during_a_stream(
    settings: Settings, trained_model: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    port = free_port()
    settings = settings.replace(label_join_tumbling_s=60, label_join_publish_interval_s=0.5)
    # The query service on its own port, with the token (secrets never travel in the
    # settings a test hands to a process: see service_env).
    served = settings.replace(api_host="127.0.0.1", api_port=port, console_refresh_s=2)
    processes = {
        name: ServiceProcess(
            name,
            served if name == "query" else settings,
            tmp_path,
            **({"SCOREMESH_API_TOKEN": TOKEN} if name == "query" else {}),
        )
        for name in SERVICES
    }
    base = f"http://127.0.0.1:{port}"
    try:
        for process in processes.values():
            process.start()
        for process in processes.values():
            await wait_for_log(process, "service started", timeout_s=90)
        auth = settings.replace(api_token=SecretStr(TOKEN))
        for version, stage in (("1.0.0", "champion"), ("1.1.0", None)):
            outcome = await register_model(
                auth, trained_model.onnx, version, stage=stage, metadata=trained_model.metadata
            )
            assert outcome["outcome"] == "applied", outcome
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            await wait_for(client, "/readyz", lambda b: True, timeout_s=60)
            await stream(settings)
            # Drift as the monitor publishes it on monitoring.stats (window_kind "drift").
            await publish_stats(settings, [drift_record("1.0.0", e, 0.04 * e) for e in range(8)])
            # A real alert: the registry refuses a command, the monitor raises it.
            refused = await client.post(
                "/v1/models/credit/promote",
                json={"version": "9.9.9", "stage": "champion", "reason": "no such version"},
                headers={"Authorization": f"Bearer {TOKEN}"},
            )
            assert refused.status_code == 409, refused.text
            await wait_for(
                client,
                "/v1/alerts",
                lambda b: any("deployment_refused" in a["alert_key"] for a in b["alerts"]),
            )
            await wait_for(
                client,
                "/console/models/credit/charts.json",
                lambda b: (
                    bool(b["data"]["performance"])
                    and len(b["data"]["performance"][0]["data"]) >= 3
                    and bool(b["data"]["psi"])
                ),
            )

        with chromium() as driver:
            driver.get(f"{base}/console")
            row = driver.find_element(By.CSS_SELECTOR, '#models tr[data-model="credit"]')
            assert "1.0.0" in row.text
            assert "open alert" in driver.find_element(By.ID, "firing-total").text
            screenshot(driver, "overview")

            driver.get(f"{base}/console/models/credit")
            assert version_stage(driver, "1.0.0") == "champion"
            assert version_stage(driver, "1.1.0") == "registered"
            points = eventually(
                lambda: driver.execute_script(
                    "const c = window.scoremeshCharts && window.scoremeshCharts.performance;"
                    "const chart = c && c.getChartObject();"
                    "return chart && chart.data.datasets.length ? chart.data.datasets[0].data.length : 0;"
                ),
                "the accuracy chart drawn with points",
            )
            assert points >= 3
            assert (
                driver.find_element(By.CSS_SELECTOR, "#chart-performance canvas").size["height"]
                > 100
            )
            assert driver.find_element(By.CSS_SELECTOR, "#chart-psi canvas")
            assert "deployment_refused.promote" in driver.find_element(By.ID, "model-alerts").text
            assert not driver.find_elements(By.CSS_SELECTOR, "form.promote"), "no buttons read-only"
            assert page_errors(driver) == []
            screenshot(driver, "model")

            driver.get(f"{base}/console/alerts")
            alert = driver.find_element(By.CSS_SELECTOR, 'tr.alert[data-key*="deployment_refused"]')
            assert "refused" in alert.text
            assert (
                alert.find_element(By.CSS_SELECTOR, "a.runbook")
                .get_attribute("href")
                .endswith("/console/runbooks#deployment")
            )
            screenshot(driver, "alerts")

            # Without the token: a promote posted anyway (as a forged form would) is refused.
            driver.execute_script(
                "const f = document.createElement('form'); f.method = 'post';"
                "f.action = '/console/models/credit/promote';"
                "for (const [k, v] of [['version', '1.1.0'], ['stage', 'champion']]) {"
                "  const i = document.createElement('input'); i.name = k; i.value = v; f.appendChild(i); }"
                "document.body.appendChild(f); f.submit();"
            )
            eventually(lambda: driver.find_elements(By.ID, "error-title"), "the refusal page")
            assert driver.find_element(By.ID, "error-title").text == "Sign in first"
            screenshot(driver, "refused")
            assert [e for e in page_errors(driver) if "401 (Unauthorized)" not in e] == []
            driver.get(f"{base}/console/models/credit")
            assert version_stage(driver, "1.1.0") == "registered", "nothing changed"

            # With the token: sign in, promote 1.1.0 to champion from its row.
            driver.find_element(By.ID, "sign-in").click()
            driver.find_element(By.NAME, "name").send_keys("alice")
            driver.find_element(By.NAME, "token").send_keys(TOKEN)
            driver.find_element(By.CSS_SELECTOR, "#login-form button").click()
            eventually(lambda: driver.find_elements(By.ID, "signed-in"), "signed in")
            assert driver.current_url.endswith("/console/models/credit")
            form = driver.find_element(By.CSS_SELECTOR, 'form.promote[data-version="1.1.0"]')
            Select(form.find_element(By.NAME, "stage")).select_by_value("champion")
            form.find_element(By.NAME, "reason").send_keys("browser test")
            form.find_element(By.CSS_SELECTOR, "button").click()
            result = eventually(
                lambda: driver.find_elements(By.ID, "result"), "the action's result"
            )
            assert "Done" in result[0].text and "champion" in result[0].text, result[0].text
            assert "console:alice" in result[0].text and "browser test" in result[0].text

            def promoted() -> bool:
                driver.refresh()
                return version_stage(driver, "1.1.0") == "champion"

            eventually(promoted, "1.1.0 shown as champion")
            assert version_stage(driver, "1.0.0") != "champion"
            assert page_errors(driver) == []
            screenshot(driver, "model-after-promote")

            driver.get(f"{base}/console/models/credit/versions/1.1.0")
            assert "champion" in driver.find_element(By.ID, "version-stage").text
            assert "console:alice" in driver.find_element(By.ID, "deployments").text
            screenshot(driver, "version")
    finally:
        for process in processes.values():
            if process.proc is not None and process.proc.poll() is None:
                process.terminate()
