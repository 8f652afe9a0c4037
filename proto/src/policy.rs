//! The city's security policy as data (docs/PROTOCOL.md, "The security
//! policy"): rules over a device's reported state, registry attributes and
//! identity, each applied to a selector, with a severity and an explanation
//! every party (city IT, contractors, integrators) can read.
//!
//! Pure: no I/O and no clock. The controller passes the time in [`Facts`],
//! so evaluation is a function of its arguments and tests need no clock.
//!
//! Reasons ([`Outcome::Fail`]) quote reported values, which devices control:
//! they are truncated ([`MAX_QUOTE`]) and built from JSON text, never
//! panicking on any value.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::firmware::{compare_versions, parse_version};
use crate::messages::{Attributes, Selector};
use crate::validate_id;

/// More rules than this is a mistake (or an attack on the evaluator, which
/// runs every rule on every report).
pub const MAX_RULES: usize = 1000;
/// Descriptions are for people: a sentence or a paragraph.
pub const MAX_DESCRIPTION: usize = 1000;
/// The longest a quoted value gets in a reason, in characters.
pub const MAX_QUOTE: usize = 64;
/// `certificate_valid_days` beyond ten years can never hold for our
/// certificates; it is a typo.
pub const MAX_DAYS: i64 = 3650;
/// `seen_within_minutes` beyond a year is a typo.
pub const MAX_MINUTES: i64 = 525_600;
/// The longest list a `one_of`, `subset_of` or `excludes` may give.
pub const MAX_LIST: usize = 1000;

/// Whether a rule only reports violations or also has the controller
/// remediate them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Report,
    Enforce,
}

/// How bad a violation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Low,
    Medium,
    High,
    Critical,
}

impl Severity {
    /// A device's risk score adds these up: one critical violation outweighs
    /// two highs, one high two mediums.
    pub fn weight(self) -> u32 {
        match self {
            Severity::Low => 1,
            Severity::Medium => 3,
            Severity::High => 7,
            Severity::Critical => 15,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
            Severity::Critical => "critical",
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `pad`, so tables can align it with `{:<9}`.
        f.pad(self.as_str())
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Mode::Report => "report",
            Mode::Enforce => "enforce",
        })
    }
}

/// Deserializes a unit enum from its lowercase name and nothing else: serde's
/// derived enum also takes `{"high": null}`.
macro_rules! string_enum {
    ($ty:ident { $($name:literal => $variant:ident),+ $(,)? }) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
                match &*s {
                    $($name => Ok($ty::$variant),)+
                    other => Err(serde::de::Error::unknown_variant(other, &[$($name),+])),
                }
            }
        }
    };
}

string_enum!(Mode { "report" => Report, "enforce" => Enforce });
string_enum!(Severity { "low" => Low, "medium" => Medium, "high" => High, "critical" => Critical });

/// The policy document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct Policy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The mode of rules that do not give their own.
    #[serde(default)]
    pub mode: Mode,
    /// An empty list is a valid policy: it requires nothing.
    #[serde(default)]
    pub rules: Vec<Rule>,
}

/// One requirement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct Rule {
    /// Spelled like an identity ([`validate_id`]): it names the rule in
    /// reports, exceptions and topic-free keys.
    pub id: String,
    /// Why the rule exists, for people (1 to [`MAX_DESCRIPTION`] characters).
    pub description: String,
    pub severity: Severity,
    pub selector: Selector,
    pub check: Check,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remediation: Option<Remediation>,
}

/// What a rule checks: exactly one subject and exactly one test, except the
/// standalone subjects `certificate_valid_days` and `seen_within_minutes`,
/// which are their own test. Kept flat as written (so serde names unknown
/// fields); [`Check::parts`] gives the typed view.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct Check {
    // Subjects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attribute: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_valid_days: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seen_within_minutes: Option<i64>,
    // Tests. `equals = null` is a test too, so presence is kept apart from
    // the value (`present_value`).
    #[serde(
        default,
        deserialize_with = "present_value",
        skip_serializing_if = "Option::is_none"
    )]
    pub equals: Option<Value>,
    #[serde(
        default,
        deserialize_with = "present_value",
        skip_serializing_if = "Option::is_none"
    )]
    pub not_equals: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_of: Option<Vec<Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset_of: Option<Vec<Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub excludes: Option<Vec<Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_at_least: Option<String>,
    /// Any JSON here, so that a non-number is a validation error naming the
    /// rule rather than a serde error naming a line.
    #[serde(
        default,
        deserialize_with = "present_value",
        skip_serializing_if = "Option::is_none"
    )]
    pub at_least: Option<Value>,
    #[serde(
        default,
        deserialize_with = "present_value",
        skip_serializing_if = "Option::is_none"
    )]
    pub at_most: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub present: Option<bool>,
}

