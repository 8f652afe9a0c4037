//! The dashboard's pages: HTML rendered from the operator protocol's
//! answers. Every value goes through `esc`/`text` (device ids, labels and
//! reasons are chosen by devices and operators); class names and URLs are
//! built from fixed strings or percent-encoded parts.

use std::collections::HashMap;
use std::fmt::Write as _;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::Extension;
use cityplane::compliance_html::{self, cell, esc, num_cell, table, text};
use serde_json::{json, Value};

use super::{ask, audit_query, devices_query, number, AppState, Failure, Session, PAGE_SIZE};

const DASH_CSS: &str = "nav{display:flex;gap:1.2em;align-items:center;border-bottom:1px solid \
#d0d7de;padding-bottom:.5em;margin-bottom:1em}nav a{text-decoration:none;color:#0969da}\
nav a.on{font-weight:700;color:#1b1f24}nav .who{margin-left:auto;color:#57606a}\
nav form{display:inline}.cards{display:flex;flex-wrap:wrap;gap:.8em;margin:1em 0}\
.card{border:1px solid #d0d7de;border-radius:6px;padding:.6em 1em;min-width:7em}\
.card b{display:block;font-size:1.8em}.progress{background:#eaeef2;border-radius:3px;\
height:.9em;width:16em;display:inline-block;vertical-align:middle}.progress span{display:block;\
height:100%;background:#2da44e;border-radius:3px}pre{background:#f6f8fa;padding:.6em;\
overflow:auto;max-height:24em}.actions form{display:inline;margin-right:.5em}\
input[type=text]{width:32em;font-family:monospace}.err{color:#cf222e}.ok{color:#1a7f37}";

/// The page's style: the auditor's report's, plus the dashboard's own.
pub(super) fn css() -> String {
    format!("{}{DASH_CSS}", compliance_html::CSS)
}

/// A path segment, percent-encoded (ids are restricted, names less so).
pub(super) fn url_part(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A query parameter's value, percent-encoded.
fn query_part(s: &str) -> String {
    url_part(s)
}

const NAV: [(&str, &str); 6] = [
    ("/", "Fleet"),
    ("/devices", "Devices"),
    ("/documents", "Documents"),
    ("/rollouts", "Rollouts"),
    ("/compliance", "Compliance"),
    ("/audit", "Audit"),
];

fn layout(session: &Session, active: &str, title: &str, body: &str) -> Html<String> {
    layout_for(session, active, title, body, None)
}

/// `rollout`: the page shows that rollout (its live status comes along).
fn layout_for(
    session: &Session,
    active: &str,
    title: &str,
    body: &str,
    rollout: Option<&str>,
) -> Html<String> {
    let mut h = String::with_capacity(body.len() + 2048);
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{} — cityplane</title>\n<link rel=\"stylesheet\" href=\"/static/dashboard.css\">\n\
         <script src=\"/static/dashboard.js\" defer></script>\n</head>\n<body{}>\n<nav>",
        esc(title),
        rollout
            .map(|r| format!(" data-rollout-page=\"{}\"", esc(r)))
            .unwrap_or_default()
    );
    for (href, name) in NAV {
        let on = if href == active { " class=\"on\"" } else { "" };
        let _ = write!(h, "<a href=\"{href}\"{on}>{name}</a>");
    }
    let _ = write!(
        h,
        "<span class=\"who\">{} · {}</span><form method=\"post\" action=\"/logout\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{}\"><button>Sign out</button></form></nav>\n\
         <h1>{}</h1>\n{body}\n</body>\n</html>\n",
        esc(&session.identity.id),
        esc(session.identity.org.as_deref().unwrap_or("-")),
        esc(&session.csrf),
        esc(title),
    );
    Html(h)
}

/// A page for an error or a notice, without the navigation (it is also
/// what an anonymous visitor sees).
pub(super) fn error_page(status: StatusCode, message: &str) -> Html<String> {
    Html(format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>cityplane \
         dashboard</title><style>{}</style></head><body><h1>cityplane dashboard</h1>\
         <p class=\"{}\" id=\"message\">{}</p><p><a href=\"/\">Back to the fleet</a></p></body></html>\n",
        compliance_html::CSS,
        if status.is_success() { "ok" } else { "err" },
        esc(message)
    ))
}

/// A count the live updates keep current (`data-live` is a path in the
/// `status` answer).
fn card(label: &str, field: &str, value: &Value) -> String {
    format!(
        "<div class=\"card\">{}<b data-live=\"{field}\">{}</b></div>",
        esc(label),
        text(value)
    )
}

