"""The console in-process (ASGI, lifespan run) against the embedded broker and Redis: what
the pages show, and who may act."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from scoremesh.contract.codec import codec
from services.common.settings import Settings
from services.registry.service import RegistryService
from tests.conftest import Running
from tests.console.factories import (
    alert_record,
    drift_record,
    performance_record,
    publish_stats,
    write_alerts,
)
from tests.helpers import consume_until, produce, register_model
from tests.query.conftest import TOKEN, api, wait_ready

pytestmark = pytest.mark.integration


@dataclass
class Console:
    settings: Settings
    client: httpx.AsyncClient


async def charts_filled(
    client: httpx.AsyncClient, path: str, timeout_s: float = 20.0
) -> dict[str, Any]:
    """Wait until the history followed monitoring.stats far enough to draw every chart."""
    deadline = time.monotonic() + timeout_s
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        body = (await client.get(path)).json()
        data = body["data"]
        if all(
            data[k] and len(data[k][0]["data"]) >= 3
            for k in ("performance", "coverage", "psi", "ks")
        ):
            return body
        await asyncio.sleep(0.1)
    raise AssertionError(f"charts not filled in {timeout_s}s: {body}")


@pytest.fixture(scope="module")
async def console(module_settings: Settings, trained_model: Any) -> AsyncIterator[Console]:
    """credit@1.0.0 champion and 1.1.0 registered, windows, drift and alerts published,
    the API up with a token configured and the registry running."""
    settings = module_settings.replace(api_token=SecretStr(TOKEN))
    async with Running(RegistryService(settings)):
        for version, stage in (("1.0.0", "champion"), ("1.1.0", None)):
            outcome = await register_model(
                settings, trained_model.onnx, version, stage=stage, metadata=trained_model.metadata
            )
            assert outcome["outcome"] == "applied", outcome
        stats = [performance_record("1.0.0", w, 0.9 - 0.01 * w) for w in range(6)]
        stats += [performance_record("1.0.0", w, 0.7, segment="channel=web") for w in range(6)]
        stats += [drift_record("1.0.0", e, 0.05 * e) for e in range(5)]
        stats.append({**performance_record("1.0.0", 0, 0.5), "window_kind": "sliding"})
        two_days_ago = int(time.time() * 1000) - 2 * 86_400_000  # before console.history_s
        stats.append(performance_record("0.9.0", 0, 0.5, emitted_at=two_days_ago))
        await publish_stats(settings, stats)
        await write_alerts(
            settings,
            [
                alert_record("psi.age", severity="critical"),
                alert_record("accuracy", kind="performance", state="resolved", severity="warning"),
                alert_record(
                    "psi.loan",
                    evidence={"runbook_url": "javascript:alert(1)", "note": "<b>bold</b>"},
                ),
            ],
        )
        async with api(settings) as client:
            await wait_ready(client)
            await charts_filled(client, "/console/models/credit/charts.json")
            yield Console(settings, client)


async def test_the_overview_lists_models_with_champion_and_open_alerts(console: Console) -> None:
    page = await console.client.get("/console")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    row = re.search(r'<tr data-model="credit">(.*?)</tr>', html, re.S)
    assert row is not None, html
    assert "1.0.0" in row[1] and ">2<" in row[1]  # champion, two versions
    assert "2 open alerts" in html and "register" in html  # the deployment log
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY"


async def test_the_model_page_shows_versions_charts_alerts_and_the_log(console: Console) -> None:
    html = (await console.client.get("/console/models/credit")).text
    assert re.search(r'data-version="1.1.0">.*?stage-registered', html, re.S)
    assert re.search(r'data-version="1.0.0">.*?stage-champion', html, re.S)
    assert 'id="chart-performance"' in html and 'id="chart-psi"' in html
    data = re.search(
        r'<script type="application/json" id="chart-data"[^>]*>(.*?)</script>', html, re.S
    )
    assert data is not None and '"1.0.0 champion"' in data[1] and '"score"' in data[1]
    assert "channel=web" in html  # a segment to pick
    assert "psi.age" in html and "accuracy" in html  # open and recently resolved alerts
    assert 'href="/console/runbooks#drift"' in html
    assert 'href="javascript:' not in html, "an alert's evidence never becomes a link it names"
    assert "&lt;b&gt;bold&lt;/b&gt;" in html, "evidence is escaped"
    assert "promote</button>" not in html, "no buttons without signing in"
    assert "register" in html and "test" in html  # who registered, in the deployment log


async def test_charts_follow_metric_segment_and_drift_version(console: Console) -> None:
    body = (
        await console.client.get("/console/models/credit/charts.json?segment=channel%3Dweb")
    ).json()
    (line,) = body["data"]["performance"]  # neither the sliding window nor 0.9.0's old one
    assert line["name"] == "1.0.0 champion" and {v for _, v in line["data"]} == {0.7}
    body = (await console.client.get("/console/models/credit/charts.json?metric=f1")).json()
    assert [ln["name"] for ln in body["data"]["performance"]] == ["1.0.0 champion"]
    assert body["data"]["performance"][0]["data"][1][1] == pytest.approx(0.89)
    psi = {ln["name"]: ln["data"] for ln in body["data"]["psi"]}
    assert set(psi) == {"score", "age", "salary", "loan"}
    assert psi["loan"][-1][1] == pytest.approx(0.6)  # 0.05 * 4 * 3
    by_segment = (
        await console.client.get("/console/models/credit/charts.json?version=1.0.0")
    ).json()
    assert {ln["name"] for ln in by_segment["data"]["performance"]} == {"all", "channel=web"}


async def test_the_version_page_shows_metadata_features_and_its_history(console: Console) -> None:
    page = await console.client.get("/console/models/credit/versions/1.0.0")
    assert page.status_code == 200
    html = page.text
    assert "holdout_metrics" in html and "sha256" in html and "age" in html
    assert 'id="recipe"' in html and "register" in html and "champion" in html
    missing = await console.client.get("/console/models/credit/versions/9.9.9")
    assert missing.status_code == 404 and "versions: 1.0.0, 1.1.0" in missing.text
    unknown = await console.client.get("/console/models/nope")
    assert unknown.status_code == 404 and "known models: credit" in unknown.text


async def test_the_alerts_page_filters_and_links_runbooks(console: Console) -> None:
    firing = (await console.client.get("/console/alerts")).text
    assert (
        "psi.age" in firing
        and "psi.loan" in firing
        and 'data-key="credit/1.0.0/accuracy"' not in firing
    )
    every = (await console.client.get("/console/alerts?state=all&severity=warning")).text
    assert 'data-key="credit/1.0.0/accuracy"' in every and "psi.age" not in every
    assert "/console/runbooks#performance" in every
    bad = await console.client.get("/console/alerts?state=open")
    assert bad.status_code == 400 and "firing, resolved, all" in bad.text
    runbooks = (await console.client.get("/console/runbooks")).text
    assert all(f'id="{kind}"' in runbooks for kind in ("drift", "performance", "other"))


async def test_assets_come_from_the_installed_chart_package(console: Console) -> None:
    chart = await console.client.get(
        "/console/static/chart/Chart.bundle.js", headers={"accept-encoding": "gzip"}
    )
    assert chart.status_code == 200 and "Chart.js v4" in chart.text[:200]
    assert chart.headers["content-encoding"] == "gzip"
    again = await console.client.get(
        "/console/static/chart/chartkick.js", headers={"if-none-match": chart.headers["etag"]}
    )
    assert again.status_code == 200 and "Chartkick" in again.text[:200]
    etag = again.headers["etag"]
    assert (
        await console.client.get(
            "/console/static/chart/chartkick.js", headers={"if-none-match": etag}
        )
    ).status_code == 304
    assert (await console.client.get("/console/static/chart/../../app.py")).status_code == 404
    assert (await console.client.get("/console/static/own/console.js")).status_code == 200


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', html)
    assert found is not None, "no CSRF token on a signed-in page"
    return found[1]


async def test_actions_need_the_token_and_a_form_from_the_console(console: Console) -> None:
    client = console.client
    form = {"version": "1.1.0", "stage": "shadow", "reason": "try it"}
    refused = await client.post("/console/models/credit/promote", data=form)
    assert refused.status_code == 401 and "Sign in first" in refused.text
    wrong = await client.post("/console/login", data={"name": "alice", "token": "nope"})
    assert wrong.status_code == 401 and "not the API token" in wrong.text
    bad_name = await client.post("/console/login", data={"name": "a b", "token": TOKEN})
    assert bad_name.status_code == 422
    signed = await client.post(
        "/console/login", data={"name": "alice", "token": TOKEN, "next": "//evil.example"}
    )
    assert signed.status_code == 303 and signed.headers["location"] == "/console"
    cookie = signed.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and TOKEN not in cookie
    try:
        page = await client.get("/console/models/credit")
        assert "signed in as <b>alice</b>" in page.text and "promote</button>" in page.text
        csrf = _csrf(page.text)
        forged = await client.post("/console/models/credit/promote", data=form)
        assert forged.status_code == 403 and "did not come from this console" in forged.text
        other_site = await client.post(
            "/console/models/credit/promote",
            data={**form, "csrf": csrf},
            headers={"origin": "http://evil.example"},
        )
        assert other_site.status_code == 403
        invalid = await client.post(
            "/console/models/credit/promote", data={**form, "stage": "boss", "csrf": csrf}
        )
        assert invalid.status_code == 422 and "nothing was sent" in invalid.text

        done = await client.post("/console/models/credit/promote", data={**form, "csrf": csrf})
        assert done.status_code == 303, done.text
        result = await client.get(done.headers["location"])
        assert 'class="result applied"' in result.text
        assert re.search(
            r'data-version="1.1.0">.*?stage-shadow', result.text, re.S
        ) or await _stage_soon(client, "1.1.0", "shadow")
        assert "console:alice" in result.text and "try it" in result.text  # who and why

        refusal = await client.post(
            "/console/models/credit/promote",
            data={"version": "7.7.7", "stage": "champion", "csrf": csrf},
        )
        shown = await client.get(refusal.headers["location"])
        assert 'class="result refused"' in shown.text and "7.7.7" in shown.text

        back = await client.post(
            "/console/models/credit/rollback",
            data={"version": "1.1.0", "csrf": csrf, "back_version": "1.1.0"},
        )
        assert back.headers["location"].startswith("/console/models/credit/versions/1.1.0?result=")
        assert "rollback" in (await client.get(back.headers["location"])).text
    finally:
        client.cookies.clear()


async def _stage_soon(
    client: httpx.AsyncClient, version: str, stage: str, timeout_s: float = 10.0
) -> bool:
    """The registry view follows models.registry; a page shows a change once it arrives."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        html = (await client.get("/console/models/credit")).text
        if re.search(rf'data-version="{re.escape(version)}">.*?stage-{stage}', html, re.S):
            return True
        await asyncio.sleep(0.1)
    return False


