//! The auditor's page: a compliance report (the controller's `compliance`
//! answer, docs/examples/compliance.json) as one self-contained HTML file.
//! Inline CSS and SVG, no script and nothing fetched, so it can be mailed,
//! archived and opened offline years later.
//!
//! Device ids, reasons and descriptions come from devices and operators:
//! every string is escaped, and severities become CSS classes only from a
//! fixed list. Missing fields show as "—"; nothing here panics on any JSON.

use std::fmt::Write as _;

use serde_json::Value;

/// Points the history chart draws at most: more only blurs a 720-pixel line.
const MAX_POINTS: usize = 720;
const DASH: &str = "—";

/// The report as an HTML page.
pub fn render_html(report: &Value) -> String {
    let mut h = String::with_capacity(16 * 1024);
    let org = text(&report["org"]);
    let title = format!("Security policy compliance — {org}");
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{title}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<h1>{title}</h1>\n\
         <p class=\"meta\">Policy version <b>{}</b> · evaluated at <b>{}</b> · scope: <b>{}</b></p>\n",
        text(&report["policy_version"]),
        text(&report["evaluated_at"]),
        text(&report["scope"]),
    );
    let _ = writeln!(
        h,
        "<section class=\"headline\"><div class=\"big\">{}</div>\
         <div>compliant: <b>{}</b> of <b>{}</b> devices<br>with an exception: <b>{}</b><br>\
         violations: <b>{}</b></div></section>",
        percent(&report["compliant_pct"]),
        text(&report["compliant"]),
        text(&report["total"]),
        text(&report["excepted"]),
        text(&report["violations_total"]),
    );
    h += "<h2>Compliance over time</h2>\n";
    h += &chart(&report["history"]);

    h += "<h2>By rule</h2>\n";
    table(
        &mut h,
        &report["by_rule"],
        &[
            "Rule",
            "Severity",
            "Mode",
            "Description",
            "Violations",
            "Excepted",
        ],
        |r| {
            vec![
                cell(&r["rule"]),
                severity(&r["severity"]),
                cell(&r["mode"]),
                cell(&r["description"]),
                num_cell(&r["violations"]),
                num_cell(&r["excepted"]),
            ]
        },
    );
    for (key, heading) in [
        ("class", "By class"),
        ("zone", "By zone"),
        ("owner", "By owner"),
    ] {
        let _ = writeln!(h, "<h2>{heading}</h2>");
        let name = format!("{}{}", key[..1].to_uppercase(), &key[1..]);
        table(
            &mut h,
            &report[format!("by_{key}")],
            &[&name, "Devices", "Compliant", "Compliant %"],
            |r| {
                vec![
                    cell(&r[key]),
                    num_cell(&r["total"]),
                    num_cell(&r["compliant"]),
                    bar(&r["compliant_pct"]),
                ]
            },
        );
    }

    h += "<h2>Devices most at risk</h2>\n";
    table(
        &mut h,
        &report["worst"],
        &["Device", "Class", "Zone", "Owner", "Score", "Violations"],
        |r| {
            let list = match r["violations"].as_array() {
                Some(vs) if !vs.is_empty() => {
                    let items: String = vs
                        .iter()
                        .map(|v| {
                            format!(
                                "<li>{} {}: {}{}</li>",
                                severity_tag(&v["severity"]),
                                text(&v["rule"]),
                                text(&v["reason"]),
                                if v["excepted"] == true {
                                    " <i>(excepted)</i>"
                                } else {
                                    ""
                                }
                            )
                        })
                        .collect();
                    format!("<td><ul>{items}</ul></td>")
                }
                _ => format!("<td>{DASH}</td>"),
            };
            vec![
                cell(&r["id"]),
                cell(&r["class"]),
                cell(&r["zone"]),
                cell(&r["owner"]),
                num_cell(&r["score"]),
                list,
            ]
        },
    );

    h += "<h2>Violations</h2>\n";
    let shown = report["violations"].as_array().map_or(0, Vec::len);
    let _ = writeln!(
        h,
        "<p class=\"meta\">showing {shown} of {} violations</p>",
        text(&report["violations_total"])
    );
    table(
        &mut h,
        &report["violations"],
        &["Device", "Rule", "Severity", "Since", "Reason", "Excepted"],
        |r| {
            vec![
                cell(&r["id"]),
                cell(&r["rule"]),
                severity(&r["severity"]),
                cell(&r["since"]),
                cell(&r["reason"]),
                cell(&r["excepted"]),
            ]
        },
    );
    let _ = write!(
        h,
        "<footer>Generated by cityplane from policy version {} at {}.</footer>\n</body>\n</html>\n",
        text(&report["policy_version"]),
        text(&report["evaluated_at"]),
    );
    h
}