fn present_value<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

/// How the controller fixes a violation of an enforced rule: set keys of
/// the desired state, or install a firmware version; optionally in waves.
/// A `certificate_valid_days` rule's remediation is built in (a
/// certificate rotation): it needs no block, or one with `waves` only.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct Remediation {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<String>,
    /// Cumulative shares of the violating devices, e.g. `["10%", "50%",
    /// "100%"]`; [`Remediation::wave_percents`] gives each wave's own share.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waves: Option<Vec<String>>,
}

crate::object_only!(serialize: Policy, Rule, Check, Remediation);

/// What a check looks at.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Subject<'a> {
    /// A top-level key of the reported state.
    Reported(&'a str),
    /// A registry label.
    Label(&'a str),
    /// `class` or `owner` from the registry.
    Attribute(&'a str),
    /// The certificate expires more than N days from now.
    CertificateValidDays(i64),
    /// Last seen within N minutes.
    SeenWithinMinutes(i64),
}

/// What a check requires of its subject's value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Test<'a> {
    Equals(&'a Value),
    NotEquals(&'a Value),
    OneOf(&'a [Value]),
    SubsetOf(&'a [Value]),
    Excludes(&'a [Value]),
    VersionAtLeast(&'a str),
    AtLeast(f64),
    AtMost(f64),
    Present(bool),
}

const SUBJECTS: &str = "reported, label, attribute, certificate_valid_days, seen_within_minutes";
const TESTS: &str =
    "equals, not_equals, one_of, subset_of, excludes, version_at_least, at_least, at_most, present";

impl Check {
    /// The subject and (for the non-standalone ones) the test; a sentence
    /// saying what is wrong when the check is not exactly one of each.
    pub fn parts(&self) -> Result<(Subject<'_>, Option<Test<'_>>), String> {
        // Runs for every rule on every report: fixed arrays, no allocation
        // unless the check is wrong.
        let subjects: [(&str, Option<Subject<'_>>); 5] = [
            ("reported", self.reported.as_deref().map(Subject::Reported)),
            ("label", self.label.as_deref().map(Subject::Label)),
            (
                "attribute",
                self.attribute.as_deref().map(Subject::Attribute),
            ),
            (
                "certificate_valid_days",
                self.certificate_valid_days
                    .map(Subject::CertificateValidDays),
            ),
            (
                "seen_within_minutes",
                self.seen_within_minutes.map(Subject::SeenWithinMinutes),
            ),
        ];
        let tests: [(&str, Option<Result<Test<'_>, String>>); 9] = [
            ("equals", self.equals.as_ref().map(|v| Ok(Test::Equals(v)))),
            (
                "not_equals",
                self.not_equals.as_ref().map(|v| Ok(Test::NotEquals(v))),
            ),
            ("one_of", self.one_of.as_deref().map(|v| Ok(Test::OneOf(v)))),
            (
                "subset_of",
                self.subset_of.as_deref().map(|v| Ok(Test::SubsetOf(v))),
            ),
            (
                "excludes",
                self.excludes.as_deref().map(|v| Ok(Test::Excludes(v))),
            ),
            (
                "version_at_least",
                self.version_at_least
                    .as_deref()
                    .map(|v| Ok(Test::VersionAtLeast(v))),
            ),
            (
                "at_least",
                self.at_least
                    .as_ref()
                    .map(|v| number(v, "at_least").map(Test::AtLeast)),
            ),
            (
                "at_most",
                self.at_most
                    .as_ref()
                    .map(|v| number(v, "at_most").map(Test::AtMost)),
            ),
            ("present", self.present.map(|v| Ok(Test::Present(v)))),
        ];
        let given_subjects = subjects.iter().filter(|(_, s)| s.is_some());
        let given_tests = tests.iter().filter(|(_, t)| t.is_some());
        let names = |v: Vec<&str>| v.join(" and ");
        let (subject_name, subject) = match given_subjects.clone().count() {
            0 => return Err(format!("the check has no subject: give one of {SUBJECTS}")),
            1 => {
                let (n, s) = given_subjects.clone().next().expect("one");
                (*n, s.expect("given"))
            }
            count => {
                return Err(format!(
                    "the check has {count} subjects ({}): give exactly one",
                    names(given_subjects.map(|(n, _)| *n).collect())
                ));
            }
        };
        let standalone = matches!(
            subject,
            Subject::CertificateValidDays(_) | Subject::SeenWithinMinutes(_)
        );
        match (standalone, given_tests.clone().count()) {
            (true, 0) => Ok((subject, None)),
            (true, _) => Err(format!(
                "{subject_name} is a test of its own: drop {}",
                names(given_tests.map(|(n, _)| *n).collect())
            )),
            (false, 0) => Err(format!("the check has no test: give one of {TESTS}")),
            (false, 1) => {
                let (_, t) = given_tests.clone().next().expect("one");
                Ok((subject, Some(t.clone().expect("given")?)))
            }
            (false, count) => Err(format!(
                "the check has {count} tests ({}): give exactly one (write two rules for two \
                 requirements)",
                names(given_tests.map(|(n, _)| *n).collect())
            )),
        }
    }
}

fn number(v: &Value, field: &str) -> Result<f64, String> {
    match v.as_f64() {
        Some(n) if n.is_finite() => Ok(n),
        _ => Err(format!("{field} must be a number, not {}", quote(v))),
    }
}

/// The error of an impossible or malformed policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// Not JSON, not an object, an unknown field (named), a wrong type.
    #[error("not a valid policy document: {0}")]
    Parse(String),
    /// Something about the policy as a whole.
    #[error("{0}")]
    Policy(String),
    /// One rule (or a pair: `message` names the other one).
    #[error("rule {rule}: {message}")]
    Rule { rule: String, message: String },
}

impl PolicyError {
    /// The rule the error is about, if any.
    pub fn rule(&self) -> Option<&str> {
        match self {
            PolicyError::Rule { rule, .. } => Some(rule),
            _ => None,
        }
    }
}

/// Reads a policy from JSON and checks it ([`Policy::validate`]).
pub fn parse_policy(json: &[u8]) -> Result<Policy, PolicyError> {
    let policy: Policy =
        serde_json::from_slice(json).map_err(|e| PolicyError::Parse(e.to_string()))?;
    policy.validate()?;
    Ok(policy)
}

impl Policy {
    /// Refuses what cannot be meant: malformed or impossible rules and pairs
    /// of rules no device can satisfy together.
    pub fn validate(&self) -> Result<(), PolicyError> {
        if let Some(d) = &self.description {
            if d.chars().count() > MAX_DESCRIPTION {
                return Err(PolicyError::Policy(format!(
                    "the description is longer than {MAX_DESCRIPTION} characters"
                )));
            }
        }
        if self.rules.len() > MAX_RULES {
            return Err(PolicyError::Policy(format!(
                "{} rules: a policy has at most {MAX_RULES}",
                self.rules.len()
            )));
        }
        let mut ids = BTreeSet::new();
        for rule in &self.rules {
            rule.validate(self.mode)?;
            if !ids.insert(rule.id.as_str()) {
                return Err(rule_error(
                    &rule.id,
                    "the id is used by another rule: rule ids are unique".into(),
                ));
            }
        }
        self.check_contradictions()
    }

    /// Two rules on the same devices and the same value that no value can
    /// satisfy both: the policy would mark every such device non-compliant
    /// forever (and enforcement would flap between them).
    fn check_contradictions(&self) -> Result<(), PolicyError> {
        let mut by_subject: BTreeMap<(u8, &str), Vec<(&Rule, Test<'_>)>> = BTreeMap::new();
        for rule in &self.rules {
            let Ok((subject, Some(test))) = rule.check.parts() else {
                continue;
            };
            let key = match subject {
                Subject::Reported(k) => (0, k),
                Subject::Label(k) => (1, k),
                Subject::Attribute(k) => (2, k),
                _ => continue,
            };
            by_subject.entry(key).or_default().push((rule, test));
        }
        for group in by_subject.values() {
            for (i, (a, ta)) in group.iter().enumerate() {
                for (b, tb) in &group[i + 1..] {
                    if a.selector != b.selector {
                        continue;
                    }
                    if let Some(why) = contradiction(ta, tb) {
                        return Err(rule_error(
                            &b.id,
                            format!(
                                "contradicts rule {} on the same devices: {why}; no device can \
                                 satisfy both",
                                a.id
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Why no value passes both tests, when that is easy to see.
fn contradiction(a: &Test<'_>, b: &Test<'_>) -> Option<String> {
    let passes = |t: &Test<'_>, v: &Value| matches!(test_value("value", Some(v), t), Outcome::Pass);
    match (a, b) {
        // An exact value must pass the other test.
        (Test::Equals(x), other) | (other, Test::Equals(x)) => (!passes(other, x))
            .then(|| format!("one requires {}, which the other refuses", quote(x))),
        (Test::Present(false), Test::Present(false)) => None,
        // Every other test fails on a missing value.
        (Test::Present(false), _) | (_, Test::Present(false)) => {
            Some("one requires the value to be absent, the other tests it".into())
        }
        (Test::OneOf(xs), other) | (other, Test::OneOf(xs)) => {
            (!xs.iter().any(|x| passes(other, x)))
                .then(|| "none of the one_of values passes the other test".into())
        }
        (Test::AtLeast(lo), Test::AtMost(hi)) | (Test::AtMost(hi), Test::AtLeast(lo))
            if lo > hi =>
        {
            Some(format!("at least {lo} and at most {hi}"))
        }
        _ => None,
    }
}

fn rule_error(id: &str, message: String) -> PolicyError {
    PolicyError::Rule {
        rule: rule_name(id),
        message,
    }
}

/// The id as an error shows it: a malformed id quoted and truncated, so an
/// error message stays one readable line.
fn rule_name(id: &str) -> String {
    if validate_id(id).is_ok() {
        id.to_owned()
    } else {
        quote(&Value::String(id.to_owned()))
    }
}

impl Rule {
    /// The rule's own mode, or the policy's.
    pub fn effective_mode(&self, policy_default: Mode) -> Mode {
        self.mode.unwrap_or(policy_default)
    }

    fn validate(&self, policy_mode: Mode) -> Result<(), PolicyError> {
        let err = |m: String| Err(rule_error(&self.id, m));
        if let Err(e) = validate_id(&self.id) {
            return err(format!("the id is not valid: {e}"));
        }
        let len = self.description.chars().count();
        if self.description.trim().is_empty() || len > MAX_DESCRIPTION {
            return err(format!(
                "the description must say why the rule exists in 1 to {MAX_DESCRIPTION} \
                 characters (it has {len})"
            ));
        }
        if self.selector.is_empty() {
            return err(
                "the selector is empty: name a class, labels, id_prefix or owner, or \
                 {\"all\": true} for every device"
                    .into(),
            );
        }
        let (subject, test) = match self.check.parts() {
            Ok(p) => p,
            Err(e) => return err(e),
        };
        match subject {
            Subject::Reported(k) | Subject::Label(k) if k.is_empty() => {
                return err("the check names an empty key".into())
            }
            Subject::Attribute(a) if a != "class" && a != "owner" => {
                return err(format!(
                    "attribute {} is not one of \"class\", \"owner\" (labels: use label = \"KEY\")",
                    quote(&Value::String(a.to_owned()))
                ))
            }
            Subject::CertificateValidDays(n) if !(1..=MAX_DAYS).contains(&n) => {
                return err(format!(
                    "certificate_valid_days = {n}: give 1 to {MAX_DAYS} days"
                ))
            }
            Subject::SeenWithinMinutes(n) if !(1..=MAX_MINUTES).contains(&n) => {
                return err(format!(
                    "seen_within_minutes = {n}: give 1 to {MAX_MINUTES} minutes"
                ))
            }
            _ => {}
        }
        match test {
            Some(Test::OneOf(l) | Test::SubsetOf(l) | Test::Excludes(l)) if l.is_empty() => {
                return err("the list is empty: the test could never pass or never fail".into())
            }
            Some(Test::OneOf(l) | Test::SubsetOf(l) | Test::Excludes(l)) if l.len() > MAX_LIST => {
                return err(format!("the list has more than {MAX_LIST} values"))
            }
            Some(Test::VersionAtLeast(v)) if parse_version(v).is_none() => {
                return err(format!(
                    "version_at_least {} is not a version (1 to 4 dotted numbers, e.g. 4.2)",
                    quote(&Value::String(v.to_owned()))
                ))
            }
            _ => {}
        }
        let mode = self.effective_mode(policy_mode);
        match &self.remediation {
            // Its remediation is built in: a certificate rotation.
            None if self.check.certificate_valid_days.is_some() => Ok(()),
            None if mode == Mode::Enforce => err(
                "mode is enforce but there is no remediation: say how to fix a violation \
                 (remediation = { set = {...} } or { firmware = \"X\" }) or use mode = \"report\""
                    .into(),
            ),
            None => Ok(()),
            Some(r) => r.validate(subject, test).or_else(err),
        }
    }

    /// Does the rule apply to this device?
    pub fn applies_to(&self, id: &str, attrs: &Attributes) -> bool {
        self.selector.matches(id, attrs)
    }

    /// Whether the outcome can change with time alone (no new report): the
    /// controller re-evaluates these on a timer.
    pub fn is_time_based(&self) -> bool {
        self.check.certificate_valid_days.is_some() || self.check.seen_within_minutes.is_some()
    }

    /// The reported key the rule checks, if it checks one.
    pub fn reported_key(&self) -> Option<&str> {
        self.check.reported.as_deref()
    }

    /// Checks the device against the rule. Does not look at the selector
    /// ([`Rule::applies_to`]). A check that does not validate fails.
    pub fn evaluate(&self, f: &Facts<'_>) -> Outcome {
        let (subject, test) = match self.check.parts() {
            Ok(p) => p,
            Err(e) => return Outcome::Fail(format!("the rule's check is invalid: {e}")),
        };
        let label_value;
        // Borrowed for reported keys, the common case: no allocation on a pass.
        let (name, value): (std::borrow::Cow<'_, str>, Option<&Value>) = match subject {
            Subject::Reported(k) => (k.into(), lookup(f.reported, k).filter(|v| !v.is_null())),
            Subject::Label(k) => {
                label_value = f.attrs.labels.get(k).map(|v| Value::String(v.clone()));
                (format!("label {k}").into(), label_value.as_ref())
            }
            Subject::Attribute(a) => {
                let v = match a {
                    "class" => f.attrs.class.as_ref(),
                    "owner" => f.attrs.owner.as_ref(),
                    _ => None,
                };
                label_value = v.map(|v| Value::String(v.clone()));
                (a.into(), label_value.as_ref())
            }
            Subject::CertificateValidDays(n) => return certificate(n, f),
            Subject::SeenWithinMinutes(n) => return seen(n, f),
        };
        match test {
            Some(t) => test_value(&name, value, &t),
            None => Outcome::Fail("the rule's check has no test".into()),
        }
    }

    /// Admission: would setting reported `key` to `value` break this rule?
    /// `None` when the rule does not look at `key` (or `value` is null: the
    /// key stops being managed); `Some(reason)` when it would. Mode and
    /// selector are the caller's business.
    pub fn forbids(&self, key: &str, value: &Value) -> Option<String> {
        let path = self.reported_key()?;
        if value.is_null() {
            return None;
        }
        // The rule may look inside the key: `security.ntp` under `security`.
        let inner = if path == key {
            Some(value)
        } else {
            let rest = path.strip_prefix(key)?.strip_prefix('.')?;
            walk(value, rest)
        };
        let Ok((_, Some(test))) = self.check.parts() else {
            return None;
        };
        match test_value(path, inner.filter(|v| !v.is_null()), &test) {
            Outcome::Pass => None,
            Outcome::Fail(why) => Some(why),
        }
    }
}

/// A reported value by its key, or by a dotted path into nested objects
/// (`security.services.telnet`). A top-level key holding dots wins.
pub fn lookup<'a>(state: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    if let Some(v) = state.get(path) {
        return Some(v);
    }
    let (first, rest) = path.split_once('.')?;
    walk(state.get(first)?, rest)
}

fn walk<'a>(mut value: &'a Value, path: &str) -> Option<&'a Value> {
    for part in path.split('.') {
        value = value.as_object()?.get(part)?;
    }
    Some(value)
}

impl Remediation {
    fn validate(&self, subject: Subject<'_>, test: Option<Test<'_>>) -> Result<(), String> {
        match (&self.set, &self.firmware) {
            // A certificate's remediation is built in: a rotation (only its
            // waves may be given).
            (None, None) if matches!(subject, Subject::CertificateValidDays(_)) => {}
            (Some(_), Some(_)) | (None, None) => {
                return Err(
                    "a remediation gives exactly one of set = {...} or firmware = \"X\" \
                     (a certificate_valid_days rule's is built in: a rotation)"
                        .into(),
                )
            }
            (Some(set), None) => {
                if set.is_empty() {
                    return Err("remediation set is empty: it would change nothing".into());
                }
                if let (Subject::Reported(k), Some(t)) = (subject, &test) {
                    if let Some(v) = lookup(set, k).filter(|v| !v.is_null()) {
                        if let Outcome::Fail(why) = test_value(k, Some(v), t) {
                            return Err(format!(
                                "the remediation sets {k} to {}, which fails the rule's own \
                                 check ({why})",
                                quote(v)
                            ));
                        }
                    }
                }
            }
            (None, Some(fw)) => {
                if parse_version(fw).is_none() {
                    return Err(format!(
                        "remediation firmware {} is not a version (dotted numbers, e.g. 4.2.0)",
                        quote(&Value::String(fw.clone()))
                    ));
                }
                if let Some(Test::VersionAtLeast(min)) = test {
                    if compare_versions(fw, min) == Some(Ordering::Less) {
                        return Err(format!(
                            "the remediation installs firmware {fw}, below the rule's own \
                             version_at_least {min}"
                        ));
                    }
                }
            }
        }
        if self.waves.is_some() {
            self.wave_percents()?;
        }
        Ok(())
    }

    /// Each wave's own share of the violating devices, in percent (the
    /// cumulative `["10%", "50%", "100%"]` gives `[10, 40, 50]`), as a
    /// rollout's waves take them; `[100]` without waves.
    pub fn wave_percents(&self) -> Result<Vec<f64>, String> {
        let Some(waves) = &self.waves else {
            return Ok(vec![100.0]);
        };
        if waves.is_empty() || waves.len() > 100 {
            return Err("remediation waves: give 1 to 100 waves".into());
        }
        let mut out = Vec::with_capacity(waves.len());
        let mut before = 0.0;
        for w in waves {
            let p = w
                .strip_suffix('%')
                .and_then(|p| p.trim().parse::<f64>().ok())
                .filter(|p| p.is_finite());
            match p {
                Some(p) if p > before && p <= 100.0 => {
                    out.push(p - before);
                    before = p;
                }
                _ => {
                    return Err(format!(
                        "remediation waves: {} is not a share above the previous wave's (\"N%\", \
                         rising, up to \"100%\")",
                        quote(&Value::String(w.clone()))
                    ))
                }
            }
        }
        if before < 100.0 {
            return Err("remediation waves: the last wave must be \"100%\"".into());
        }
        Ok(out)
    }
}

/// What the evaluator knows of one device. Times are milliseconds since the
/// Unix epoch; `now_ms` is the caller's clock.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    pub id: &'a str,
    pub attrs: &'a Attributes,
    pub reported: &'a Map<String, Value>,
    pub cert_not_after_ms: Option<u64>,
    pub last_seen_ms: Option<u64>,
    pub now_ms: u64,
}

/// A rule's verdict on one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    /// A short sentence for people, e.g. "telnet is true, must be false".
    Fail(String),
}

impl Outcome {
    pub fn is_pass(&self) -> bool {
        matches!(self, Outcome::Pass)
    }
}

const DAY_MS: i128 = 86_400_000;
const MINUTE_MS: i128 = 60_000;

fn certificate(days: i64, f: &Facts<'_>) -> Outcome {
    let Some(not_after) = f.cert_not_after_ms else {
        return Outcome::Fail("the certificate's expiry is not known".into());
    };
    // i128: u64 milliseconds cannot overflow a difference there.
    let left = i128::from(not_after) - i128::from(f.now_ms);
    if left > i128::from(days) * DAY_MS {
        Outcome::Pass
    } else if left <= 0 {
        Outcome::Fail(format!(
            "the certificate expired {} days ago",
            (-left) / DAY_MS
        ))
    } else {
        Outcome::Fail(format!(
            "the certificate expires in {} days, must be more than {days}",
            left / DAY_MS
        ))
    }
}

fn seen(minutes: i64, f: &Facts<'_>) -> Outcome {
    let Some(last) = f.last_seen_ms else {
        return Outcome::Fail("never seen".into());
    };
    // A last-seen time ahead of the clock (skew) counts as just now.
    let ago = (i128::from(f.now_ms) - i128::from(last)).max(0);
    if ago <= i128::from(minutes) * MINUTE_MS {
        Outcome::Pass
    } else {
        Outcome::Fail(format!(
            "last seen {} minutes ago, must be within {minutes}",
            ago / MINUTE_MS
        ))
    }
}

/// One test on one value (`None`: missing, which fails closed).
fn test_value(name: &str, value: Option<&Value>, test: &Test<'_>) -> Outcome {
    let fail = |s: String| Outcome::Fail(s);
    let Some(v) = value else {
        return match test {
            Test::Present(false) => Outcome::Pass,
            _ => fail(format!("{name} is not reported")),
        };
    };
    match *test {
        Test::Present(true) => Outcome::Pass,
        Test::Present(false) => fail(format!("{name} is {}, must be absent", quote(v))),
        Test::Equals(x) if same(v, x) => Outcome::Pass,
        Test::Equals(x) => fail(format!("{name} is {}, must be {}", quote(v), quote(x))),
        Test::NotEquals(x) if same(v, x) => fail(format!("{name} is {}, must not be", quote(v))),
        Test::NotEquals(_) => Outcome::Pass,
        Test::OneOf(xs) if xs.iter().any(|x| same(v, x)) => Outcome::Pass,
        Test::OneOf(xs) => fail(format!(
            "{name} is {}, must be one of {}",
            quote(v),
            quote_list(xs)
        )),
        Test::SubsetOf(xs) => {
            // A scalar is a list of one: `ntp = "ntp1.city.example"` and
            // `ntp = ["ntp1.city.example"]` say the same thing.
            let items = as_items(v);
            match items.iter().find(|i| !xs.iter().any(|x| same(i, x))) {
                None => Outcome::Pass,
                Some(bad) => fail(format!(
                    "{name} has {}, allowed: {}",
                    quote(bad),
                    quote_list(xs)
                )),
            }
        }
        Test::Excludes(xs) => match as_items(v).iter().find(|i| xs.iter().any(|x| same(i, x))) {
            None => Outcome::Pass,
            Some(bad) => fail(format!("{name} has {}, which is not allowed", quote(bad))),
        },
        Test::VersionAtLeast(min) => match v.as_str() {
            None => fail(format!("{name} is {}, must be a version string", quote(v))),
            Some(s) => match compare_versions(s, min) {
                None => fail(format!("{name} is {}, not a version", quote(v))),
                Some(Ordering::Less) => {
                    fail(format!("{name} is {}, must be at least {min}", quote(v)))
                }
                Some(_) => Outcome::Pass,
            },
        },
        Test::AtLeast(n) | Test::AtMost(n) => {
            let least = matches!(test, Test::AtLeast(_));
            match v.as_f64() {
                None => fail(format!("{name} is {}, must be a number", quote(v))),
                Some(x) if (least && x >= n) || (!least && x <= n) => Outcome::Pass,
                Some(_) => fail(format!(
                    "{name} is {}, must be at {} {n}",
                    quote(v),
                    if least { "least" } else { "most" }
                )),
            }
        }
    }
}

fn as_items(v: &Value) -> &[Value] {
    match v {
        Value::Array(items) => items,
        other => std::slice::from_ref(other),
    }
}

/// JSON equality, except that numbers compare by value (`1` == `1.0`: a
/// TOML policy and a device may spell a number differently).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(x), Some(y)) => x == y,
            _ => x.as_f64() == y.as_f64(),
        },
        _ => a == b,
    }
}

/// A value as a reason quotes it: JSON text (so control characters are
/// escaped), at most [`MAX_QUOTE`] characters.
pub fn quote(v: &Value) -> String {
    let text = match v {
        // Big values: cut before serializing the whole thing.
        Value::String(s) if s.len() > 4 * MAX_QUOTE => {
            Value::String(s.chars().take(MAX_QUOTE).collect()).to_string()
        }
        other => other.to_string(),
    };
    truncate(&text, MAX_QUOTE)
}

fn quote_list(xs: &[Value]) -> String {
    truncate(
        &xs.iter().map(quote).collect::<Vec<_>>().join(", "),
        2 * MAX_QUOTE,
    )
}

fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        None => s.to_owned(),
        Some((cut, _)) => format!("{}…", &s[..cut]),
    }
}

/// What changed between two policies (`cityplane policy diff`).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PolicyDiff {
    /// Policy-level fields (`description`, `mode`) that changed.
    pub policy: Vec<FieldChange>,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<RuleChange>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RuleChange {
    pub id: String,
    pub fields: Vec<FieldChange>,
}

/// One field's old and new value (`null`: not set).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FieldChange {
    pub field: String,
    pub old: Value,
    pub new: Value,
}

impl PolicyDiff {
    pub fn is_empty(&self) -> bool {
        self.policy.is_empty()
            && self.added.is_empty()
            && self.removed.is_empty()
            && self.changed.is_empty()
    }
}

/// Rules added, removed and changed (matched by id; field by field).
pub fn diff(old: &Policy, new: &Policy) -> PolicyDiff {
    let object = |p: &Policy| match serde_json::to_value(p) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    };
    let (mut o, mut n) = (object(old), object(new));
    o.remove("rules");
    n.remove("rules");
    let policy = field_changes(&o, &n);
    let rule_map = |p: &Policy| -> BTreeMap<String, Map<String, Value>> {
        p.rules
            .iter()
            .map(|r| match serde_json::to_value(r) {
                Ok(Value::Object(m)) => (r.id.clone(), m),
                _ => (r.id.clone(), Map::new()),
            })
            .collect()
    };
    let (old_rules, new_rules) = (rule_map(old), rule_map(new));
    // Ids in the order of the new policy (then removed ones in old order),
    // as a reader of the new document would look for them.
    let added = new
        .rules
        .iter()
        .filter(|r| !old_rules.contains_key(&r.id))
        .map(|r| r.id.clone())
        .collect();
    let removed = old
        .rules
        .iter()
        .filter(|r| !new_rules.contains_key(&r.id))
        .map(|r| r.id.clone())
        .collect();
    let changed = new
        .rules
        .iter()
        .filter_map(|r| {
            let before = old_rules.get(&r.id)?;
            let fields = field_changes(before, new_rules.get(&r.id)?);
            (!fields.is_empty()).then(|| RuleChange {
                id: r.id.clone(),
                fields,
            })
        })
        .collect();
    PolicyDiff {
        policy,
        added,
        removed,
        changed,
    }
}

fn field_changes(old: &Map<String, Value>, new: &Map<String, Value>) -> Vec<FieldChange> {
    let fields: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    fields
        .into_iter()
        .filter_map(|k| {
            let (a, b) = (
                old.get(k).cloned().unwrap_or(Value::Null),
                new.get(k).cloned().unwrap_or(Value::Null),
            );
            (a != b).then(|| FieldChange {
                field: k.clone(),
                old: a,
                new: b,
            })
        })
        .collect()
}

impl fmt::Display for PolicyDiff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return writeln!(f, "no changes");
        }
        let change = |c: &FieldChange| format!("{}: {} → {}", c.field, c.old, c.new);
        for c in &self.policy {
            writeln!(f, "~ policy {}", change(c))?;
        }
        for id in &self.added {
            writeln!(f, "+ rule {id}")?;
        }
        for id in &self.removed {
            writeln!(f, "- rule {id}")?;
        }
        for r in &self.changed {
            writeln!(f, "~ rule {}", r.id)?;
            for c in &r.fields {
                writeln!(f, "    {}", change(c))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
