//! The operator dashboard end to end: `cityplane serve --dashboard`, sign-in
//! links from `cityplane dashboard login` over mTLS, raw HTTP for the
//! refusals (no session, a used or unknown link, a foreign Host, forged
//! cross-site POSTs, another organisation's devices and rollouts on every
//! route), and Debian's chromium through chromedriver for what an operator
//! sees: the CLI's counts, a rollout advancing without a reload, pause from
//! the page.

use crate::common;
use crate::governance::{issue_operator, register_contractors_devices};
use crate::rollouts::{sim, Setup};

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{eventually, free_port, Server};
use serde_json::{json, Value};

/// `serve` with the dashboard on a port of its own; its `host:port`.
fn serve_with_dashboard(s: &Setup) -> (Server, String) {
    let host = format!("127.0.0.1:{}", free_port());
    let server = Server::start_with(
        &s.pki,
        &s.data,
        s.port,
        &s.log,
        "warn",
        &["--dashboard", &host],
    );
    common::wait_up(&s.pki, s.port);
    (server, host)
}

/// A sign-in link for operator `id`, from `cityplane dashboard login`.
fn login_link(s: &Setup, id: &str) -> String {
    let out = common::ok(&mut common::cli_as(
        &s.pki,
        s.port,
        id,
        &["dashboard", "login", "--output", "json"],
    ));
    let v: Value = serde_json::from_str(&out).expect("JSON");
    v["url"].as_str().expect("url").to_owned()
}

use cityplane_testkit::http::Reply;

fn http(host: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    cityplane_testkit::http::request(host, method, path, headers, body)
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// A signed-in session: its cookie header and CSRF token.
struct Signed {
    host: String,
    cookie: String,
    csrf: String,
}

impl Signed {
    fn get(&self, path: &str) -> Reply {
        http(&self.host, "GET", path, &[("Cookie", &self.cookie)], "")
    }

    /// A POST as the dashboard's own form sends it (same origin).
    fn post(&self, path: &str, body: &str) -> Reply {
        let origin = format!("http://{}", self.host);
        http(
            &self.host,
            "POST",
            path,
            &[("Cookie", &self.cookie), ("Origin", &origin)],
            body,
        )
    }
}

fn sign_in(host: &str, link: &str) -> Signed {
    let path = link
        .strip_prefix(&format!("http://{host}"))
        .expect("the link names the dashboard");
    let r = http(host, "GET", path, &[], "");
    assert_eq!(r.status, 303, "{}", r.body);
    let set = r.header("set-cookie").expect("a session cookie");
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(attr), "{set}");
    }
    let cookie = set.split(';').next().expect("cookie").to_owned();
    let page = http(host, "GET", "/", &[("Cookie", &cookie)], "");
    assert_eq!(page.status, 200, "{}", page.body);
    let csrf = page
        .body
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("the page carries its CSRF token")
        .to_owned();
    Signed {
        host: host.to_owned(),
        cookie,
        csrf,
    }
}