async def test_the_bearer_token_acts_without_a_session(console: Console) -> None:
    client = console.client
    wrong = await client.post(
        "/console/models/credit/promote",
        data={"version": "1.1.0", "stage": "shadow"},
        headers={"authorization": "Bearer wrong"},
    )
    assert wrong.status_code == 401
    done = await client.post(
        "/console/models/credit/promote",
        data={"version": "1.1.0", "stage": "shadow", "reason": "scripted"},
        headers={"authorization": f"Bearer {TOKEN}"},
    )
    assert done.status_code == 303
    assert "console:bearer" in (await client.get(done.headers["location"])).text


async def test_without_a_configured_token_the_console_is_read_only(settings: Settings) -> None:
    async with api(settings) as client:
        page = await client.get("/console/login")
        assert (
            "no API token configured" in page.text and "<form" not in page.text.split("<main>")[1]
        )
        login = await client.post("/console/login", data={"name": "alice", "token": "x"})
        assert login.status_code == 403
        act = await client.post(
            "/console/models/credit/promote", data={"version": "1.0.0", "stage": "champion"}
        )
        assert act.status_code == 403 and "SCOREMESH_API_TOKEN" in act.text


async def test_reads_can_require_the_token(settings: Settings) -> None:
    guarded = settings.replace(api_token=SecretStr(TOKEN), api_require_token_for_reads=True)
    async with api(guarded) as client:
        page = await client.get("/console/alerts?state=all")
        assert page.status_code == 303
        assert page.headers["location"] == "/console/login?next=/console/alerts%3Fstate%3Dall"
        with_bearer = await client.get(
            "/console/runbooks", headers={"authorization": f"Bearer {TOKEN}"}
        )
        assert with_bearer.status_code == 200
        # the login page and the assets stay reachable
        assert (await client.get("/console/login")).status_code == 200


