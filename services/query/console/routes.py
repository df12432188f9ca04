"""The console's routes under ``/console``: pages, their chart data, assets, sign-in, actions.

Pages are rendered on the server (Jinja2) from what the query service already holds: the
folded registry, deployments.log, the monitor's alert read model in Redis, and the
monitoring.stats history. Reads are open unless the server requires the token for reads.
Actions (promote, rollback, retrain) need a signed-in session (or the bearer token) and a
CSRF token, and go through the registry exactly as the API's routes do; the page they
return to shows the deployment-log record that answered them.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
from typing import Any
from urllib.parse import parse_qs, quote

import orjson
from aiokafka.errors import KafkaError
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from pydantic import ValidationError
from redis.exceptions import RedisError

from scoremesh.contract.records import DeploymentEvent, ModelCommand
from services.common.kafka import KafkaUnavailable
from services.common.model_version import ModelVersion
from services.common.retraining import latest_result, manual_request, publish_request
from services.common.settings import ConsoleSettings, Settings
from services.query.console import views
from services.query.console.assets import Assets
from services.query.console.history import PERFORMANCE_KIND
from services.query.console.session import (
    COOKIE,
    NAME_PATTERN,
    NAME_RULE,
    Session,
    csrf_ok,
    csrf_token,
    open_session,
    read_session,
)
from services.query.problems import Problem
from services.query.routers.models import promote_command, rollback_command, send_and_wait
from services.query.runtime import QueryRuntime
from services.query.schemas import MODEL_NAME, SEMVER, PromoteIn, RollbackIn

log = logging.getLogger(__name__)

PREFIX = "/console"
router = APIRouter(prefix=PREFIX, include_in_schema=False)

_MODEL = re.compile(MODEL_NAME)
_SEMVER = re.compile(SEMVER)
_REQUEST_ID = re.compile(r"^[0-9a-f-]{8,64}$")
DEPLOYMENTS_SHOWN = 50
ALERTS_SHOWN = 20
MAX_FORM_BYTES = 16 * 1024
SECURITY_HEADERS = {
    # Scripts and styles only from this server (no inline script: chart data travels in
    # JSON blocks the console's own script reads); never framed (the buttons change models).
    "content-security-policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
}


class ConsoleError(Exception):
    """An HTML error page: what went wrong and what to do."""

    def __init__(self, status: int, title: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail


class SignInRequired(Exception):
    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


class Console:
    """The template environment and the assets, built once per app."""

    def __init__(self) -> None:
        self.env = Environment(
            loader=PackageLoader("services.query.console", "templates"),
            autoescape=select_autoescape(["html"]),
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters["when"] = views.when
        self.env.filters["pct"] = lambda v: "-" if v is None else f"{100 * float(v):.1f}%"
        self.env.filters["num"] = _num
        self.env.filters["show"] = _show
        self.assets = Assets()

    def render(
        self, request: Request, template: str, status: int = 200, **context: Any
    ) -> Response:
        session = signed_in(request)
        token = _token(request)
        cookie = request.cookies.get(COOKIE)
        html = self.env.get_template(template).render(
            request_path=request.url.path,
            # where signing in returns to: this page, unless it answered a form
            next_path=request.url.path if request.method == "GET" else PREFIX,
            session=session,
            csrf=csrf_token(token, cookie) if session and token and cookie else "",
            actions_enabled=token is not None,
            chart_version=self.assets.chart_version,
            **context,
        )
        return HTMLResponse(html, status_code=status, headers=page_headers())


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _show(value: Any) -> str:
    """A metadata value for people: numbers rounded, structures as compact JSON."""
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict | list):
        return orjson.dumps(_rounded(value)).decode()
    return str(value)


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def page_headers() -> dict[str, str]:
    return {**SECURITY_HEADERS, "cache-control": "no-store"}


def install(app: FastAPI) -> None:
    """Mount the console on the query app (``console_enabled``)."""
    app.state.console = Console()
    app.include_router(router)

    async def on_console_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ConsoleError)
        return _console(request).render(
            request, "error.html", exc.status, title=exc.title, detail=exc.detail
        )

    async def on_sign_in(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, SignInRequired)
        target = f"{PREFIX}/login?next={quote(exc.next_path, safe='/')}"
        return RedirectResponse(target, status_code=303, headers=page_headers())

    app.add_exception_handler(ConsoleError, on_console_error)
    app.add_exception_handler(SignInRequired, on_sign_in)


# --- access ------------------------------------------------------------------------------


def _console(request: Request) -> Console:
    console: Console = request.app.state.console
    return console


def _settings(request: Request) -> ConsoleSettings:
    settings: Settings = request.app.state.settings
    return settings.console


def _runtime(request: Request) -> QueryRuntime:
    runtime: QueryRuntime | None = getattr(request.app.state, "runtime", None)
    if runtime is None:
        raise ConsoleError(503, "Starting", "the query service is starting; reload in a moment")
    return runtime


def _token(request: Request) -> str | None:
    configured = request.app.state.settings.api.token
    if configured is None or not configured.get_secret_value():
        return None
    return str(configured.get_secret_value())


def _bearer_ok(request: Request, token: str) -> bool:
    scheme, _, sent = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(sent.strip().encode(), token.encode())


def signed_in(request: Request) -> Session | None:
    token = _token(request)
    if token is None:
        return None
    ttl = _settings(request).session_ttl_s
    return read_session(token, request.cookies.get(COOKIE), _now_ms(), ttl)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _may_read(request: Request) -> None:
    """Pages are open unless the server requires the token for reads too."""
    if not request.app.state.config.require_token_for_reads:
        return
    token = _token(request)
    if token is not None and (signed_in(request) or _bearer_ok(request, token)):
        return
    path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    raise SignInRequired(path)


async def _form(request: Request) -> dict[str, str]:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        raise ConsoleError(415, "Not a form", "send the console's forms as the browser does")
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise ConsoleError(
            413, "Form too large", f"a console form is at most {MAX_FORM_BYTES} bytes"
        )
    try:
        parsed = parse_qs(
            body.decode(), keep_blank_values=True, max_num_fields=20, strict_parsing=False
        )
    except (UnicodeDecodeError, ValueError) as exc:
        raise ConsoleError(400, "Unreadable form", f"the form could not be read: {exc}") from exc
    return {k: v[-1] for k, v in parsed.items()}


def _same_origin(request: Request) -> bool:
    """A browser names the page a form came from; it must be this server (as the browser
    reached it, so behind a proxy its forwarded host counts too)."""
    origin = request.headers.get("origin")
    if origin is None:
        return True  # older browsers send none; the CSRF token still has to match
    hosts = {request.headers.get("host"), request.headers.get("x-forwarded-host")}
    return origin.split("://", 1)[-1] in hosts


def _authorize(request: Request, form: dict[str, str]) -> Session:
    """Who may act: a signed-in session with the form's CSRF token, or the bearer token."""
    token = _token(request)
    if token is None:
        raise ConsoleError(
            403,
            "Actions are disabled",
            "this server has no API token configured, so nothing can be changed from the "
            "console or the API; set SCOREMESH_API_TOKEN on the query service to enable them",
        )
    if request.headers.get("authorization"):
        if not _bearer_ok(request, token):
            raise ConsoleError(401, "Wrong token", "the bearer token is wrong")
        return Session(_now_ms(), "bearer")
    session = signed_in(request)
    if session is None:
        raise ConsoleError(
            401,
            "Sign in first",
            "promote, rollback and retrain need the API token: sign in with it, then try again",
        )
    if not _same_origin(request) or not csrf_ok(
        token, request.cookies.get(COOKIE), form.get("csrf")
    ):
        raise ConsoleError(
            403,
            "Form refused",
            "this form did not come from this console page (or it is older than your "
            "sign-in); reload the page and try again",
        )
    return session


