//! The operator dashboard: server-rendered pages and a JSON API over the
//! in-process operator protocol (`OperatorApi`), so every page and route
//! is scoped, checked for rights and audited by the same code as an
//! operator's MQTT request, for the signed-in identity.
//!
//! Why axum: it is already in the tree (rumqttd), routes and extractors
//! refuse malformed input with a status instead of a panic, and hyper's
//! HTTP/1.1 is the only protocol needed. Why server-rendered HTML with one
//! small script: no web build for anyone, nothing to keep in step with the
//! API, and every attacker-chosen string (ids, labels, reasons) passes one
//! escaping function (`compliance_html::esc`).
//!
//! Sign-in: `cityplane dashboard login` proves the operator's certificate
//! over mTLS and gets a one-time link (`cityplane_controller::signin`);
//! `/login` exchanges it for a session cookie (HttpOnly, SameSite=Strict,
//! random 128 bits, kept hashed, 8 hours). Every other request passes
//! [`guard`]: the Host must be the dashboard's own (DNS rebinding), a
//! session must be valid, and a state-changing request must carry the
//! session's CSRF token and come from the dashboard's own origin.

mod pages;
mod tls;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use cityplane_controller::signin::SignIns;
use cityplane_controller::{OperatorApi, Refusal};
use cityplane_proto::Identity;
use ring::rand::{SecureRandom, SystemRandom};
use serde_json::{json, Value};

/// How long a sign-in link may wait before it is used.
pub const LINK_TTL_MS: u64 = 60_000;
/// How long a session lasts (a working shift).
const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);
/// Sessions kept at most; the oldest go first.
const MAX_SESSIONS: usize = 4096;
/// Live updates at most this often per page.
const LIVE_EVERY: Duration = Duration::from_millis(500);
/// A form body's largest size.
const MAX_FORM: usize = 16 * 1024;
/// Devices per page of the device list.
pub const PAGE_SIZE: usize = 50;
const COOKIE: &str = "cityplane_session";
/// Dashboard requests in the controller's queue at most, whatever the
/// number of browsers: each is a pass over the fleet in the controller's
/// one loop, and device reports wait behind it.
const MAX_ASKS_IN_FLIGHT: usize = 4;

/// Whether the dashboard may listen on `addr`: beyond loopback only with
/// TLS (a session cookie over plain HTTP on a network is a stolen session).
pub fn check_address(addr: SocketAddr, tls: bool) -> anyhow::Result<()> {
    if !tls && !addr.ip().is_loopback() {
        bail!(
            "without TLS the dashboard listens on loopback only (127.0.0.1 or [::1]), not \
             {addr}: give it --dashboard-tls-cert and --dashboard-tls-key, or reach it \
             through an SSH tunnel"
        );
    }
    Ok(())
}

/// How the dashboard is served beyond the defaults.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// HTTPS with this certificate chain and key (PEM files).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// The address browsers use, `https://dashboard.city.example:8443`:
    /// the only Host and Origin accepted, and the sign-in links' base.
    /// Default: the bound address.
    pub url: Option<String>,
}

/// `scheme://host[:port]` of a public URL: (origin, host).
fn origin_of(url: &str, tls: bool) -> anyhow::Result<(String, String)> {
    let scheme = if tls { "https://" } else { "http://" };
    let host = url
        .strip_prefix(scheme)
        .map(|rest| rest.trim_end_matches('/'))
        .filter(|h| !h.is_empty() && !h.contains(['/', '?', '#', '@', ' ']))
        .with_context(|| {
            format!("--dashboard-url {url:?} must be {scheme}HOST[:PORT], the address browsers use")
        })?;
    Ok((format!("{scheme}{host}"), host.to_owned()))
}

/// A signed-in operator.
#[derive(Clone)]
pub struct Session {
    pub identity: Identity,
    /// Sent back with every state-changing request (a form field or the
    /// `x-csrf-token` header).
    pub csrf: String,
    expires: Instant,
}