fn pretty(v: &Value) -> String {
    format!(
        "<pre>{}</pre>",
        esc(&serde_json::to_string_pretty(v).unwrap_or_default())
    )
}

const GROUP_FIELDS: [&str; 8] = [
    "total",
    "online",
    "converged",
    "pending",
    "failed",
    "drifted",
    "quarantined",
    "non_compliant",
];

pub(super) async fn fleet(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
) -> Result<Html<String>, Failure> {
    // One pass over the fleet: the overview's `all` is `status`'s counts
    // (the same classification), which the live updates then keep current.
    let overview = ask(&state, &session, "overview", json!({}), false).await?;
    let mut h = String::from("<section class=\"cards\" id=\"counts\">");
    for field in [
        "total",
        "online",
        "converged",
        "pending",
        "failed",
        "drifted",
    ] {
        h += &card(field, field, &overview["all"][field]);
    }
    for field in ["quarantined", "non_compliant"] {
        let _ = write!(
            h,
            "<div class=\"card\">{}<b>{}</b></div>",
            esc(&field.replace('_', "-")),
            text(&overview["all"][field])
        );
    }
    h += "</section>\n";
    for (key, title) in [
        ("class", "By class"),
        ("zone", "By zone"),
        ("owner", "By owner"),
    ] {
        let _ = write!(
            h,
            "<h2>{title}</h2><p class=\"meta\">{} groups</p>",
            text(&overview[key]["groups"])
        );
        let mut headers = vec![title.trim_start_matches("By ")];
        headers.extend(
            GROUP_FIELDS
                .iter()
                .map(|f| f.trim_end_matches("_compliant")),
        );
        let headers: Vec<&str> = headers
            .into_iter()
            .map(|h| if h == "non" { "non-compliant" } else { h })
            .collect();
        table(&mut h, &overview[key]["rows"], &headers, |r| {
            let name = r["name"].as_str().unwrap_or("-");
            let link = if name == "-" {
                "<td>-</td>".to_owned()
            } else {
                let sel = match key {
                    "zone" => json!({"labels": {"zone": name}}),
                    other => json!({ other: name }),
                };
                format!(
                    "<td><a href=\"/devices?selector={}\">{}</a></td>",
                    query_part(&sel.to_string()),
                    esc(name)
                )
            };
            std::iter::once(link)
                .chain(GROUP_FIELDS.iter().map(|f| num_cell(&r[*f])))
                .collect()
        });
    }
    Ok(layout(&session, "/", "Fleet", &h))
}