const CSS: &str = "body{font:15px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;\
padding:0 1em;color:#1b1f24}h1{font-size:1.6em;margin-bottom:.2em}h2{margin-top:1.8em;\
border-bottom:1px solid #d0d7de;padding-bottom:.2em}.meta{color:#57606a}\
.headline{display:flex;gap:2em;align-items:center}.big{font-size:4em;font-weight:700}\
table{border-collapse:collapse;width:100%;font-size:.92em}th,td{border:1px solid #d0d7de;\
padding:.3em .5em;text-align:left;vertical-align:top}th{background:#f6f8fa}td.n{text-align:right}\
ul{margin:0;padding-left:1.1em}.sev{font-weight:600;padding:0 .3em;border-radius:3px}\
.sev-low{background:#ddf4ff}.sev-medium{background:#fff8c5}.sev-high{background:#ffd8b5}\
.sev-critical{background:#ffcecb}.bar{display:inline-block;height:.7em;background:#2da44e;\
margin-right:.4em}svg text{font-size:11px;fill:#57606a}footer{margin-top:2em;color:#57606a;\
font-size:.85em}@media print{.big{font-size:3em}}";

/// HTML-escapes text (also for attribute values).
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out += "&amp;",
            '<' => out += "&lt;",
            '>' => out += "&gt;",
            '"' => out += "&quot;",
            '\'' => out += "&#39;",
            c => out.push(c),
        }
    }
    out
}

/// Any JSON as escaped text; missing or null is "—".
fn text(v: &Value) -> String {
    match v {
        Value::Null => DASH.to_owned(),
        Value::String(s) if s.is_empty() => DASH.to_owned(),
        Value::String(s) => esc(s),
        Value::Bool(true) => "yes".to_owned(),
        Value::Bool(false) => "no".to_owned(),
        Value::Number(n) => n.to_string(),
        other => esc(&other.to_string()),
    }
}

fn percent(v: &Value) -> String {
    match v.as_f64() {
        Some(p) if p.is_finite() => format!("{p:.1}%"),
        _ => DASH.to_owned(),
    }
}

fn cell(v: &Value) -> String {
    format!("<td>{}</td>", text(v))
}

fn num_cell(v: &Value) -> String {
    format!("<td class=\"n\">{}</td>", text(v))
}

/// A severity, coloured only if it is one we know: the class attribute
/// never carries input.
fn severity_tag(v: &Value) -> String {
    match v.as_str() {
        Some(s @ ("low" | "medium" | "high" | "critical")) => {
            format!("<span class=\"sev sev-{s}\">{s}</span>")
        }
        _ => text(v),
    }
}

fn severity(v: &Value) -> String {
    format!("<td>{}</td>", severity_tag(v))
}

fn bar(v: &Value) -> String {
    match v.as_f64() {
        Some(p) if p.is_finite() => {
            let width = p.clamp(0.0, 100.0);
            format!(
                "<td><span class=\"bar\" style=\"width:{width:.0}px\"></span>{}</td>",
                percent(v)
            )
        }
        _ => format!("<td>{DASH}</td>"),
    }
}

/// A table of `rows` (an array of objects), or a line saying there is none.
fn table(h: &mut String, rows: &Value, headers: &[&str], row: impl Fn(&Value) -> Vec<String>) {
    let rows = match rows.as_array() {
        Some(rows) if !rows.is_empty() => rows,
        _ => {
            h.push_str("<p class=\"meta\">None.</p>\n");
            return;
        }
    };
    h.push_str("<table>\n<thead><tr>");
    for head in headers {
        let _ = write!(h, "<th>{}</th>", esc(head));
    }
    h.push_str("</tr></thead>\n<tbody>\n");
    for r in rows {
        h.push_str("<tr>");
        for c in row(r) {
            h.push_str(&c);
        }
        h.push_str("</tr>\n");
    }
    h.push_str("</tbody>\n</table>\n");
}