struct Sessions {
    by_hash: Mutex<HashMap<[u8; 32], Session>>,
    rng: SystemRandom,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Session>> {
        // Each operation is one insert or remove: still consistent after a panic.
        self.by_hash.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn random(&self) -> anyhow::Result<String> {
        let mut raw = [0u8; 16];
        self.rng
            .fill(&mut raw)
            .map_err(|_| anyhow::anyhow!("the system random generator failed"))?;
        Ok(raw.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// A new session for `identity`: the cookie value and the session.
    fn open(&self, identity: Identity) -> anyhow::Result<(String, Session)> {
        let cookie = self.random()?;
        let session = Session {
            identity,
            csrf: self.random()?,
            expires: Instant::now() + SESSION_TTL,
        };
        let mut all = self.lock();
        let now = Instant::now();
        all.retain(|_, s| s.expires > now);
        if all.len() >= MAX_SESSIONS {
            if let Some(oldest) = all.iter().min_by_key(|(_, s)| s.expires).map(|(k, _)| *k) {
                all.remove(&oldest);
            }
        }
        all.insert(digest(&cookie), session.clone());
        Ok((cookie, session))
    }

    fn get(&self, cookie: &str) -> Option<Session> {
        let key = digest(cookie);
        let mut all = self.lock();
        match all.get(&key) {
            Some(s) if s.expires > Instant::now() => Some(s.clone()),
            Some(_) => {
                all.remove(&key);
                None
            }
            None => None,
        }
    }

    fn close(&self, cookie: &str) {
        self.lock().remove(&digest(cookie));
    }
}

fn digest(s: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Constant-time comparison of two secrets.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

pub(crate) struct Shared {
    api: OperatorApi,
    asks: tokio::sync::Semaphore,
    sign_ins: Arc<SignIns>,
    sessions: Sessions,
    /// Served over TLS: the session cookie is `Secure`.
    secure: bool,
    /// `127.0.0.1:8080`: the only Host the dashboard answers to.
    host: String,
    /// `http://127.0.0.1:8080`: the only Origin a state change may come from.
    origin: String,
}

type AppState = Arc<Shared>;

/// The dashboard's listener and its sign-in table, before it serves.
pub struct Dashboard {
    listener: tokio::net::TcpListener,
    sign_ins: Arc<SignIns>,
    tls: Option<Arc<rustls::ServerConfig>>,
    host: String,
    origin: String,
}

impl Dashboard {
    /// Binds `addr` (loopback only without TLS), reads the TLS files once,
    /// and makes the sign-in table the controller issues links into (so
    /// the controller can start with it).
    pub async fn bind(addr: SocketAddr, options: &Options) -> anyhow::Result<Dashboard> {
        check_address(addr, options.tls.is_some())?;
        let tls = match &options.tls {
            Some((cert, key)) => Some(tls::server_config(cert, key)?),
            None => None,
        };
        if addr.ip().is_unspecified() && options.url.is_none() {
            bail!(
                "the dashboard on {addr} needs --dashboard-url, the address browsers use \
                 (e.g. https://dashboard.city.example:{}): only that Host is answered",
                addr.port()
            );
        }
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the dashboard to {addr}"))?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let url = match &options.url {
            Some(url) => url.clone(),
            None => format!("{scheme}://{}", listener.local_addr()?),
        };
        let (origin, host) = origin_of(&url, tls.is_some())?;
        let sign_ins = Arc::new(SignIns::new(origin.clone(), LINK_TTL_MS));
        Ok(Dashboard {
            listener,
            sign_ins,
            tls,
            host,
            origin,
        })
    }

    pub fn sign_ins(&self) -> Arc<SignIns> {
        self.sign_ins.clone()
    }

    /// `http://127.0.0.1:PORT`, or the `--dashboard-url`.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Serves until `shutdown` resolves.
    pub async fn serve(
        self,
        api: OperatorApi,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let shared = Arc::new(Shared {
            api,
            asks: tokio::sync::Semaphore::new(MAX_ASKS_IN_FLIGHT),
            sign_ins: self.sign_ins,
            sessions: Sessions {
                by_hash: Mutex::new(HashMap::new()),
                rng: SystemRandom::new(),
            },
            secure: self.tls.is_some(),
            host: self.host,
            origin: self.origin,
        });
        let app = router(shared);
        match self.tls {
            Some(config) => tls::serve(self.listener, config, app, shutdown).await,
            None => axum::serve(self.listener, app)
                .with_graceful_shutdown(shutdown)
                .await
                .context("serving the dashboard"),
        }
    }
}

fn router(shared: AppState) -> Router {
    Router::new()
        .route("/login", get(login))
        .route("/logout", post(logout))
        .route("/", get(pages::fleet))
        .route("/devices", get(pages::devices))
        .route("/devices/:id", get(pages::device))
        .route("/documents", get(pages::documents))
        .route("/rollouts", get(pages::rollouts))
        .route("/rollouts/:name", get(pages::rollout))
        .route("/rollouts/:name/:action", post(rollout_control))
        .route("/compliance", get(pages::compliance))
        .route("/compliance/report.html", get(pages::compliance_report))
        .route("/audit", get(pages::audit))
        .route("/events", get(events))
        .route("/static/dashboard.js", get(script))
        .route("/static/dashboard.css", get(style))
        .route("/api/status", get(api_status))
        .route("/api/overview", get(api_overview))
        .route("/api/devices", get(api_devices))
        .route("/api/devices/:id", get(api_device))
        .route("/api/documents", get(api_documents))
        .route("/api/rollouts", get(api_rollouts))
        .route("/api/rollouts/:name", get(api_rollout))
        .route("/api/compliance", get(api_compliance))
        .route("/api/audit", get(api_audit))
        .fallback(not_found)
        // Every route, the fallback included: nothing answers before it.
        .layer(axum::middleware::from_fn_with_state(shared.clone(), guard))
        .with_state(shared)
}

/// An answer that is an error, as HTML for pages and JSON for the API.
pub(crate) struct Failure {
    status: StatusCode,
    message: String,
    json: bool,
}

impl Failure {
    fn new(status: StatusCode, message: impl Into<String>, json: bool) -> Failure {
        Failure {
            status,
            message: message.into(),
            json,
        }
    }

    fn from_refusal(r: Refusal, json: bool) -> Failure {
        let status = match r.code.as_str() {
            "not_found" => StatusCode::NOT_FOUND,
            "forbidden" | "out_of_scope" => StatusCode::FORBIDDEN,
            "unavailable" | "storage_unavailable" => StatusCode::SERVICE_UNAVAILABLE,
            "internal" => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::BAD_REQUEST,
        };
        Failure::new(status, format!("{}: {}", r.code, r.reason), json)
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        if self.json {
            (self.status, Json(json!({"error": self.message}))).into_response()
        } else {
            (self.status, pages::error_page(self.status, &self.message)).into_response()
        }
    }
}

/// One operator request as the signed-in identity.
pub(crate) async fn ask(
    state: &Shared,
    session: &Session,
    verb: &str,
    body: Value,
    json: bool,
) -> Result<Value, Failure> {
    let _turn = state.asks.acquire().await.map_err(|_| {
        Failure::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the dashboard is stopping",
            json,
        )
    })?;
    state
        .api
        .ask(&session.identity, verb, body)
        .await
        .map_err(|r| Failure::from_refusal(r, json))
}

fn cookie_of(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_owned())
}

/// Whether a state-changing request comes from the dashboard's own pages:
/// its Origin, or failing that its Referer, is the dashboard's origin.
fn same_origin(state: &Shared, headers: &HeaderMap) -> bool {
    let header = |name| {
        headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    match (header(header::ORIGIN), header(header::REFERER)) {
        (Some(origin), _) => origin == state.origin,
        (None, Some(referer)) => referer
            .strip_prefix(state.origin.as_str())
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/')),
        (None, None) => false,
    }
}

/// The CSRF token a request carries: the header, or the form's `csrf`.
fn csrf_of(headers: &HeaderMap, body: &[u8]) -> Option<String> {
    if let Some(v) = headers.get("x-csrf-token").and_then(|v| v.to_str().ok()) {
        return Some(v.to_owned());
    }
    serde_urlencoded::from_bytes::<Vec<(String, String)>>(body)
        .ok()?
        .into_iter()
        .find(|(k, _)| k == "csrf")
        .map(|(_, v)| v)
}

/// Before every route: the Host, the session, and for state changes the
/// origin and the CSRF token. A refusal changes nothing.
async fn guard(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let json = req.uri().path().starts_with("/api/") || req.uri().path() == "/events";
    let host_ok = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .is_some_and(|h| h == state.host);
    if !host_ok {
        // Another name for this address (DNS rebinding) is another site.
        return Failure::new(StatusCode::MISDIRECTED_REQUEST, "unknown host", json).into_response();
    }
    if req.uri().path() == "/login" && req.method() == Method::GET {
        return next.run(req).await;
    }
    let Some(session) = cookie_of(req.headers()).and_then(|c| state.sessions.get(&c)) else {
        return Failure::new(
            StatusCode::UNAUTHORIZED,
            "not signed in: run `cityplane dashboard login` with your operator certificate \
             and open the link it prints",
            json,
        )
        .into_response();
    };
    let safe = matches!(*req.method(), Method::GET | Method::HEAD);
    let mut req = req;
    if !safe {
        if !same_origin(&state, req.headers()) {
            tracing::warn!(operator = %session.identity.id, path = %req.uri().path(), "dashboard: cross-origin request refused");
            return Failure::new(StatusCode::FORBIDDEN, "cross-origin request refused", json)
                .into_response();
        }
        let (parts, body) = req.into_parts();
        let Ok(bytes) = axum::body::to_bytes(body, MAX_FORM).await else {
            return Failure::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body too large",
                json,
            )
            .into_response();
        };
        if !csrf_of(&parts.headers, &bytes).is_some_and(|t| same_secret(&t, &session.csrf)) {
            tracing::warn!(operator = %session.identity.id, path = %parts.uri.path(), "dashboard: request without a valid CSRF token refused");
            return Failure::new(StatusCode::FORBIDDEN, "missing or wrong CSRF token", json)
                .into_response();
        }
        req = Request::from_parts(parts, Body::from(bytes));
    }
    req.extensions_mut().insert(session);
    let mut response = next.run(req).await;
    let h = response.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'; form-action 'self'",
        ),
    );
    response
}