# --- data --------------------------------------------------------------------------------


def _model_name(name: str) -> str:
    if not _MODEL.match(name):
        raise ConsoleError(404, "No such model", f"{name!r} is not a model name")
    return name


def _versions(runtime: QueryRuntime, name: str) -> list[ModelVersion]:
    if not runtime.view.ready.is_set():
        raise ConsoleError(
            503, "Reading the registry", "models.registry is still being read; reload shortly"
        )
    versions = runtime.view.state.of_model(name)
    if not versions:
        known = ", ".join(runtime.view.state.models()) or "none yet"
        raise ConsoleError(404, "No such model", f"no model named {name!r} (known models: {known})")
    return versions


async def _deployments(runtime: QueryRuntime, warnings: list[str]) -> list[DeploymentEvent]:
    try:
        return await runtime.history()
    except (KafkaUnavailable, KafkaError, OSError) as exc:
        warnings.append(f"deployments.log could not be read: {exc}")
        return []


async def _alerts(runtime: QueryRuntime, state: str, warnings: list[str]) -> list[dict[str, Any]]:
    if runtime.alerts is None:
        warnings.append("this server has no Redis (SCOREMESH_REDIS_URL), so no alerts are shown")
        return []
    try:
        return await runtime.alerts.alerts(state)
    except (RedisError, OSError) as exc:
        warnings.append(f"the alert read model (Redis) did not answer: {exc}")
        return []