pub(super) async fn devices(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Html<String>, Failure> {
    let selector = q.get("selector").cloned().unwrap_or_default();
    let mut h = format!(
        "<form method=\"get\" action=\"/devices\"><label>Selector (JSON, as in documents) \
         <input type=\"text\" name=\"selector\" value=\"{}\" \
         placeholder='{{\"class\": \"streetlight\", \"labels\": {{\"zone\": \"north\"}}}}'></label> \
         <button>Search</button></form>\n",
        esc(&selector)
    );
    let body = devices_query(&q, false)?;
    let page = number(&q, "page", 0).min(1_000_000);
    let r = ask(&state, &session, "get-devices", body, false).await?;
    let total = r["total"].as_u64().unwrap_or(0) as usize;
    let pages = total.div_ceil(PAGE_SIZE).max(1);
    let _ = write!(
        h,
        "<p class=\"meta\" id=\"total\">{total} devices · page {} of {pages}</p>",
        page + 1
    );
    table(
        &mut h,
        &r["devices"],
        &[
            "Device",
            "Class",
            "Zone",
            "Owner",
            "Online",
            "Converged",
            "Failed",
            "Quarantined",
            "Last seen",
        ],
        |d| {
            let id = d["id"].as_str().unwrap_or("");
            vec![
                format!(
                    "<td><a href=\"/devices/{}\">{}</a></td>",
                    url_part(id),
                    esc(id)
                ),
                cell(&d["class"]),
                cell(&d["labels"]["zone"]),
                cell(&d["owner"]),
                cell(&d["online"]),
                cell(&d["converged"]),
                cell(&d["failed"]),
                cell(&d["quarantined"]),
                cell(&d["last_seen"]),
            ]
        },
    );
    let link = |p: usize, label: &str| {
        format!(
            "<a href=\"/devices?selector={}&amp;page={p}\">{label}</a>",
            query_part(&selector)
        )
    };
    h += "<p>";
    if page > 0 {
        h += &link(page - 1, "← previous");
        h += " ";
    }
    if page + 1 < pages {
        h += &link(page + 1, "next →");
    }
    h += "</p>";
    Ok(layout(&session, "/devices", "Devices", &h))
}

pub(super) async fn device(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
    Path(id): Path<String>,
) -> Result<Html<String>, Failure> {
    let d = ask(&state, &session, "describe", json!({"id": id}), false).await?;
    let mut h = String::from("<h2>Registry</h2><table><tbody>");
    for (label, v) in [
        ("Class", &d["class"]),
        ("Owner", &d["owner"]),
        ("Registered", &d["registered"]),
        ("Registered by", &d["registered_by"]),
        ("Online", &d["online"]),
        ("Last seen", &d["last_seen"]),
        ("Converged", &d["converged"]),
        ("Failed", &d["failed"]),
        ("Drift count", &d["drift_count"]),
        ("Revoked", &d["revoked"]),
        ("Certificate expires", &d["certificate_not_after"]),
    ] {
        let _ = write!(h, "<tr><th>{label}</th>{}</tr>", cell(v));
    }
    h += "</tbody></table>";
    h += "<h2>Labels</h2>";
    h += &pretty(&d["labels"]);
    if !d["quarantine"].is_null() {
        h += "<h2>Quarantine</h2>";
        h += &pretty(&d["quarantine"]);
    }
    for (title, key) in [
        ("Desired", "desired"),
        ("Reported", "reported"),
        ("Delta", "delta"),
    ] {
        let _ = write!(h, "<h2>{title}</h2>");
        h += &pretty(&d[key]);
    }
    h += "<h2>Conditions</h2>";
    table(
        &mut h,
        &d["conditions"],
        &["Type", "Status", "Reason", "Message", "Since"],
        |c| {
            vec![
                cell(&c["type"]),
                cell(&c["status"]),
                cell(&c["reason"]),
                cell(&c["message"]),
                cell(&c["last_transition_time"]),
            ]
        },
    );
    h += "<h2>Recent commands</h2>";
    table(
        &mut h,
        &d["recent_commands"],
        &["Command", "Generation", "At", "Event"],
        |c| {
            let at = c["at"]
                .as_u64()
                .map(|ms| json!(cityplane_controller::model::rfc3339(ms)))
                .unwrap_or(Value::Null);
            vec![
                cell(&c["id"]),
                num_cell(&c["generation"]),
                cell(&at),
                cell(&c["event"]),
            ]
        },
    );
    h += "<h2>Compliance</h2>";
    let violations: Vec<Value> = d["violations"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(rule, v)| json!({"rule": rule, "since": v["since"], "reason": v["reason"]}))
                .collect()
        })
        .unwrap_or_default();
    if violations.is_empty() {
        h += "<p class=\"ok\">Breaks no rule of the security policy.</p>";
    } else {
        table(
            &mut h,
            &Value::Array(violations),
            &["Rule", "Since", "Reason"],
            |v| vec![cell(&v["rule"]), cell(&v["since"]), cell(&v["reason"])],
        );
    }
    let title = format!("Device {}", d["id"].as_str().unwrap_or(""));
    Ok(layout(&session, "/devices", &title, &h))
}

pub(super) async fn documents(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
) -> Result<Html<String>, Failure> {
    let r = ask(&state, &session, "get-documents", json!({}), false).await?;
    let mut h = String::new();
    table(
        &mut h,
        &r["documents"],
        &[
            "Document",
            "Target",
            "Priority",
            "Generation",
            "Targeted",
            "Converged",
            "Pending",
            "Failed",
            "Updated",
        ],
        |d| {
            vec![
                cell(&d["name"]),
                format!("<td><code>{}</code></td>", esc(&d["target"].to_string())),
                num_cell(&d["priority"]),
                num_cell(&d["generation"]),
                num_cell(&d["targeted"]),
                num_cell(&d["converged"]),
                num_cell(&d["pending"]),
                num_cell(&d["failed"]),
                cell(&d["updated"]),
            ]
        },
    );
    Ok(layout(&session, "/documents", "Documents", &h))
}

/// A rollout's progress: succeeded (and skipped) of its devices, live.
fn progress(r: &Value) -> String {
    let name = esc(r["name"].as_str().unwrap_or(""));
    let done = r["counts"]["succeeded"].as_u64().unwrap_or(0);
    let total = r["devices"].as_u64().unwrap_or(0);
    let pct = if total == 0 {
        0.0
    } else {
        done as f64 * 100.0 / total as f64
    };
    format!(
        "<td><span class=\"progress\"><span data-rollout=\"{name}\" data-bar=\"1\" \
         style=\"width:{pct:.0}%\"></span></span> <span data-rollout=\"{name}\" \
         data-field=\"counts.succeeded\">{done}</span> of {total}</td>"
    )
}