/// The compliant share over time as an SVG line: y 0–100 %, x the
/// snapshots in order (evenly spaced: they are taken at a fixed interval).
fn chart(history: &Value) -> String {
    let points: Vec<(&Value, f64)> = history
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| {
                    let pct = p["compliant_pct"].as_f64().filter(|x| x.is_finite())?;
                    Some((&p["at"], pct.clamp(0.0, 100.0)))
                })
                .collect()
        })
        .unwrap_or_default();
    if points.is_empty() {
        return "<p class=\"meta\">No history yet.</p>\n".to_owned();
    }
    // Every step-th point, and always the last: the newest value is the one
    // an auditor compares with the headline.
    let step = points.len().div_ceil(MAX_POINTS).max(1);
    let mut drawn: Vec<(usize, &(&Value, f64))> = points.iter().enumerate().step_by(step).collect();
    if drawn.last().map(|(i, _)| *i) != Some(points.len() - 1) {
        drawn.push((points.len() - 1, &points[points.len() - 1]));
    }
    let (w, h, left, right, top, bottom) = (760.0, 240.0, 44.0, 12.0, 10.0, 36.0);
    let plot_w = w - left - right;
    let plot_h = h - top - bottom;
    let last = (points.len() - 1).max(1) as f64;
    let x = |i: usize| {
        if points.len() == 1 {
            left + plot_w / 2.0
        } else {
            left + plot_w * i as f64 / last
        }
    };
    let y = |p: f64| top + plot_h * (1.0 - p / 100.0);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {w} {h}\" width=\"100%\" \
         role=\"img\" aria-label=\"compliant devices in percent over time\">\n"
    );
    for tick in [0.0, 25.0, 50.0, 75.0, 100.0] {
        let _ = writeln!(
            s,
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#d0d7de\"/>\
             <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{tick}%</text>",
            w - right,
            left - 6.0,
            y(tick) + 4.0,
            y = y(tick),
        );
    }
    let _ = writeln!(
        s,
        "<line x1=\"{left}\" x2=\"{left}\" y1=\"{top}\" y2=\"{}\" stroke=\"#57606a\"/>",
        top + plot_h
    );
    let line: Vec<String> = drawn
        .iter()
        .map(|(i, (_, p))| format!("{:.1},{:.1}", x(*i), y(*p)))
        .collect();
    let _ = writeln!(
        s,
        "<polyline fill=\"none\" stroke=\"#0969da\" stroke-width=\"2\" points=\"{}\"/>",
        line.join(" ")
    );
    if let Some((i, (_, p))) = drawn.last() {
        let _ = writeln!(
            s,
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3.5\" fill=\"#0969da\"/>",
            x(*i),
            y(*p)
        );
    }
    let base = top + plot_h + 16.0;
    let first_at = text(points[0].0);
    let last_at = text(points[points.len() - 1].0);
    let _ = writeln!(
        s,
        "<text x=\"{left}\" y=\"{base}\">{first_at}</text><text x=\"{}\" y=\"{base}\" \
         text-anchor=\"end\">{last_at}</text><text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{} \
         snapshots</text>",
        w - right,
        left + plot_w / 2.0,
        base + 14.0,
        points.len()
    );
    s += "</svg>\n";
    s
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn sample() -> Value {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/examples/compliance.json");
        serde_json::from_str(&std::fs::read_to_string(path).expect("sample")).expect("json")
    }

    #[test]
    fn the_sample_report_renders_every_section() {
        let page = render_html(&sample());
        for says in [
            "<!DOCTYPE html>",
            "Policy version <b>3</b>",
            "90.0%",
            "<polyline",
            "By rule",
            "telnet-off",
            "By zone",
            "cam-0001",
            "showing 2 of 61 violations",
            "sev-high",
        ] {
            assert!(page.contains(says), "missing {says:?}");
        }
        // Self-contained: nothing loaded, nothing run.
        for never in ["<script", "src=", "href=", "@import", "url("] {
            assert!(!page.contains(never), "page has {never:?}");
        }
    }

    #[test]
    fn every_string_from_devices_is_escaped() {
        let evil = "<script>alert(1)</script>\"'&";
        let mut r = sample();
        r["org"] = json!(evil);
        r["violations"][0]["reason"] = json!(evil);
        r["violations"][0]["id"] = json!(evil);
        r["by_rule"][0]["description"] = json!(evil);
        r["by_rule"][0]["severity"] = json!("high\" onmouseover=\"x");
        r["worst"][0]["violations"][0]["reason"] = json!(evil);
        r["history"][0]["at"] = json!(evil);
        let page = render_html(&r);
        assert!(!page.contains("<script"), "unescaped");
        assert!(!page.contains("onmouseover=\""), "attribute injection");
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;&quot;&#39;&amp;"));
    }

    #[test]
    fn missing_fields_and_odd_shapes_render_as_dashes() {
        for report in [
            json!({}),
            json!(null),
            json!([1, 2]),
            json!({"total": "many", "compliant_pct": "x", "history": {}, "by_rule": [1, null, "x"],
                   "worst": [{"violations": "none"}], "violations": [{}]}),
        ] {
            let page = render_html(&report);
            assert!(page.contains("</html>"));
            assert!(page.contains(DASH));
        }
    }

    #[test]
    fn the_chart_handles_no_one_and_many_points() {
        let point = |i: usize| json!({"at": format!("t{i}"), "compliant_pct": (i % 101) as f64});
        assert!(chart(&json!([])).contains("No history yet"));
        let one = chart(&json!([point(50)]));
        assert!(one.contains("<polyline") && one.contains("1 snapshots"));
        let many: Vec<Value> = (0..2000).map(point).collect();
        let svg = chart(&Value::Array(many));
        let drawn = svg
            .split("points=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .map_or(0, |p| p.split(' ').count());
        assert!((2..=MAX_POINTS + 1).contains(&drawn), "{drawn} points");
        assert!(svg.contains("t1999") && svg.contains("2000 snapshots"));
        // Out-of-range values stay on the chart.
        let wild = chart(&json!([{"compliant_pct": -5}, {"compliant_pct": 1e308}]));
        assert!(!wild.contains("NaN") && !wild.contains("inf"));
    }
}