def _history_note(runtime: QueryRuntime) -> str | None:
    follower = runtime.stats_follower
    if follower is None:
        return "the console's history is off (console_enabled=false)"
    if follower.error:
        return f"monitoring.stats cannot be read right now ({follower.error}); retrying"
    if not follower.caught_up.is_set():
        return "reading monitoring.stats: the charts fill in as the history is read"
    return None


def _charts(
    runtime: QueryRuntime, name: str, params: dict[str, str], version: str | None
) -> dict[str, Any]:
    """Everything the charts of a model page (or a version page) draw, for the page and for
    its live refresh (``charts.json``)."""
    history = runtime.stats_history
    metrics = views.performance_metrics(history, name)
    metric = views.pick_metric(metrics, params.get("metric"))
    segments = history.segments(name, version)
    if version is None:
        segment = params.get("segment") if params.get("segment") in segments else "all"
        performance = views.performance_lines(history, name, metric, segment=segment)
        coverage = views.performance_lines(history, name, "coverage", segment=segment)
    else:
        segment = None
        performance = views.performance_lines(
            history, name, metric, segment=None, version=version, by="segment"
        )
        coverage = views.performance_lines(
            history, name, "coverage", segment=None, version=version, by="segment"
        )
    champion = runtime.view.state.champion(name)
    drift_version = version or views.pick_drift_version(
        history, name, champion.version if champion else None, params.get("drift")
    )
    drift = (
        views.drift_lines(history, name, drift_version) if drift_version else {"psi": [], "ks": []}
    )
    return {
        "metric": metric,
        "metrics": metrics,
        "segment": segment,
        "segments": segments,
        "drift_version": drift_version,
        "drift_versions": history.drift_versions(name),
        "drift_latest": views.latest_drift(history, name, drift_version) if drift_version else [],
        "data": {
            "performance": performance,
            "coverage": coverage,
            "psi": drift["psi"],
            "ks": drift["ks"],
        },
        "note": _history_note(runtime),
        "has_windows": bool(history.series(name, PERFORMANCE_KIND)),
    }


def _params(request: Request) -> dict[str, str]:
    return {
        k: v
        for k, v in request.query_params.items()
        if k in ("metric", "segment", "drift", "result", "retrain")
    }


# --- pages -------------------------------------------------------------------------------


@router.get("", response_class=HTMLResponse)
@router.get("/", response_class=HTMLResponse)
async def overview(request: Request) -> Response:
    _may_read(request)
    runtime = _runtime(request)
    warnings: list[str] = []
    ready = runtime.view.ready.is_set()
    state = runtime.view.state
    models = state.models() if ready else []
    deployments = await _deployments(runtime, warnings)
    firing = await _alerts(runtime, "firing", warnings)
    rows = views.model_rows(models, {m: state.of_model(m) for m in models}, firing, deployments)
    return _console(request).render(
        request,
        "overview.html",
        registry_ready=ready,
        rows=rows,
        firing=views.severity_counts(firing),
        firing_total=len(firing),
        recent=views.newest_first(deployments, 15),
        warnings=warnings,
        note=_history_note(runtime),
    )


