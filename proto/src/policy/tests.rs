use super::*;
use serde_json::json;

const NOW: u64 = 1_800_000_000_000;

fn rule(check: Value) -> Rule {
    serde_json::from_value(json!({
        "id": "r", "description": "a rule", "severity": "high",
        "selector": {"all": true}, "check": check,
    }))
    .expect("rule parses")
}

fn attrs() -> Attributes {
    Attributes {
        class: Some("camera".into()),
        labels: [("zone".to_owned(), "north".to_owned())].into(),
        owner: None,
    }
}

/// Evaluates `check` on a device reporting `reported`; `None` is a pass.
fn eval(check: Value, reported: Value) -> Option<String> {
    let reported = match reported {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    let attrs = attrs();
    let facts = Facts {
        id: "cam-1",
        attrs: &attrs,
        reported: &reported,
        cert_not_after_ms: Some(NOW + 40 * 86_400_000),
        last_seen_ms: Some(NOW - 5 * 60_000),
        now_ms: NOW,
    };
    match rule(check).evaluate(&facts) {
        Outcome::Pass => None,
        Outcome::Fail(why) => Some(why),
    }
}

/// One table: check, reported state, expected reason (None = pass).
#[test]
fn every_subject_and_test() {
    let cases: &[(Value, Value, Option<&str>)] = &[
        // equals / not_equals
        (
            json!({"reported": "telnet", "equals": false}),
            json!({"telnet": false}),
            None,
        ),
        (
            json!({"reported": "telnet", "equals": false}),
            json!({"telnet": true}),
            Some("telnet is true, must be false"),
        ),
        (
            json!({"reported": "telnet", "equals": false}),
            json!({}),
            Some("telnet is not reported"),
        ),
        (
            json!({"reported": "telnet", "equals": false}),
            json!({"telnet": null}),
            Some("telnet is not reported"),
        ),
        (
            json!({"reported": "telnet", "equals": false}),
            json!({"telnet": "false"}),
            Some("telnet is \"false\", must be false"),
        ),
        (
            json!({"reported": "dim", "equals": 1}),
            json!({"dim": 1.0}),
            None,
        ),
        (
            json!({"reported": "ntp", "not_equals": "pool.ntp.org"}),
            json!({"ntp": "ntp1"}),
            None,
        ),
        (
            json!({"reported": "ntp", "not_equals": "pool.ntp.org"}),
            json!({"ntp": "pool.ntp.org"}),
            Some("ntp is \"pool.ntp.org\", must not be"),
        ),
        (
            json!({"reported": "ntp", "not_equals": "x"}),
            json!({}),
            Some("ntp is not reported"),
        ),
        // one_of
        (
            json!({"reported": "tls", "one_of": ["1.2", "1.3"]}),
            json!({"tls": "1.3"}),
            None,
        ),
        (
            json!({"reported": "tls", "one_of": ["1.2", "1.3"]}),
            json!({"tls": "1.0"}),
            Some("tls is \"1.0\", must be one of \"1.2\", \"1.3\""),
        ),
        (
            json!({"reported": "tls", "one_of": ["1.2"]}),
            json!({}),
            Some("tls is not reported"),
        ),
        // subset_of (a scalar is a list of one)
        (
            json!({"reported": "services", "subset_of": ["https", "mqtts"]}),
            json!({"services": ["https"]}),
            None,
        ),
        (
            json!({"reported": "services", "subset_of": ["https", "mqtts"]}),
            json!({"services": []}),
            None,
        ),
        (
            json!({"reported": "services", "subset_of": ["https", "mqtts"]}),
            json!({"services": "mqtts"}),
            None,
        ),
        (
            json!({"reported": "services", "subset_of": ["https", "mqtts"]}),
            json!({"services": ["https", "telnet"]}),
            Some("services has \"telnet\", allowed: \"https\", \"mqtts\""),
        ),
        (
            json!({"reported": "services", "subset_of": ["https"]}),
            json!({}),
            Some("services is not reported"),
        ),
        // excludes
        (
            json!({"reported": "services", "excludes": ["telnet"]}),
            json!({"services": ["ssh"]}),
            None,
        ),
        (
            json!({"reported": "services", "excludes": ["telnet"]}),
            json!({"services": ["ssh", "telnet"]}),
            Some("services has \"telnet\", which is not allowed"),
        ),
        (
            json!({"reported": "services", "excludes": ["telnet"]}),
            json!({"services": "telnet"}),
            Some("services has \"telnet\", which is not allowed"),
        ),
        (
            json!({"reported": "services", "excludes": ["telnet"]}),
            json!({}),
            Some("services is not reported"),
        ),
        // version_at_least
        (
            json!({"reported": "firmware", "version_at_least": "4.2"}),
            json!({"firmware": "4.10.0"}),
            None,
        ),
        (
            json!({"reported": "firmware", "version_at_least": "4.2"}),
            json!({"firmware": "4.2"}),
            None,
        ),
        (
            json!({"reported": "firmware", "version_at_least": "4.2"}),
            json!({"firmware": "4.1.9"}),
            Some("firmware is \"4.1.9\", must be at least 4.2"),
        ),
        (
            json!({"reported": "firmware", "version_at_least": "4.2"}),
            json!({"firmware": "v5"}),
            Some("firmware is \"v5\", not a version"),
        ),
        (
            json!({"reported": "firmware", "version_at_least": "4.2"}),
            json!({"firmware": 5}),
            Some("firmware is 5, must be a version string"),
        ),
        (
            json!({"reported": "firmware", "version_at_least": "4.2"}),
            json!({}),
            Some("firmware is not reported"),
        ),
        // at_least / at_most
        (
            json!({"reported": "key_bits", "at_least": 2048}),
            json!({"key_bits": 4096}),
            None,
        ),
        (
            json!({"reported": "key_bits", "at_least": 2048}),
            json!({"key_bits": 1024}),
            Some("key_bits is 1024, must be at least 2048"),
        ),
        (
            json!({"reported": "key_bits", "at_least": 2048}),
            json!({"key_bits": "4096"}),
            Some("key_bits is \"4096\", must be a number"),
        ),
        (
            json!({"reported": "key_bits", "at_least": 2048}),
            json!({}),
            Some("key_bits is not reported"),
        ),
        (
            json!({"reported": "sessions", "at_most": 2.5}),
            json!({"sessions": 2}),
            None,
        ),
        (
            json!({"reported": "sessions", "at_most": 2}),
            json!({"sessions": 3}),
            Some("sessions is 3, must be at most 2"),
        ),
        (
            json!({"reported": "sessions", "at_most": 2}),
            json!({"sessions": [1]}),
            Some("sessions is [1], must be a number"),
        ),
        // present
        (
            json!({"reported": "debug", "present": false}),
            json!({}),
            None,
        ),
        (
            json!({"reported": "debug", "present": false}),
            json!({"debug": 1}),
            Some("debug is 1, must be absent"),
        ),
        (
            json!({"reported": "ntp", "present": true}),
            json!({"ntp": "x"}),
            None,
        ),
        (
            json!({"reported": "ntp", "present": true}),
            json!({}),
            Some("ntp is not reported"),
        ),
        // label and attribute (registry)
        (
            json!({"label": "zone", "one_of": ["north", "south"]}),
            json!({}),
            None,
        ),
        (
            json!({"label": "zone", "equals": "south"}),
            json!({}),
            Some("label zone is \"north\", must be \"south\""),
        ),
        (
            json!({"label": "street", "present": true}),
            json!({}),
            Some("label street is not reported"),
        ),
        (
            json!({"attribute": "class", "equals": "camera"}),
            json!({}),
            None,
        ),
        (
            json!({"attribute": "owner", "present": true}),
            json!({}),
            Some("owner is not reported"),
        ),
        (
            json!({"attribute": "owner", "present": false}),
            json!({}),
            None,
        ),
        // identity and liveness (certificate: 40 days left; seen 5 minutes ago)
        (json!({"certificate_valid_days": 30}), json!({}), None),
        (
            json!({"certificate_valid_days": 60}),
            json!({}),
            Some("the certificate expires in 40 days, must be more than 60"),
        ),
        (json!({"seen_within_minutes": 10}), json!({}), None),
        (
            json!({"seen_within_minutes": 2}),
            json!({}),
            Some("last seen 5 minutes ago, must be within 2"),
        ),
    ];
    for (check, reported, want) in cases {
        let got = eval(check.clone(), reported.clone());
        assert_eq!(got.as_deref(), *want, "{check} on {reported}");
    }
}

#[test]
fn unknown_time_facts_fail_closed() {
    let attrs = attrs();
    let reported = Map::new();
    let mut facts = Facts {
        id: "cam-1",
        attrs: &attrs,
        reported: &reported,
        cert_not_after_ms: None,
        last_seen_ms: None,
        now_ms: NOW,
    };
    let cert = rule(json!({"certificate_valid_days": 30}));
    let seen = rule(json!({"seen_within_minutes": 10}));
    assert_eq!(
        cert.evaluate(&facts),
        Outcome::Fail("the certificate's expiry is not known".into())
    );
    assert_eq!(seen.evaluate(&facts), Outcome::Fail("never seen".into()));
    facts.cert_not_after_ms = Some(NOW - 3 * 86_400_000);
    assert_eq!(
        cert.evaluate(&facts),
        Outcome::Fail("the certificate expired 3 days ago".into())
    );
    // Clock skew: seen "in the future" is seen now.
    facts.last_seen_ms = Some(NOW + 60_000);
    assert_eq!(seen.evaluate(&facts), Outcome::Pass);
    // Extremes do not overflow.
    facts.now_ms = u64::MAX;
    facts.last_seen_ms = Some(0);
    facts.cert_not_after_ms = Some(0);
    assert!(!seen.evaluate(&facts).is_pass());
    assert!(!cert.evaluate(&facts).is_pass());
    assert!(cert.is_time_based() && seen.is_time_based());
    assert!(!rule(json!({"reported": "a", "present": true})).is_time_based());
}

#[test]
fn reasons_quote_device_values_briefly() {
    let long = "x".repeat(10_000);
    let why = eval(
        json!({"reported": "ntp", "equals": "a"}),
        json!({"ntp": long}),
    )
    .expect("fails");
    assert!(why.chars().count() < 120, "{why}");
    let nested = json!({"ntp": {"a": [1, 2, {"b": "y".repeat(500)}]}});
    let why = eval(json!({"reported": "ntp", "equals": "a"}), nested).expect("fails");
    assert!(why.chars().count() < 120, "{why}");
    // Control characters come out escaped, multi-byte characters are cut whole.
    let why = eval(
        json!({"reported": "ntp", "equals": "a"}),
        json!({"ntp": format!("\u{1b}[31m{}", "é".repeat(100))}),
    )
    .expect("fails");
    assert!(!why.contains('\u{1b}') && why.contains("\\u001b"), "{why}");
}

/// Values a device could report, deterministic but varied.
fn arbitrary(rng: &mut u64, depth: u32) -> Value {
    *rng ^= *rng << 13;
    *rng ^= *rng >> 7;
    *rng ^= *rng << 17;
    let r = *rng;
    match (r % 9, depth) {
        (0, _) => Value::Null,
        (1, _) => json!(r & 1 == 0),
        (2, _) => json!((r >> 8) as i64 - (1 << 40)),
        (3, _) => json!(f64::from_bits(r >> 2) % 1e300),
        (4, _) => json!(u64::MAX - (r % 3)),
        (5, _) => json!(["4.2", "1..2", "", "9999999999.1", "٣.٤", "4.2.0.0.1"][(r % 6) as usize]),
        (6, d) if d < 4 => Value::Array((0..r % 4).map(|_| arbitrary(rng, d + 1)).collect()),
        (7, d) if d < 4 => {
            let mut m = Map::new();
            for i in 0..r % 3 {
                m.insert(format!("k{i}"), arbitrary(rng, d + 1));
            }
            Value::Object(m)
        }
        _ => json!("x".repeat((r % 100) as usize)),
    }
}

#[test]
fn evaluate_and_forbids_never_panic_on_any_json() {
    let checks = [
        json!({"reported": "v", "equals": {"a": 1}}),
        json!({"reported": "v", "not_equals": 1.5}),
        json!({"reported": "v", "one_of": [1, "a", null]}),
        json!({"reported": "v", "subset_of": [1, "a"]}),
        json!({"reported": "v", "excludes": [[1]]}),
        json!({"reported": "v", "version_at_least": "4.2"}),
        json!({"reported": "v", "at_least": -1e308}),
        json!({"reported": "v", "at_most": 18446744073709551615u64}),
        json!({"reported": "v", "present": false}),
    ];
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..3000 {
        let v = arbitrary(&mut rng, 0);
        for c in &checks {
            let _ = eval(c.clone(), json!({ "v": v }));
            let _ = rule(c.clone()).forbids("v", &v);
        }
    }
}

#[test]
fn forbids_is_about_one_key_and_ignores_unmanaging() {
    let telnet = rule(json!({"reported": "telnet", "equals": false}));
    assert_eq!(telnet.forbids("telnet", &json!(false)), None);
    assert_eq!(
        telnet.forbids("telnet", &json!(true)).as_deref(),
        Some("telnet is true, must be false")
    );
    assert_eq!(telnet.forbids("telnet", &Value::Null), None);
    assert_eq!(telnet.forbids("ssh", &json!(true)), None);
    assert_eq!(telnet.reported_key(), Some("telnet"));
    let debug = rule(json!({"reported": "debug", "present": false}));
    assert!(debug.forbids("debug", &json!(1)).is_some());
    let cert = rule(json!({"certificate_valid_days": 30}));
    assert_eq!(cert.forbids("telnet", &json!(true)), None);
    assert_eq!(cert.reported_key(), None);
}

#[test]
fn applies_to_uses_the_selector() {
    let mut r = rule(json!({"reported": "telnet", "equals": false}));
    r.selector = Selector {
        class: Some("camera".into()),
        ..Selector::default()
    };
    assert!(r.applies_to("cam-1", &attrs()));
    assert!(!r.applies_to("lamp-1", &Attributes::default()));
}

#[test]
fn modes_and_weights() {
    let mut r = rule(json!({"reported": "a", "present": true}));
    assert_eq!(r.effective_mode(Mode::Report), Mode::Report);
    assert_eq!(r.effective_mode(Mode::Enforce), Mode::Enforce);
    r.mode = Some(Mode::Report);
    assert_eq!(r.effective_mode(Mode::Enforce), Mode::Report);
    let w: Vec<u32> = [
        Severity::Low,
        Severity::Medium,
        Severity::High,
        Severity::Critical,
    ]
    .map(Severity::weight)
    .into();
    assert_eq!(w, [1, 3, 7, 15]);
    assert_eq!(
        format!("{:<6}|{:>8}", Severity::Low, Mode::Report),
        "low   |  report"
    );
    for bad in [r#"{"high": null}"#, r#""High""#, "1"] {
        assert!(serde_json::from_str::<Severity>(bad).is_err(), "{bad}");
    }
    assert!(serde_json::from_str::<Mode>(r#"{"enforce": null}"#).is_err());
}

fn policy(rules: Value) -> Value {
    json!({"mode": "report", "rules": rules})
}

fn r(id: &str, check: Value) -> Value {
    json!({"id": id, "description": "d", "severity": "low", "selector": {"class": "camera"}, "check": check})
}

/// Parses; returns the error text, or None if valid.
fn invalid(doc: Value) -> Option<String> {
    parse_policy(doc.to_string().as_bytes())
        .err()
        .map(|e| e.to_string())
}

#[test]
fn a_good_policy_parses_and_round_trips() {
    let doc = json!({
        "description": "City of Example, IoT security policy",
        "mode": "report",
        "rules": [
            {"id": "camera-firmware", "description": "Cameras run firmware 4.2 or later",
             "severity": "high", "selector": {"class": "camera"},
             "check": {"reported": "firmware", "version_at_least": "4.2"},
             "mode": "enforce", "remediation": {"firmware": "4.2.0", "waves": ["10%", "50%", "100%"]}},
            {"id": "telnet-off", "description": "Telnet is off", "severity": "critical",
             "selector": {"all": true}, "check": {"reported": "telnet", "equals": false},
             "mode": "enforce", "remediation": {"set": {"telnet": false}}},
            {"id": "cert", "description": "Certificates are renewed in time", "severity": "medium",
             "selector": {"all": true}, "check": {"certificate_valid_days": 30}},
        ]
    });
    let p = parse_policy(doc.to_string().as_bytes()).expect("valid");
    assert_eq!(p.rules.len(), 3);
    assert_eq!(serde_json::to_value(&p).expect("serializes"), doc);
    let waves = p.rules[0]
        .remediation
        .as_ref()
        .map(Remediation::wave_percents);
    assert_eq!(waves, Some(Ok(vec![10.0, 40.0, 50.0])));
}

#[test]
fn every_impossible_policy_is_a_clear_error() {
    let ok_check = json!({"reported": "telnet", "equals": false});
    let one = |check: Value| policy(json!([r("bad-rule", check)]));
    let with = |extra: Value| {
        let mut rule = r("bad-rule", json!({"reported": "telnet", "equals": false}));
        if let (Some(o), Value::Object(e)) = (rule.as_object_mut(), extra) {
            o.extend(e);
        }
        policy(json!([rule]))
    };
    let cases: Vec<(Value, &str)> = vec![
        (one(json!({"reported": "firmware", "version_at_least": "4.x"})), "rule bad-rule: version_at_least \"4.x\" is not a version"),
        (one(json!({"reported": "a", "at_least": "5"})), "rule bad-rule: at_least must be a number, not \"5\""),
        (one(json!({"reported": "a", "at_most": null})), "rule bad-rule: at_most must be a number"),
        (one(json!({"certificate_valid_days": 0})), "rule bad-rule: certificate_valid_days = 0: give 1 to 3650"),
        (one(json!({"certificate_valid_days": -5})), "certificate_valid_days = -5"),
        (one(json!({"certificate_valid_days": 3651})), "certificate_valid_days = 3651"),
        (one(json!({"seen_within_minutes": 0})), "rule bad-rule: seen_within_minutes = 0"),
        (one(json!({"seen_within_minutes": 525_601})), "seen_within_minutes = 525601"),
        (one(json!({"seen_within_minutes": 10, "equals": 1})), "rule bad-rule: seen_within_minutes is a test of its own: drop equals"),
        (one(json!({"reported": "a", "one_of": []})), "rule bad-rule: the list is empty"),
        (one(json!({"reported": "a", "one_of": (0..1001).collect::<Vec<_>>()})), "rule bad-rule: the list has more than 1000 values"),
        (one(json!({"reported": "a", "subset_of": []})), "rule bad-rule: the list is empty"),
        (one(json!({"reported": "a", "excludes": []})), "rule bad-rule: the list is empty"),
        (one(json!({"reported": "a"})), "rule bad-rule: the check has no test"),
        (one(json!({"equals": 1})), "rule bad-rule: the check has no subject"),
        (one(json!({"reported": "a", "label": "b", "equals": 1})), "the check has 2 subjects (reported and label)"),
        (one(json!({"reported": "a", "equals": 1, "one_of": [1]})), "the check has 2 tests (equals and one_of)"),
        (one(json!({"reported": "", "equals": 1})), "rule bad-rule: the check names an empty key"),
        (one(json!({"attribute": "zone", "equals": 1})), "rule bad-rule: attribute \"zone\" is not one of"),
        (one(json!({"reported": "a", "equals": 1, "bogus": 1})), "unknown field `bogus`"),
        (with(json!({"selector": {}})), "rule bad-rule: the selector is empty"),
        (with(json!({"selector": {"klass": "x"}})), "unknown field `klass`"),
        (with(json!({"description": ""})), "rule bad-rule: the description must say why"),
        (with(json!({"description": "x".repeat(1001)})), "rule bad-rule: the description must say why"),
        (with(json!({"id": "bad/id"})), "rule \"bad/id\": the id is not valid"),
        (with(json!({"severity": "severe"})), "unknown variant `severe`"),
        (with(json!({"mode": "enforce"})), "rule bad-rule: mode is enforce but there is no remediation"),
        (with(json!({"mode": "enforce", "remediation": {}})), "rule bad-rule: a remediation gives exactly one of"),
        (with(json!({"remediation": {"set": {}}})), "rule bad-rule: remediation set is empty"),
        (with(json!({"remediation": {"set": {"telnet": true}}})), "rule bad-rule: the remediation sets telnet to true, which fails the rule's own check (telnet is true, must be false)"),
        (with(json!({"remediation": {"set": {"telnet": false}, "waves": ["50%", "10%"]}})), "rule bad-rule: remediation waves: \"10%\" is not a share above"),
        (with(json!({"remediation": {"set": {"telnet": false}, "waves": ["50%"]}})), "the last wave must be \"100%\""),
        (with(json!({"remediation": {"set": {"telnet": false}, "waves": []}})), "remediation waves: give 1 to 100 waves"),
        (with(json!({"remediation": {"set": {"telnet": false}, "firmware": "4.2"}})), "rule bad-rule: a remediation gives exactly one of"),
        (with(json!({"remediation": {"set": {"telnet": false}, "waves": ["half"]}})), "\"half\" is not a share"),
        (with(json!({"remediation": {"firmware": "new"}})), "rule bad-rule: remediation firmware \"new\" is not a version"),
        (with(json!({"remediation": {"set": {"telnet": false}, "when": 1}})), "unknown field `when`"),
        (json!({"rules": [], "moed": "report"}), "unknown field `moed`"),
        (json!({"rules": [r("a", ok_check.clone()), r("a", json!({"reported": "ssh", "present": true}))]}), "rule a: the id is used by another rule"),
        (json!({"rules": (0..1001).map(|i| r(&format!("r{i}"), json!({"reported": format!("k{i}"), "present": true}))).collect::<Vec<_>>()}), "1001 rules: a policy has at most 1000"),
        (json!({"description": "x".repeat(1001), "rules": []}), "the description is longer than 1000"),
        (json!([]), "expected a JSON object"),
        (json!({"rules": [[]]}), "expected a JSON object"),
    ];
    for (doc, says) in cases {
        let err = invalid(doc.clone()).unwrap_or_else(|| panic!("accepted: {doc}"));
        assert!(err.contains(says), "{doc}\n  said: {err}\n  want: {says}");
    }
    // A firmware remediation below the rule's own floor.
    let mut low = r(
        "cam-fw",
        json!({"reported": "firmware", "version_at_least": "4.2"}),
    );
    low["remediation"] = json!({"firmware": "4.1.9"});
    let err = invalid(policy(json!([low]))).expect("refused");
    assert!(err.contains("rule cam-fw: the remediation installs firmware 4.1.9, below the rule's own version_at_least 4.2"), "{err}");
}

#[test]
fn contradicting_rules_are_refused() {
    let pair = |a: Value, b: Value| policy(json!([r("first", a), r("second", b)]));
    let contradictions = [
        (
            json!({"reported": "telnet", "equals": false}),
            json!({"reported": "telnet", "equals": true}),
        ),
        (
            json!({"reported": "ntp", "equals": "a"}),
            json!({"reported": "ntp", "not_equals": "a"}),
        ),
        (
            json!({"reported": "tls", "equals": "1.0"}),
            json!({"reported": "tls", "one_of": ["1.2", "1.3"]}),
        ),
        (
            json!({"reported": "tls", "one_of": ["1.0", "1.1"]}),
            json!({"reported": "tls", "one_of": ["1.2", "1.3"]}),
        ),
        (
            json!({"reported": "bits", "at_least": 4096}),
            json!({"reported": "bits", "at_most": 2048}),
        ),
        (
            json!({"reported": "fw", "equals": "3.0"}),
            json!({"reported": "fw", "version_at_least": "4.2"}),
        ),
        (
            json!({"reported": "debug", "present": false}),
            json!({"reported": "debug", "equals": 0}),
        ),
        (
            json!({"label": "zone", "equals": "north"}),
            json!({"label": "zone", "equals": "south"}),
        ),
    ];
    for (a, b) in contradictions {
        let err =
            invalid(pair(a.clone(), b.clone())).unwrap_or_else(|| panic!("accepted {a} with {b}"));
        assert!(
            err.starts_with("rule second: contradicts rule first on the same devices"),
            "{err}"
        );
    }
    let compatible = [
        (
            json!({"reported": "tls", "one_of": ["1.2", "1.3"]}),
            json!({"reported": "tls", "not_equals": "1.2"}),
        ),
        (
            json!({"reported": "bits", "at_least": 2048}),
            json!({"reported": "bits", "at_most": 4096}),
        ),
        (
            json!({"reported": "fw", "equals": "4.3"}),
            json!({"reported": "fw", "version_at_least": "4.2"}),
        ),
        // Different keys and different subjects never contradict.
        (
            json!({"reported": "a", "equals": 1}),
            json!({"reported": "b", "equals": 2}),
        ),
        (
            json!({"reported": "zone", "equals": 1}),
            json!({"label": "zone", "equals": 2}),
        ),
    ];
    for (a, b) in compatible {
        assert_eq!(invalid(pair(a.clone(), b.clone())), None, "{a} with {b}");
    }
    // Different selectors: the rules pick different devices (or the
    // contradiction is the operator's to see in compliance).
    let mut other = r("second", json!({"reported": "telnet", "equals": true}));
    other["selector"] = json!({"class": "streetlight"});
    let doc = policy(json!([
        r("first", json!({"reported": "telnet", "equals": false})),
        other
    ]));
    assert_eq!(invalid(doc), None);
}

#[test]
fn diff_names_rules_and_fields() {
    let old = parse_policy(
        policy(json!([
            r("keep", json!({"reported": "a", "present": true})),
            r("gone", json!({"reported": "b", "present": true})),
            r("tweak", json!({"reported": "c", "at_least": 1})),
        ]))
        .to_string()
        .as_bytes(),
    )
    .expect("valid");
    let mut new = old.clone();
    new.mode = Mode::Enforce;
    new.rules.retain(|r| r.id != "gone");
    new.rules[1].severity = Severity::Critical;
    new.rules[1].check.at_least = Some(json!(5));
    new.rules
        .push(rule(json!({"reported": "d", "present": true})));
    let d = diff(&old, &new);
    assert_eq!(d.added, ["r"]);
    assert_eq!(d.removed, ["gone"]);
    assert_eq!(d.changed.len(), 1);
    assert_eq!(d.changed[0].id, "tweak");
    let fields: Vec<&str> = d.changed[0]
        .fields
        .iter()
        .map(|f| f.field.as_str())
        .collect();
    assert_eq!(fields, ["check", "severity"]);
    assert_eq!(d.policy.len(), 1);
    let text = d.to_string();
    for says in [
        "~ policy mode: \"report\" → \"enforce\"",
        "+ rule r",
        "- rule gone",
        "~ rule tweak",
        "severity: \"low\" → \"critical\"",
    ] {
        assert!(text.contains(says), "{says:?} in\n{text}");
    }
    assert!(diff(&old, &old).is_empty());
    assert_eq!(diff(&old, &old).to_string(), "no changes\n");
    let json = serde_json::to_value(&d).expect("serializes");
    assert_eq!(json["removed"], json!(["gone"]));
}

#[test]
fn a_dotted_path_reads_nested_objects_in_evaluation_and_admission() {
    let telnet = json!({"reported": "security.services.telnet", "equals": false});
    let sec = |on: bool| json!({"security": {"services": {"telnet": on}, "ntp": "x"}});
    assert_eq!(eval(telnet.clone(), sec(false)), None);
    assert!(eval(telnet.clone(), sec(true)).is_some());
    assert!(eval(telnet.clone(), json!({"security": {"ntp": "x"}})).is_some());
    assert!(eval(telnet.clone(), json!({"security": "flat"})).is_some());
    // A top-level key holding a dot is read as it is.
    assert_eq!(
        eval(telnet.clone(), json!({"security.services.telnet": false})),
        None
    );
    let r = rule(telnet);
    assert!(r
        .forbids("security", &json!({"services": {"telnet": true}}))
        .is_some());
    assert!(r
        .forbids("security", &json!({"services": {"telnet": false}}))
        .is_none());
    // Setting the object without the value would leave it unset.
    assert!(r.forbids("security", &json!({"ntp": "x"})).is_some());
    assert!(r
        .forbids("securityx", &json!({"services": {"telnet": true}}))
        .is_none());
    assert!(r.forbids("security", &Value::Null).is_none());
}

/// Labels and attributes go through the same tests as reported keys: every
/// test on the label `zone` = "north" and the class "camera" agrees with the
/// same test on a reported key holding that string, missing values included.
#[test]
fn registry_subjects_take_every_test() {
    let tests = [
        json!({"equals": "north"}),
        json!({"equals": "south"}),
        json!({"not_equals": "north"}),
        json!({"one_of": ["north", "camera"]}),
        json!({"subset_of": ["north", "camera"]}),
        json!({"subset_of": ["south"]}),
        json!({"excludes": ["north", "camera"]}),
        json!({"version_at_least": "1.0"}),
        json!({"at_least": 1}),
        json!({"at_most": 1}),
        json!({"present": true}),
        json!({"present": false}),
    ];
    for test in &tests {
        for (subject, value) in [
            (json!({"label": "zone"}), json!("north")),
            (json!({"attribute": "class"}), json!("camera")),
            (json!({"label": "street"}), Value::Null),
            (json!({"attribute": "owner"}), Value::Null),
        ] {
            let mut check = subject.clone();
            let mut same_reported = json!({"reported": "k"});
            if let (Some(c), Some(r), Some(t)) = (
                check.as_object_mut(),
                same_reported.as_object_mut(),
                test.as_object(),
            ) {
                c.extend(t.clone());
                r.extend(t.clone());
            }
            let reported = if value.is_null() {
                json!({})
            } else {
                json!({ "k": value })
            };
            let got = eval(check.clone(), json!({})).is_none();
            let want = eval(same_reported, reported).is_none();
            assert_eq!(got, want, "{check}");
        }
    }
}