/// A cell the rollout page's live status keeps current (`data-status` is
/// a path in the `rollout-status` answer; paths are built from fixed
/// field names and numbers).
fn status_cell(path: &str, v: &Value) -> String {
    format!("<td data-status=\"{}\">{}</td>", esc(path), text(v))
}

fn live_cell(r: &Value, field: &str) -> String {
    let name = esc(r["name"].as_str().unwrap_or(""));
    let mut v = r;
    for part in field.split('.') {
        v = &v[part];
    }
    format!(
        "<td data-rollout=\"{name}\" data-field=\"{field}\">{}</td>",
        text(v)
    )
}

pub(super) async fn rollouts(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
) -> Result<Html<String>, Failure> {
    let r = ask(&state, &session, "get-rollouts", json!({}), false).await?;
    let mut h = String::new();
    table(
        &mut h,
        &r["rollouts"],
        &[
            "Rollout", "Phase", "Wave", "Waves", "Progress", "Failed", "Author", "Created",
        ],
        |r| {
            let name = r["name"].as_str().unwrap_or("");
            vec![
                format!(
                    "<td><a href=\"/rollouts/{}\">{}</a></td>",
                    url_part(name),
                    esc(name)
                ),
                live_cell(r, "phase"),
                live_cell(r, "wave"),
                num_cell(&r["waves"]),
                progress(r),
                live_cell(r, "counts.failed"),
                cell(&r["author"]),
                cell(&r["created"]),
            ]
        },
    );
    Ok(layout(&session, "/rollouts", "Rollouts", &h))
}

pub(super) async fn rollout(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
    Path(name): Path<String>,
) -> Result<Html<String>, Failure> {
    let r = ask(
        &state,
        &session,
        "rollout-status",
        json!({"name": name}),
        false,
    )
    .await?;
    // The buttons only for an organisation holding the right; the
    // controller checks it again on every press.
    let may_control = ask(&state, &session, "describe-org", json!({}), false)
        .await
        .ok()
        .and_then(|o| o["rights"].as_array().cloned())
        .is_some_and(|rights| rights.iter().any(|x| x == "rollout"));
    let mut h = String::from("<table><tbody>");
    let _ = write!(
        h,
        "<tr><th>Phase</th>{}</tr><tr><th>Wave</th><td><span data-rollout=\"{n}\" \
         data-field=\"wave\">{}</span> of {}</td></tr><tr><th>Progress</th>{}</tr>\
         <tr><th>Waiting for</th>{}</tr><tr><th>Reason</th>{}</tr>",
        live_cell(&r, "phase"),
        text(&r["wave"]),
        text(&r["waves"]),
        progress(&r),
        status_cell("waiting", &r["waiting"]),
        status_cell("reason", &r["reason"]),
        n = esc(&name),
    );
    h += "</tbody></table>";
    if may_control {
        h += "<div class=\"actions\">";
        let phase = r["phase"].as_str().unwrap_or("");
        let offered: &[&str] = match phase {
            "active" => &["pause", "abort"],
            "paused" | "halted" => &["resume", "abort"],
            _ => &[],
        };
        for action in offered {
            let _ = write!(
                h,
                "<form method=\"post\" action=\"/rollouts/{}/{action}\">\
                 <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
                 <button id=\"{action}\">{}</button></form>",
                url_part(&name),
                esc(&session.csrf),
                action[..1].to_uppercase() + &action[1..],
            );
        }
        h += "</div>";
    }
    h += "<h2>Devices by status</h2>";
    let counts: Vec<Value> = r["counts"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| json!({"status": k, "devices": v}))
                .collect()
        })
        .unwrap_or_default();
    table(&mut h, &Value::Array(counts), &["Status", "Devices"], |c| {
        let status = c["status"].as_str().unwrap_or("");
        vec![
            cell(&c["status"]),
            format!(
                "<td class=\"n\" data-rollout=\"{}\" data-field=\"counts.{}\">{}</td>",
                esc(&name),
                esc(status),
                text(&c["devices"])
            ),
        ]
    });
    h += "<h2>Waves</h2>";
    table(
        &mut h,
        &r["wave_rows"],
        &["Wave", "Planned", "Devices", "State", "Counts"],
        |w| {
            let i = w["wave"].as_u64().unwrap_or(1).saturating_sub(1);
            vec![
                num_cell(&w["wave"]),
                num_cell(&w["planned"]),
                status_cell(&format!("wave_rows.{i}.devices"), &w["devices"]).replacen(
                    "<td",
                    "<td class=\"n\"",
                    1,
                ),
                status_cell(&format!("wave_rows.{i}.state"), &w["state"]),
                format!(
                    "<td><code data-status=\"wave_rows.{i}.counts\">{}</code></td>",
                    esc(&w["counts"].to_string())
                ),
            ]
        },
    );
    h += "<h2>Health gate</h2><table><tbody>";
    for (label, field) in [
        ("Soak (s)", "soak_s"),
        ("Checked", "checked"),
        ("Unhealthy", "unhealthy"),
    ] {
        let _ = write!(
            h,
            "<tr><th>{label}</th>{}</tr>",
            status_cell(&format!("health.{field}"), &r["health"][field])
        );
    }
    h += "</tbody></table>";
    table(
        &mut h,
        &r["health"]["examples"],
        &["Unhealthy device", "Why"],
        |e| vec![cell(&e["id"]), cell(&e["why"])],
    );
    h += "<h2>Failures</h2>";
    table(&mut h, &r["failures"], &["Device", "Reason"], |f| {
        vec![cell(&f["id"]), cell(&f["reason"])]
    });
    let title = format!("Rollout {name}");
    Ok(layout_for(&session, "/rollouts", &title, &h, Some(&name)))
}