async def test_retrain_publishes_a_request_and_shows_the_trainers_answer(console: Console) -> None:
    client = console.client
    refused = await client.post("/console/models/credit/retrain", data={"reason": "drift"})
    assert refused.status_code == 401
    await client.post("/console/login", data={"name": "bob", "token": TOKEN})
    try:
        csrf = _csrf((await client.get("/console/models/credit")).text)
        bad = await client.post(
            "/console/models/credit/retrain", data={"window_days": "-3", "csrf": csrf}
        )
        assert bad.status_code == 422 and "days above 0" in bad.text
        sent = await client.post(
            "/console/models/credit/retrain",
            data={"reason": "psi.age drifted", "window_days": "2", "csrf": csrf},
        )
        assert sent.status_code == 303, sent.text
        request_id = sent.headers["location"].split("retrain=")[1].split("#")[0]
        (request,) = [
            r
            for r in await consume_until(
                console.settings,
                "retrain.requests",
                lambda rs: any(r["request_id"] == request_id for r in rs),
            )
            if r["request_id"] == request_id
        ]
        assert request["actor"] == "console:bob" and request["reason"] == "manual: psi.age drifted"
        assert request["window_end"] - request["window_start"] == 2 * 86_400_000
        waiting = await client.get(sent.headers["location"])
        assert (
            "Retrain requested" in waiting.text and "no answer from the trainer yet" in waiting.text
        )
        answer = {
            "request_id": request_id,
            "model": "credit",
            "status": "succeeded",
            "attempt": 1,
            "version": "1.2.0",
            "parent_version": "1.0.0",
            "detail": "better than the champion on the recent window",
            "window_start": request["window_start"],
            "window_end": request["window_end"],
            "trainer": "test",
            "at": int(time.time() * 1000),
        }
        await produce(
            console.settings,
            "retrain.results",
            [(b"credit", codec("RetrainResult").encode(answer))],
        )
        done = await client.get(sent.headers["location"])
        assert 'class="retrain-status">succeeded<' in done.text and "1.2.0" in done.text
    finally:
        client.cookies.clear()