async fn login(
    State(state): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let now = cityplane_controller::model::now_ms();
    let Some(identity) = q.get("token").and_then(|t| state.sign_ins.redeem(t, now)) else {
        return Failure::new(
            StatusCode::UNAUTHORIZED,
            "this sign-in link is unknown, used or expired: run `cityplane dashboard login` again",
            false,
        )
        .into_response();
    };
    let (cookie, _) = match state.sessions.open(identity.clone()) {
        Ok(s) => s,
        Err(e) => {
            return Failure::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string(), false)
                .into_response()
        }
    };
    tracing::info!(operator = %identity.id, org = ?identity.org, "dashboard: signed in");
    let set = format!(
        "{COOKIE}={cookie}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
        SESSION_TTL.as_secs(),
        if state.secure { "; Secure" } else { "" }
    );
    let mut r = (StatusCode::SEE_OTHER, [(header::LOCATION, "/")]).into_response();
    if let Ok(v) = HeaderValue::from_str(&set) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

async fn logout(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(c) = cookie_of(&headers) {
        state.sessions.close(&c);
    }
    let mut r = pages::error_page(StatusCode::OK, "Signed out.").into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "cityplane_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0",
        ),
    );
    r
}

/// Pause, resume or abort from the rollout page: the controller checks the
/// organisation's `rollout` right and audits it under the operator's name.
async fn rollout_control(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
    Path((name, action)): Path<(String, String)>,
    axum::Form(form): axum::Form<HashMap<String, String>>,
) -> Result<Response, Failure> {
    let verb = match action.as_str() {
        "pause" => "rollout-pause",
        "resume" => "rollout-resume",
        "abort" => "rollout-abort",
        _ => return Err(Failure::new(StatusCode::NOT_FOUND, "no such action", false)),
    };
    let reason = form
        .get("reason")
        .filter(|r| !r.trim().is_empty())
        .cloned()
        .unwrap_or_else(|| format!("{action} from the dashboard"));
    ask(
        &state,
        &session,
        verb,
        json!({"name": name, "reason": reason}),
        false,
    )
    .await?;
    let to = format!("/rollouts/{}", pages::url_part(&name));
    Ok((StatusCode::SEE_OTHER, [(header::LOCATION, to)]).into_response())
}