pub(super) async fn compliance(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
) -> Result<Html<String>, Failure> {
    let r = ask(&state, &session, "compliance", json!({"limit": 50}), false).await?;
    let mut h = String::from(
        "<p><a href=\"/compliance/report.html\" download>Download the auditor's HTML report</a> \
         (the same page as <code>cityplane compliance report --html</code>)</p>",
    );
    if r["policy_version"].is_null() {
        h += "<p class=\"meta\">No security policy is published yet (cityplane policy apply -f policy.toml).</p>";
    } else {
        h += &compliance_html::report_sections(&r);
    }
    Ok(layout(&session, "/compliance", "Compliance", &h))
}

pub(super) async fn compliance_report(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
) -> Result<Response, Failure> {
    let r = ask(
        &state,
        &session,
        "compliance",
        json!({"limit": 1000}),
        false,
    )
    .await?;
    Ok((
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"cityplane-compliance.html\"",
            ),
        ],
        compliance_html::render_html(&r),
    )
        .into_response())
}

pub(super) async fn audit(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Html<String>, Failure> {
    let verify = ask(&state, &session, "audit-verify", json!({}), false).await;
    let mut h = match &verify {
        Ok(v) if v["ok"] == true => format!(
            "<p class=\"ok\" id=\"chain\">Hash chain verified up to entry {}.</p>",
            text(&v["head"]["seq"])
        ),
        Ok(v) => format!(
            "<p class=\"err\" id=\"chain\">Hash chain BROKEN at entry {}: {}</p>",
            text(&v["seq"]),
            text(&v["reason"])
        ),
        Err(e) => format!(
            "<p class=\"err\" id=\"chain\">Chain not verified: {}</p>",
            esc(&e.message)
        ),
    };
    h += "<form method=\"get\" action=\"/audit\">";
    for (field, label) in [
        ("who", "Operator"),
        ("org", "Organisation"),
        ("device", "Device"),
        ("since", "Since (RFC 3339)"),
        ("until", "Until"),
    ] {
        let _ = write!(
            h,
            "<label>{label} <input name=\"{field}\" size=\"14\" value=\"{}\"></label> ",
            esc(q.get(field).map(String::as_str).unwrap_or(""))
        );
    }
    h += "<button>Filter</button></form>";
    let r = ask(&state, &session, "audit", audit_query(&q), false).await?;
    let mut entries = r["entries"].as_array().cloned().unwrap_or_default();
    entries.reverse();
    table(
        &mut h,
        &Value::Array(entries),
        &[
            "Seq",
            "At",
            "Operator",
            "Organisation",
            "Action",
            "Name",
            "Result",
        ],
        |e| {
            vec![
                num_cell(&e["seq"]),
                cell(&e["at"]),
                cell(&e["who"]),
                cell(&e["org"]),
                cell(&e["action"]),
                cell(&e["name"]),
                cell(&e["result"]),
            ]
        },
    );
    Ok(layout(&session, "/audit", "Audit", &h))
}