@router.get("/models/{name}", response_class=HTMLResponse)
async def model_page(request: Request, name: str) -> Response:
    _may_read(request)
    runtime = _runtime(request)
    name = _model_name(name)
    versions = _versions(runtime, name)
    warnings: list[str] = []
    params = _params(request)
    deployments = [e for e in await _deployments(runtime, warnings) if e["model"] == name]
    firing = views.most_severe(
        views.filter_alerts(await _alerts(runtime, "firing", warnings), model=name)
    )
    resolved = views.filter_alerts(await _alerts(runtime, "resolved", warnings), model=name)
    base = _settings(request).runbook_url
    champion = runtime.view.state.champion(name)
    return _console(request).render(
        request,
        "model.html",
        name=name,
        versions=list(reversed(versions)),
        champion=champion,
        serving=_serving(runtime, name),
        charts=_charts(runtime, name, params, None),
        refresh_s=_settings(request).refresh_s,
        deployments=views.newest_first(deployments, DEPLOYMENTS_SHOWN),
        deployments_total=len(deployments),
        result=views.find_result(deployments, params.get("result")),
        result_id=params.get("result"),
        retrain=await _retrain_status(runtime, name, params.get("retrain"), warnings),
        firing=[views.alert_view(a, base) for a in firing[:ALERTS_SHOWN]],
        firing_total=len(firing),
        resolved=[views.alert_view(a, base) for a in resolved[:ALERTS_SHOWN]],
        warnings=warnings,
        promote_stages=("shadow", "canary", "champion", "retired"),
    )


@router.get("/models/{name}/versions/{version}", response_class=HTMLResponse)
async def version_page(request: Request, name: str, version: str) -> Response:
    _may_read(request)
    runtime = _runtime(request)
    name = _model_name(name)
    versions = _versions(runtime, name)
    held = (
        next((v for v in versions if v.version == version), None)
        if _SEMVER.match(version)
        else None
    )
    if held is None:
        known = ", ".join(v.version for v in versions)
        raise ConsoleError(
            404, "No such version", f"{name} has no version {version!r} (versions: {known})"
        )
    warnings: list[str] = []
    params = _params(request)
    deployments = [e for e in await _deployments(runtime, warnings) if e["model"] == name]
    mine = [e for e in deployments if e.get("version") == version]
    firing = views.most_severe(
        a
        for a in await _alerts(runtime, "firing", warnings)
        if a.get("model") == name and a.get("model_version") == version
    )
    resolved = [
        a
        for a in views.filter_alerts(await _alerts(runtime, "resolved", warnings), model=name)
        if a.get("model_version") == version
    ]
    shown = (firing[:ALERTS_SHOWN] + resolved)[:ALERTS_SHOWN]
    base = _settings(request).runbook_url
    return _console(request).render(
        request,
        "version.html",
        name=name,
        v=held,
        details=held.to_json(),
        meta=views.metadata_view(held),
        features=held.feature_spec.model_dump(mode="json").get("features", []),
        charts=_charts(runtime, name, params, version),
        refresh_s=_settings(request).refresh_s,
        deployments=views.newest_first(mine),
        result=views.find_result(deployments, params.get("result")),
        result_id=params.get("result"),
        alerts=[views.alert_view(a, base) for a in shown],
        alerts_firing=len(firing),
        warnings=warnings,
        promote_stages=("shadow", "canary", "champion", "retired"),
    )


@router.get("/models/{name}/charts.json")
async def charts_json(request: Request, name: str) -> Response:
    """The charts of a page, for its live refresh (same parameters as the page)."""
    _may_read(request)
    runtime = _runtime(request)
    name = _model_name(name)
    version = request.query_params.get("version")
    if version is not None and not _SEMVER.match(version):
        raise ConsoleError(404, "No such version", f"{version!r} is not a version")
    charts = _charts(runtime, name, _params(request), version)
    return JSONResponse(
        {"data": charts["data"], "note": charts["note"], "at": _now_ms()}, headers=page_headers()
    )


@router.get("/alerts", response_class=HTMLResponse)
async def alerts_page(request: Request) -> Response:
    _may_read(request)
    runtime = _runtime(request)
    q = request.query_params
    state = q.get("state", "firing")
    if state not in ("firing", "resolved", "all"):
        raise ConsoleError(400, "Unknown state", "state is one of firing, resolved, all")
    severity = q.get("severity") or None
    if severity not in (None, "info", "warning", "critical"):
        raise ConsoleError(400, "Unknown severity", "severity is one of info, warning, critical")
    model = q.get("model") or None
    if model is not None:
        _model_name(model)
    try:
        number = int(q.get("page", "1"))
    except ValueError:
        raise ConsoleError(400, "Bad page", "page is a whole number") from None
    warnings: list[str] = []
    found = await _alerts(runtime, state, warnings)
    picked = views.filter_alerts(found, model=model, severity=severity, text=q.get("q"))
    page = views.paginate(picked, number)
    base = _settings(request).runbook_url
    shown = [views.alert_view(a, base) for a in page.items]
    return _console(request).render(
        request,
        "alerts.html",
        page=page,
        shown=shown,
        state=state,
        severity=severity or "",
        model=model or "",
        text=q.get("q", ""),
        counts=views.severity_counts(picked),
        models=sorted({str(a.get("model")) for a in found}),
        warnings=warnings,
    )