/// The figures a page updates live: the fleet's counts and the rollouts'
/// progress, sent when they change and at most every [`LIVE_EVERY`].
/// `rollout`: the page shows that rollout, whose status (waves, the health
/// gate, what it waits for) comes along.
async fn live_figures(
    state: &Shared,
    session: &Session,
    rollout: Option<&str>,
) -> Result<Value, Failure> {
    let mut status = ask(state, session, "status", json!({}), true).await?;
    // The counters move with every report; the pages show counts.
    if let Some(o) = status.as_object_mut() {
        o.remove("counters");
    }
    let rollouts = ask(state, session, "get-rollouts", json!({}), true).await?;
    let mut figures = json!({"status": status, "rollouts": rollouts["rollouts"]});
    if let Some(name) = rollout {
        figures["rollout"] = ask(
            state,
            session,
            "rollout-status",
            json!({"name": name}),
            true,
        )
        .await
        .unwrap_or(Value::Null);
    }
    Ok(figures)
}

/// Server-sent events: the live figures (`EventSource('/events')`).
async fn events(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
    headers: HeaderMap,
    Query(q): Params,
) -> Response {
    let cookie = cookie_of(&headers).unwrap_or_default();
    let rollout = q.get("rollout").cloned();
    let stream = futures_util::stream::unfold(
        (state, session, cookie, rollout, None::<Value>),
        |(state, session, cookie, rollout, last)| async move {
            loop {
                if last.is_some() {
                    tokio::time::sleep(LIVE_EVERY).await;
                }
                // A signed-out or expired session stops its stream.
                state.sessions.get(&cookie)?;
                let figures = live_figures(&state, &session, rollout.as_deref())
                    .await
                    .ok()?;
                if last.as_ref() != Some(&figures) {
                    let chunk = format!("data: {figures}\n\n");
                    return Some((
                        Ok::<_, std::convert::Infallible>(chunk),
                        (state, session, cookie, rollout, Some(figures)),
                    ));
                }
            }
        },
    );
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

async fn script() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("dashboard.js"),
    )
        .into_response()
}