fn ids_in(v: &Value) -> BTreeSet<String> {
    v["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .map(|d| d["id"].as_str().expect("id").to_owned())
        .collect()
}

/// Every GET route, pages and API (device and rollout routes take a name).
const ROUTES: [&str; 17] = [
    "/",
    "/devices",
    "/devices/dev0001",
    "/documents",
    "/rollouts",
    "/rollouts/lc-dim",
    "/compliance",
    "/compliance/report.html",
    "/audit",
    "/api/status",
    "/api/overview",
    "/api/devices",
    "/api/devices/dev0001",
    "/api/rollouts/lc-dim",
    "/api/compliance",
    "/api/audit",
    "/static/dashboard.js",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_refuses_strangers_forged_posts_and_other_organisations_devices() {
    let s = Setup::new(12);
    issue_operator(&s, "lc", "lighting-co");
    issue_operator(&s, "ci", "camera-int");
    issue_operator(&s, "stranger", "nobody");
    let (_server, host) = serve_with_dashboard(&s);
    let (lamps, cameras) = register_contractors_devices(&s, 12);
    for (org, scope, rights) in [
        ("lighting-co", "owner=lighting-co", "read,write,rollout"),
        ("camera-int", "owner=camera-int", "read,rollout"),
    ] {
        s.json(&["orgs", "create", org, "--scope", scope, "--rights", rights]);
    }
    // The devices never connect: both rollouts stay in their first wave.
    for (id, name, class, state) in [
        ("lc", "lc-dim", "streetlight", json!({"dimming": 40})),
        ("ci", "ci-ir", "camera", json!({"ir": true})),
    ] {
        let spec = s.file(
            &format!("{name}.json"),
            &json!({"name": name, "target": {"class": class}, "state": state,
                    "waves": [{"count": 1}, {"percent": 100}]}),
        );
        common::ok(&mut common::cli_as(
            &s.pki,
            s.port,
            id,
            &["rollout", "create", "-f", &spec],
        ));
    }

    // A link is used once; unknown and empty tokens sign nobody in.
    for bad in [
        "/login",
        "/login?token=",
        "/login?token=0123456789abcdef0123456789abcdef",
    ] {
        let r = http(&host, "GET", bad, &[], "");
        assert_eq!(r.status, 401, "{bad}: {}", r.body);
        assert!(r.header("set-cookie").is_none(), "{bad}");
    }
    let link = login_link(&s, "lc");
    let lc = sign_in(&host, &link);
    // Nobody anonymous, even while an operator is signed in: every route,
    // and a POST, is refused.
    for path in ROUTES.iter().chain(&["/events", "/nothing-here"]) {
        let r = http(&host, "GET", path, &[], "");
        assert_eq!(r.status, 401, "anonymous GET {path}: {}", r.body);
        assert!(!r.body.contains("dev0001"), "{path}: {}", r.body);
    }
    let r = http(&host, "POST", "/rollouts/lc-dim/pause", &[], "csrf=x");
    assert_eq!(r.status, 401, "{}", r.body);
    // A made-up cookie is no session.
    let r = http(
        &host,
        "GET",
        "/api/status",
        &[(
            "Cookie",
            "cityplane_session=00112233445566778899aabbccddeeff",
        )],
        "",
    );
    assert_eq!(r.status, 401, "{}", r.body);
    let path = link.strip_prefix(&format!("http://{host}")).expect("path");
    let again = http(&host, "GET", path, &[], "");
    assert_eq!(again.status, 401, "a link is single use: {}", again.body);
    // An operator of an organisation the city never created gets no link.
    let out = common::cli_as(&s.pki, s.port, "stranger", &["dashboard", "login"])
        .output()
        .expect("runs");
    assert!(!out.status.success(), "a link for an unknown organisation");
    // Another name for the address is another site (DNS rebinding).
    let r = http(
        &host,
        "GET",
        "/api/status",
        &[("Host", "rebound.example:80"), ("Cookie", &lc.cookie)],
        "",
    );
    assert_eq!(r.status, 421, "{}", r.body);

    // The contractor sees its lamps and none of the cameras, on every route.
    assert_eq!(ids_in(&json_body(&lc.get("/api/devices"))), lamps);
    let all = lc.get("/api/devices?selector=%7B%22all%22%3Atrue%7D");
    assert_eq!(ids_in(&json_body(&all)), lamps);
    assert_eq!(json_body(&lc.get("/api/overview"))["all"]["total"], 6);
    let cli_status = common::json_of(&s.pki, s.port, &["status"]);
    assert_eq!(cli_status["total"], 12, "the city sees all: {cli_status}");
    assert_eq!(json_body(&lc.get("/api/status"))["total"], 6);
    let mut pages: Vec<String> = ROUTES.iter().map(|p| p.to_string()).collect();
    pages.extend([
        "/devices?selector=%7B%22all%22%3Atrue%7D".into(),
        "/devices?page=0&selector=%7B%22class%22%3A%22camera%22%7D".into(),
        "/api/rollouts".into(),
        "/api/documents".into(),
        "/audit?who=ci".into(),
        "/api/audit?org=camera-int".into(),
    ]);
    for path in &pages {
        let r = lc.get(path);
        assert!(r.status == 200, "{path}: {} {}", r.status, r.body);
        for cam in cameras.iter().map(String::as_str).chain(["ci-ir"]) {
            assert!(!r.body.contains(cam), "{path} shows {cam} to lighting-co");
        }
    }
    for cam in &cameras {
        for path in [format!("/devices/{cam}"), format!("/api/devices/{cam}")] {
            assert_eq!(lc.get(&path).status, 404, "{path}");
        }
    }
    for path in ["/rollouts/ci-ir", "/api/rollouts/ci-ir"] {
        assert_eq!(lc.get(path).status, 404, "{path}");
    }
    let body = format!("csrf={}", lc.csrf);
    let r = lc.post("/rollouts/ci-ir/pause", &body);
    assert_eq!(r.status, 404, "another organisation's rollout: {}", r.body);
    assert_eq!(s.json(&["rollout", "status", "ci-ir"])["phase"], "active");

    // Forged cross-site POSTs change nothing.
    let origin = format!("http://{host}");
    let forged: [Forgery; 5] = [
        ("no token", vec![("Origin", &origin)], String::new()),
        (
            "a wrong token",
            vec![("Origin", &origin)],
            "csrf=00000000000000000000000000000000".into(),
        ),
        (
            "a foreign Origin",
            vec![("Origin", "http://evil.example")],
            body.clone(),
        ),
        (
            "a foreign Referer",
            vec![("Referer", "http://evil.example/page")],
            body.clone(),
        ),
        ("neither Origin nor Referer", vec![], body.clone()),
    ];
    for (what, headers, form) in forged {
        let mut headers = headers;
        headers.push(("Cookie", &lc.cookie));
        let r = http(&host, "POST", "/rollouts/lc-dim/pause", &headers, &form);
        assert_eq!(r.status, 403, "{what}: {}", r.body);
    }
    assert_eq!(s.json(&["rollout", "status", "lc-dim"])["phase"], "active");
    // The dashboard's own form pauses it, audited under the operator's name.
    let r = lc.post("/rollouts/lc-dim/pause", &body);
    assert_eq!(r.status, 303, "{}", r.body);
    assert_eq!(s.json(&["rollout", "status", "lc-dim"])["phase"], "paused");
    let audit = common::json_of(&s.pki, s.port, &["audit", "--who", "lc"]);
    let actions: Vec<&str> = audit
        .as_array()
        .expect("entries")
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert!(actions.contains(&"dashboard-login"), "{audit}");
    assert!(actions.contains(&"rollout-pause"), "{audit}");
    assert!(
        !audit.to_string().contains(&lc.csrf),
        "no secret in the audit"
    );
    assert!(
        !std::fs::read_to_string(&s.log)
            .expect("log")
            .contains(link.rsplit('=').next().expect("token")),
        "the sign-in token is never logged"
    );

    // Markup in what operators and devices name is shown, never run.
    s.json(&[
        "devices",
        "label",
        "dev0001",
        "street=<img src=x onerror=alert(1)>",
    ]);
    let page = lc.get("/devices/dev0001");
    assert!(
        page.body.contains("&lt;img src=x onerror=alert(1)&gt;") && !page.body.contains("<img"),
        "{}",
        page.body
    );

    // Rights: an organisation that loses `rollout` gets no buttons, and a
    // press anyway is refused by the controller.
    let ci = sign_in(&host, &login_link(&s, "ci"));
    assert!(ci.get("/rollouts/ci-ir").body.contains("id=\"pause\""));
    s.json(&[
        "orgs",
        "grant",
        "camera-int",
        "--scope",
        "owner=camera-int",
        "--rights",
        "read",
    ]);
    assert!(!ci.get("/rollouts/ci-ir").body.contains("id=\"pause\""));
    let r = ci.post("/rollouts/ci-ir/pause", &format!("csrf={}", ci.csrf));
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(s.json(&["rollout", "status", "ci-ir"])["phase"], "active");

    // Signed out: the session is gone.
    let r = lc.post("/logout", &body);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(lc.get("/api/status").status, 401);
}

/// What a forged POST says of itself: its name, headers and form.
type Forgery<'a> = (&'a str, Vec<(&'a str, &'a str)>, String);

fn json_body(r: &Reply) -> Value {
    assert_eq!(r.status, 200, "{}", r.body);
    serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{e}: {}", r.body))
}

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";

/// chromedriver on a free port, killed when dropped.
fn chromedriver() -> (cityplane_testkit::process::ChildGuard, String) {
    for bin in [CHROMEDRIVER, CHROMIUM] {
        assert!(
            Path::new(bin).exists(),
            "{bin} is missing: the dashboard's browser test needs Debian's chromium and \
             chromium-driver (apt-get install chromium chromium-driver; .ci/run installs them)"
        );
    }
    let port = free_port();
    let child = std::process::Command::new(CHROMEDRIVER)
        .arg(format!("--port={port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("chromedriver starts");
    let guard = cityplane_testkit::process::ChildGuard::new(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "chromedriver did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    (guard, format!("http://127.0.0.1:{port}"))
}

async fn browser(webdriver: &str) -> fantoccini::Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({"binary": CHROMIUM, "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
               "--disable-dev-shm-usage", "--window-size=1280,1000"]}),
    );
    fantoccini::ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(webdriver)
        .await
        .expect("a chromium session")
}

/// Runs `script` in the page; its value.
async fn js(b: &fantoccini::Client, script: &str) -> Value {
    b.execute(script, vec![]).await.expect("script runs")
}

/// The page's live counts (`data-live`), as numbers.
async fn page_counts(b: &fantoccini::Client) -> Value {
    js(
        b,
        "const o = {}; document.querySelectorAll('[data-live]').forEach(e => \
         o[e.dataset.live] = Number(e.textContent)); return o;",
    )
    .await
}

async fn screenshot(b: &fantoccini::Client, name: &str) {
    if std::env::var_os("CITYPLANE_SCREENSHOTS").is_none() {
        return;
    }
    let png = b.screenshot().await.expect("screenshot");
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("docs")
        .join(name);
    std::fs::write(&path, png).expect("write the screenshot");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_browser_the_fleet_shows_the_cli_counts_a_rollout_advances_live_and_pauses() {
    let (_driver, webdriver) = chromedriver();
    let s = Setup::new(20);
    let (_server, host) = serve_with_dashboard(&s);
    s.zones(20);
    let policy = s.dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "description = \"Dashboard test policy\"\nmode = \"report\"\n\n[[rules]]\n\
         id = \"dimming-set\"\ndescription = \"Streetlights report a dimming level\"\n\
         severity = \"medium\"\nselector = { class = \"streetlight\" }\n\
         check = { reported = \"dimming\", equals = 40 }\n",
    )
    .expect("policy");
    s.json(&["policy", "apply", "-f", policy.to_str().expect("utf-8")]);
    let _fleet = s.online(sim(&s.pki, s.port, 20)).await;
    let b = browser(&webdriver).await;

    // Fleet: the page's counts are `cityplane status`'s, kept current
    // without a reload.
    b.goto(&login_link(&s, "op")).await.expect("sign in");
    assert_eq!(b.current_url().await.expect("url").path(), "/");
    js(&b, "window.stayed = true; return null;").await;
    let fields = [
        "total",
        "online",
        "converged",
        "pending",
        "failed",
        "drifted",
    ];
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let page = page_counts(&b).await;
        let cli = common::json_of(&s.pki, s.port, &["status"]);
        let again = page_counts(&b).await;
        let same = fields
            .iter()
            .all(|f| page[f] == cli[f] && again[f] == cli[f]);
        if same && cli["online"] == 20 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the fleet page shows what `cityplane status` says: {page} vs {cli}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(js(&b, "return window.stayed === true;").await, true);
    screenshot(&b, "dashboard-fleet.png").await;

    // A rollout's progress advances on its page without a reload.
    let spec = s.file(
        "dim.json",
        &json!({"name": "dim-40", "target": {"class": "streetlight"}, "state": {"dimming": 40},
                "waves": [{"count": 2}, {"count": 6}, {"percent": 100}],
                "success_threshold": 100, "health": {"soak_s": 2}}),
    );
    s.json(&["rollout", "create", "-f", &spec]);
    b.goto(&format!("http://{host}/rollouts/dim-40"))
        .await
        .expect("rollout page");
    js(&b, "window.stayed = true; return null;").await;
    let succeeded = "return Number(document.querySelector(\
                     '[data-field=\"counts.succeeded\"]').textContent);";
    let first = js(&b, succeeded).await.as_u64().expect("a number");
    assert!(
        first < 20,
        "the rollout had not finished when the page loaded"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut now = first;
    while now <= first || now < 8 {
        assert!(
            Instant::now() < deadline,
            "progress advanced on the page: {first} → {now}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        now = js(&b, succeeded).await.as_u64().expect("a number");
    }
    assert_eq!(
        js(&b, "return window.stayed === true;").await,
        true,
        "no reload"
    );
    // The waves' table follows too: the first wave is done.
    let first_wave =
        "return document.querySelector('[data-status=\"wave_rows.0.state\"]').textContent;";
    let deadline = Instant::now() + Duration::from_secs(30);
    while js(&b, first_wave).await != "done" {
        assert!(
            Instant::now() < deadline,
            "wave 1 shown done without a reload"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    screenshot(&b, "dashboard-rollout.png").await;

    // A page of another site posting to the dashboard in the same browser
    // (signed in) is refused and changes nothing.
    let forged = format!(
        "data:text/html,<form method=post action='http://{host}/rollouts/dim-40/pause'>\
         <input name=csrf value=guess></form><script>document.forms[0].submit()</script>"
    );
    b.goto(&forged).await.expect("the forging page");
    let deadline = Instant::now() + Duration::from_secs(20);
    while b.current_url().await.expect("url").scheme() == "data" {
        assert!(Instant::now() < deadline, "the forged form was not sent");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let refusal = b
        .find(fantoccini::Locator::Id("message"))
        .await
        .expect("the dashboard's refusal")
        .text()
        .await
        .expect("text");
    assert!(
        refusal.contains("not signed in") || refusal.contains("refused"),
        "{refusal}"
    );
    assert_eq!(s.json(&["rollout", "status", "dim-40"])["phase"], "active");
    b.goto(&format!("http://{host}/rollouts/dim-40"))
        .await
        .expect("rollout page");

    // Pause from the page pauses the rollout.
    b.find(fantoccini::Locator::Id("pause"))
        .await
        .expect("a pause button for the city")
        .click()
        .await
        .expect("click");
    eventually("the rollout paused", || {
        s.json(&["rollout", "status", "dim-40"])["phase"] == "paused"
    })
    .await;
    let phase = js(
        &b,
        "return document.querySelector('[data-field=\"phase\"]').textContent;",
    )
    .await;
    assert_eq!(phase, "paused", "the page after the POST");
    let audit = common::json_of(&s.pki, s.port, &["audit", "--who", "op"]);
    assert!(
        audit
            .as_array()
            .expect("entries")
            .iter()
            .any(|e| e["action"] == "rollout-pause" && e["name"] == "dim-40"),
        "{audit}"
    );

    // Compliance: the report's sections and its download.
    b.goto(&format!("http://{host}/compliance"))
        .await
        .expect("compliance page");
    let text = b
        .find(fantoccini::Locator::Css("body"))
        .await
        .expect("body")
        .text()
        .await
        .expect("text");
    assert!(text.contains("dimming-set"), "{text}");
    screenshot(&b, "dashboard-compliance.png").await;
    b.close().await.expect("close the browser");
}

#[test]
fn the_dashboard_listens_on_loopback_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(common::BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--dashboard",
            "0.0.0.0:0",
            "--dashboard-url",
            "http://dash.example:8080",
        ])
        .arg("--pki")
        .arg(dir.path().join("pki"))
        .arg("--data")
        .arg(dir.path().join("data"))
        .stdin(std::process::Stdio::null())
        .output()
        .expect("runs");
    assert!(
        !out.status.success(),
        "serve started with a dashboard on 0.0.0.0"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("loopback only"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_the_dashboard_listens_beyond_loopback_with_a_secure_cookie() {
    let s = Setup::new(2);
    let port = free_port();
    let crt = s.pki.join("broker.crt");
    let key = s.pki.join("broker.key");
    let (crt, key) = (crt.to_str().expect("utf-8"), key.to_str().expect("utf-8"));
    let listen = format!("0.0.0.0:{port}");
    let url = format!("https://localhost:{port}");
    let _server = Server::start_with(
        &s.pki,
        &s.data,
        s.port,
        &s.log,
        "warn",
        &[
            "--dashboard",
            &listen,
            "--dashboard-tls-cert",
            crt,
            "--dashboard-tls-key",
            key,
            "--dashboard-url",
            &url,
        ],
    );
    common::wait_up(&s.pki, s.port);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let tls = cityplane_testkit::tls::pki_client(&s.pki, None).expect("a client trusting the CA");
    let get = |path: &str, headers: &[(&str, &str)]| {
        cityplane_testkit::http::request_tls(
            addr,
            "localhost",
            tls.clone(),
            "GET",
            path,
            headers,
            "",
        )
        .unwrap_or_else(|e| panic!("GET {path} over TLS: {e}"))
    };
    let link = login_link(&s, "op");
    let path = link
        .strip_prefix(&format!("{url}/"))
        .map(|p| format!("/{p}"))
        .unwrap_or_else(|| panic!("the link names the public URL: {link}"));
    let r = get(&path, &[]);
    assert_eq!(r.status, 303, "{}", r.body);
    let set = r.header("set-cookie").expect("a session cookie");
    assert!(
        set.contains("; Secure") && set.contains("HttpOnly"),
        "{set}"
    );
    let cookie = set.split(';').next().expect("cookie").to_owned();
    let status = get("/api/status", &[("Cookie", &cookie)]);
    assert_eq!(json_body(&status)["total"], 2);
    // Plain HTTP on that port gets no page.
    let plain = cityplane_testkit::http::request(
        &addr.to_string(),
        "GET",
        "/api/status",
        &[("Cookie", &cookie)],
        "",
    );
    assert!(
        plain.map_or(true, |r| r.status != 200),
        "plain HTTP answered"
    );
}