@router.get("/runbooks", response_class=HTMLResponse)
async def runbooks(request: Request) -> Response:
    return _console(request).render(request, "runbooks.html", kinds=views.RUNBOOK_KINDS)


@router.get("/static/{group}/{file}")
async def static(request: Request, group: str, file: str) -> Response:
    asset = _console(request).assets.get(f"{group}/{file}")
    if asset is None:
        return Response("not found", status_code=404, media_type="text/plain")
    headers = {
        "etag": asset.etag,
        "cache-control": "public, max-age=86400",
        "x-content-type-options": "nosniff",
        "vary": "accept-encoding",
    }
    if request.headers.get("if-none-match") == asset.etag:
        return Response(status_code=304, headers=headers)
    if "gzip" in request.headers.get("accept-encoding", ""):
        return Response(
            asset.gzipped,
            media_type=asset.media_type,
            headers={**headers, "content-encoding": "gzip"},
        )
    return Response(asset.body, media_type=asset.media_type, headers=headers)


def _serving(runtime: QueryRuntime, name: str) -> dict[str, Any] | None:
    current = runtime.holder.current.models.get(name)
    if current is None:
        return None
    return {
        "champion": current.champion.key if current.champion else None,
        "challengers": [f"{v.key} ({v.stage})" for _, v in current.challengers],
        "failures": dict(current.failures),
    }


# --- sign-in -----------------------------------------------------------------------------


def _safe_next(target: str | None) -> str:
    if target and target.startswith(PREFIX) and not target.startswith("//") and "\\" not in target:
        return target
    return PREFIX


@router.get("/login", response_class=HTMLResponse)
async def login_form(request: Request) -> Response:
    return _console(request).render(
        request,
        "login.html",
        next=_safe_next(request.query_params.get("next")),
        error=None,
        name="",
    )


@router.post("/login")
async def login(request: Request) -> Response:
    form = await _form(request)
    target = _safe_next(form.get("next"))
    token = _token(request)
    name = form.get("name", "").strip()
    console = _console(request)
    if token is None:
        return console.render(
            request,
            "login.html",
            403,
            next=target,
            name=name,
            error=(
                "this server has no API token configured, so there is nothing to sign in to; "
                "set SCOREMESH_API_TOKEN on the query service to enable actions"
            ),
        )
    if not NAME_PATTERN.match(name):
        return console.render(
            request,
            "login.html",
            422,
            next=target,
            name="",
            error=(f"your name is recorded in the deployment log with every action: {NAME_RULE}"),
        )
    if not hmac.compare_digest(form.get("token", "").encode(), token.encode()):
        log.warning("console sign-in refused: wrong token", extra={"user": name})
        return console.render(
            request, "login.html", 401, next=target, name=name, error="that is not the API token"
        )
    cookie = open_session(token, name, _now_ms())
    response = RedirectResponse(target, status_code=303, headers=page_headers())
    response.set_cookie(
        COOKIE,
        cookie,
        max_age=int(_settings(request).session_ttl_s),
        path=PREFIX,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    log.info("console sign-in", extra={"user": name})
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    form = await _form(request)
    token = _token(request)
    if token is not None and not csrf_ok(token, request.cookies.get(COOKIE), form.get("csrf")):
        raise ConsoleError(403, "Form refused", "reload the page and sign out again")
    response = RedirectResponse(PREFIX, status_code=303, headers=page_headers())
    response.delete_cookie(COOKIE, path=PREFIX, httponly=True, samesite="strict")
    return response


# --- actions -----------------------------------------------------------------------------


def _invalid(exc: ValidationError) -> ConsoleError:
    what = "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'form'}: {e['msg']}" for e in exc.errors()
    )
    return ConsoleError(422, "Not sent", f"the form is not valid ({what}); nothing was sent")