async fn style() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        pages::css(),
    )
        .into_response()
}

async fn not_found() -> Failure {
    Failure::new(StatusCode::NOT_FOUND, "no such page", false)
}

/// Query parameters, each untrusted.
type Params = Query<HashMap<String, String>>;

/// A parameter as a number; absent or unreadable: the default.
pub(crate) fn number(q: &HashMap<String, String>, name: &str, default: usize) -> usize {
    q.get(name)
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// The device list's query: the selector box (JSON, as in documents) and
/// the page.
pub(crate) fn devices_query(q: &HashMap<String, String>, json: bool) -> Result<Value, Failure> {
    let page = number(q, "page", 0).min(1_000_000);
    let mut body = json!({"offset": page * PAGE_SIZE, "limit": PAGE_SIZE});
    if let Some(text) = q
        .get("selector")
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
    {
        let sel: Value = serde_json::from_str(text).map_err(|e| {
            Failure::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "the selector is JSON as in documents, e.g. {{\"class\": \"streetlight\", \
                     \"labels\": {{\"zone\": \"north\"}}}}: {e}"
                ),
                json,
            )
        })?;
        body["selector"] = sel;
    }
    Ok(body)
}

/// The audit query from the filter form's fields.
pub(crate) fn audit_query(q: &HashMap<String, String>) -> Value {
    let mut body = json!({"limit": number(q, "limit", 100).clamp(1, 1000)});
    for field in ["who", "org", "device", "action", "since", "until"] {
        if let Some(v) = q.get(field).map(|v| v.trim()).filter(|v| !v.is_empty()) {
            body[field] = json!(v);
        }
    }
    body
}

async fn api_status(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
) -> Result<Json<Value>, Failure> {
    Ok(Json(
        ask(&state, &session, "status", json!({}), true).await?,
    ))
}

async fn api_overview(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
) -> Result<Json<Value>, Failure> {
    Ok(Json(
        ask(&state, &session, "overview", json!({}), true).await?,
    ))
}

async fn api_devices(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
    Query(q): Params,
) -> Result<Json<Value>, Failure> {
    let body = devices_query(&q, true)?;
    Ok(Json(
        ask(&state, &session, "get-devices", body, true).await?,
    ))
}

async fn api_device(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Failure> {
    Ok(Json(
        ask(&state, &session, "describe", json!({"id": id}), true).await?,
    ))
}

async fn api_documents(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
) -> Result<Json<Value>, Failure> {
    Ok(Json(
        ask(&state, &session, "get-documents", json!({}), true).await?,
    ))
}

async fn api_rollouts(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
) -> Result<Json<Value>, Failure> {
    Ok(Json(
        ask(&state, &session, "get-rollouts", json!({}), true).await?,
    ))
}

async fn api_rollout(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
    Path(name): Path<String>,
) -> Result<Json<Value>, Failure> {
    Ok(Json(
        ask(
            &state,
            &session,
            "rollout-status",
            json!({"name": name}),
            true,
        )
        .await?,
    ))
}

async fn api_compliance(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
) -> Result<Json<Value>, Failure> {
    Ok(Json(
        ask(&state, &session, "compliance", json!({"limit": 50}), true).await?,
    ))
}

async fn api_audit(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
    Query(q): Params,
) -> Result<Json<Value>, Failure> {
    Ok(Json(
        ask(&state, &session, "audit", audit_query(&q), true).await?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_addresses_are_accepted() {
        for ok in ["127.0.0.1:8080", "127.0.0.1:0", "[::1]:8080"] {
            assert!(
                check_address(ok.parse().expect("addr"), false).is_ok(),
                "{ok}"
            );
        }
        for refused in ["0.0.0.0:8080", "10.0.0.5:8080", "[::]:8080"] {
            assert!(
                check_address(refused.parse().expect("addr"), false).is_err(),
                "{refused}"
            );
        }
    }

    #[test]
    fn beyond_loopback_with_tls_and_a_public_url_only() {
        assert!(check_address("0.0.0.0:8443".parse().expect("addr"), true).is_ok());
        let (origin, host) = origin_of("https://dash.example:8443/", true).expect("url");
        assert_eq!(
            (origin.as_str(), host.as_str()),
            ("https://dash.example:8443", "dash.example:8443")
        );
        for bad in [
            "http://dash.example",
            "https://",
            "https://dash.example/x",
            "https://u@dash.example",
            "dash.example",
        ] {
            assert!(origin_of(bad, true).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_csrf_token_is_read_from_the_header_or_the_form_only() {
        let mut h = HeaderMap::new();
        assert_eq!(csrf_of(&h, b"reason=x&csrf=abc"), Some("abc".into()));
        assert_eq!(csrf_of(&h, b"reason=x"), None);
        assert_eq!(csrf_of(&h, b"\xff\xfe=%%%"), None);
        h.insert("x-csrf-token", HeaderValue::from_static("def"));
        assert_eq!(csrf_of(&h, b"csrf=abc"), Some("def".into()));
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "abcd"));
        assert!(!same_secret("", "a"));
    }
}