async def _act(
    request: Request, runtime: QueryRuntime, name: str, cmd: ModelCommand, back: str
) -> Response:
    try:
        event = await send_and_wait(runtime, cmd)
    except Problem as exc:
        raise ConsoleError(exc.status, "No answer from the registry", exc.detail) from exc
    target = f"{back}?result={quote(event['request_id'])}#result"
    return RedirectResponse(target, status_code=303, headers=page_headers())


def _back(name: str, form: dict[str, str]) -> str:
    version = form.get("back_version", "")
    if version and _SEMVER.match(version):
        return f"{PREFIX}/models/{name}/versions/{version}"
    return f"{PREFIX}/models/{name}"


@router.post("/models/{name}/promote")
async def promote(request: Request, name: str) -> Response:
    form = await _form(request)
    session = _authorize(request, form)
    runtime = _runtime(request)
    name = _model_name(name)
    try:
        body = PromoteIn(
            version=form.get("version", ""),
            stage=form.get("stage", ""),  # type: ignore[arg-type]  # validated here
            percent=float(form["percent"]) if form.get("percent", "").strip() else None,
            reason=form.get("reason", ""),
        )
    except ValidationError as exc:
        raise _invalid(exc) from exc
    except ValueError as exc:
        raise ConsoleError(
            422, "Not sent", f"percent must be a number ({exc}); nothing was sent"
        ) from exc
    return await _act(
        request, runtime, name, promote_command(name, body, session.actor), _back(name, form)
    )


@router.post("/models/{name}/rollback")
async def rollback(request: Request, name: str) -> Response:
    form = await _form(request)
    session = _authorize(request, form)
    runtime = _runtime(request)
    name = _model_name(name)
    try:
        body = RollbackIn(version=form.get("version") or None, reason=form.get("reason", ""))
    except ValidationError as exc:
        raise _invalid(exc) from exc
    return await _act(
        request, runtime, name, rollback_command(name, body, session.actor), _back(name, form)
    )


@router.post("/models/{name}/retrain")
async def retrain(request: Request, name: str) -> Response:
    """A retrain request, as `scoremesh models retrain` and the API send it; the trainer
    answers on retrain.results and registers its version in the deployment log."""
    form = await _form(request)
    session = _authorize(request, form)
    runtime = _runtime(request)
    name = _model_name(name)
    _versions(runtime, name)
    if runtime.view.state.champion(name) is None:
        raise ConsoleError(
            409,
            "No champion",
            f"{name} has no champion, and a retrain starts from the champion's recipe; "
            "promote a version first",
        )
    reason = form.get("reason", "")
    if len(reason) > 500:
        raise ConsoleError(422, "Not sent", "the reason is at most 500 characters")
    days_text = form.get("window_days", "").strip()
    try:
        days = float(days_text) if days_text else None
    except ValueError:
        days = -1.0
    if days is not None and not 0 < days <= 3650:
        raise ConsoleError(422, "Not sent", "the window is a number of days above 0 (at most 3650)")
    now = _now_ms()
    window_s = days * 86400 if days else runtime.settings.retrain.policy.window_s
    req = manual_request(name, session.actor, reason, now, window_s, now)
    try:
        await publish_request(runtime.settings, req, producer=runtime.producer)
    except KafkaUnavailable as exc:
        raise ConsoleError(503, "Not sent", f"Kafka did not take the request: {exc}") from exc
    log.info(
        "retrain requested from the console",
        extra={"request_id": req["request_id"], "model": name, "actor": session.actor},
    )
    target = f"{PREFIX}/models/{name}?retrain={quote(req['request_id'])}#retrain"
    return RedirectResponse(target, status_code=303, headers=page_headers())


async def _retrain_status(
    runtime: QueryRuntime, name: str, request_id: str | None, warnings: list[str]
) -> dict[str, Any] | None:
    """What the trainer last said about a retrain request (None: not asked about one)."""
    if not request_id or not _REQUEST_ID.match(request_id):
        return None
    try:
        result = await latest_result(runtime.settings, request_id)
    except (KafkaUnavailable, KafkaError, OSError) as exc:
        warnings.append(f"retrain.results could not be read: {exc}")
        result = None
    if result is not None and result["model"] != name:
        result = None
    return {"request_id": request_id, "result": result}
