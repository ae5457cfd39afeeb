//! References between a saga's steps: `{{input.<path>}}`, `{{saga.id}}`,
//! `{{steps.<name>.status}}`, `{{steps.<name>.headers.<name>}}` and
//! `{{steps.<name>.body.<path>}}`, in paths, header values and bodies.
//!
//! A template is parsed once, when the saga is submitted, and checked
//! there as far as it can be: a step may only refer to steps before it, and
//! `input` paths must exist in the input. What only the run can tell (a
//! field missing from an answer) fails the step with a message naming the
//! reference.
//!
//! In a JSON body, a string that is exactly one reference becomes the
//! referenced JSON value (a number stays a number); a reference inside a
//! longer string is replaced by its text.

use std::collections::BTreeMap;
use std::fmt;

use serde_json::Value;

/// A parsed template: text with references in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Ref(Reference),
}

/// What a `{{...}}` refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    /// `input.a.b.0`: a path into the saga's input.
    Input(Vec<String>),
    /// `saga.id`.
    SagaId,
    /// `steps.<name>.status`: the HTTP status of the step's answer.
    Status(String),
    /// `steps.<name>.headers.<header>`: a header of the step's answer.
    Header(String, String),
    /// `steps.<name>.body.a.b`: a path into the step's JSON answer.
    Body(String, Vec<String>),
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = |p: &[String]| p.iter().map(|s| format!(".{s}")).collect::<String>();
        match self {
            Reference::Input(p) => write!(f, "input{}", path(p)),
            Reference::SagaId => f.write_str("saga.id"),
            Reference::Status(step) => write!(f, "steps.{step}.status"),
            Reference::Header(step, h) => write!(f, "steps.{step}.headers.{h}"),
            Reference::Body(step, p) => write!(f, "steps.{step}.body{}", path(p)),
        }
    }
}

/// Why a template is wrong, or cannot be filled in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// It does not parse.
    #[error("{0}")]
    Syntax(String),
    /// It refers to something that is not there (yet).
    #[error("cannot resolve {{{{{reference}}}}}: {why}")]
    Unresolved {
        /// The reference, as written.
        reference: String,
        /// Why.
        why: String,
    },
}

/// A step's answer, as later steps see it.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Answer {
    /// The HTTP status.
    pub status: u16,
    /// Headers, lowercase names.
    pub headers: BTreeMap<String, String>,
    /// The body, when it is JSON.
    pub body: Option<Value>,
}

/// What references are resolved against.
#[derive(Debug, Clone, Copy)]
pub struct Scope<'a> {
    /// The saga's id.
    pub saga_id: &'a str,
    /// The saga's input.
    pub input: &'a Value,
    /// The answers of the steps done so far, by name.
    pub steps: &'a BTreeMap<String, Answer>,
}

fn syntax(message: impl Into<String>) -> TemplateError {
    TemplateError::Syntax(message.into())
}

fn parse_reference(text: &str) -> Result<Reference, TemplateError> {
    let segments: Vec<&str> = text.trim().split('.').collect();
    if segments.iter().any(|s| s.is_empty()) {
        return Err(syntax(format!("{{{{{text}}}}} has an empty path segment")));
    }
    let rest = |from: usize| segments[from..].iter().map(|s| (*s).to_owned()).collect();
    match segments.as_slice() {
        ["input", ..] => Ok(Reference::Input(rest(1))),
        ["saga", "id"] => Ok(Reference::SagaId),
        ["steps", step, "status"] => Ok(Reference::Status((*step).to_owned())),
        ["steps", step, "headers", header] => Ok(Reference::Header(
            (*step).to_owned(),
            header.to_ascii_lowercase(),
        )),
        ["steps", step, "body", ..] => Ok(Reference::Body((*step).to_owned(), rest(3))),
        _ => Err(syntax(format!(
            "{{{{{}}}}} is not a reference: use input.<path>, saga.id, steps.<name>.status, \
             steps.<name>.headers.<name> or steps.<name>.body.<path>",
            text.trim()
        ))),
    }
}

/// Follows a dotted path into a JSON value (array items by index).
fn follow<'v>(mut value: &'v Value, path: &[String]) -> Result<&'v Value, String> {
    for (i, key) in path.iter().enumerate() {
        let next = match value {
            Value::Object(map) => map.get(key),
            Value::Array(items) => key.parse::<usize>().ok().and_then(|n| items.get(n)),
            _ => None,
        };
        value = next.ok_or_else(|| {
            let at = if i == 0 {
                "the top level".to_owned()
            } else {
                path[..i].join(".")
            };
            format!("no {key:?} at {at}")
        })?;
    }
    Ok(value)
}

/// A JSON value as text: strings without quotes, the rest as JSON.
fn text_of(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

impl Reference {
    /// The value this reference has in `scope`.
    pub fn resolve(&self, scope: &Scope<'_>) -> Result<Value, TemplateError> {
        let unresolved = |why: String| TemplateError::Unresolved {
            reference: self.to_string(),
            why,
        };
        let answer = |step: &str| {
            scope
                .steps
                .get(step)
                .ok_or_else(|| unresolved(format!("step {step:?} has no answer")))
        };
        match self {
            Reference::Input(path) => follow(scope.input, path).cloned().map_err(unresolved),
            Reference::SagaId => Ok(Value::String(scope.saga_id.to_owned())),
            Reference::Status(step) => Ok(Value::from(answer(step)?.status)),
            Reference::Header(step, header) => answer(step)?
                .headers
                .get(header)
                .map(|v| Value::String(v.clone()))
                .ok_or_else(|| unresolved(format!("the answer has no {header} header"))),
            Reference::Body(step, path) => {
                let body = answer(step)?
                    .body
                    .as_ref()
                    .ok_or_else(|| unresolved("the answer's body is not JSON".into()))?;
                follow(body, path).cloned().map_err(unresolved)
            }
        }
    }

    /// The step this reference depends on, if any.
    pub fn step(&self) -> Option<&str> {
        match self {
            Reference::Status(s) | Reference::Header(s, _) | Reference::Body(s, _) => Some(s),
            Reference::Input(_) | Reference::SagaId => None,
        }
    }
}

impl Template {
    /// Parses `{{ reference }}` occurrences in `text`.
    pub fn parse(text: &str) -> Result<Self, TemplateError> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_owned()));
            }
            let after = &rest[open + 2..];
            let close = after
                .find("}}")
                .ok_or_else(|| syntax(format!("{text:?} has a {{{{ without its }}}}")))?;
            parts.push(Part::Ref(parse_reference(&after[..close])?));
            rest = &after[close + 2..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_owned()));
        }
        Ok(Self { parts })
    }

    /// The references in it.
    pub fn references(&self) -> impl Iterator<Item = &Reference> {
        self.parts.iter().filter_map(|p| match p {
            Part::Ref(r) => Some(r),
            Part::Text(_) => None,
        })
    }

    /// The one reference the template is made of, if it is exactly that.
    fn sole_reference(&self) -> Option<&Reference> {
        match self.parts.as_slice() {
            [Part::Ref(r)] => Some(r),
            _ => None,
        }
    }

    /// The text with every reference filled in.
    pub fn render(&self, scope: &Scope<'_>) -> Result<String, TemplateError> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(text) => out.push_str(text),
                Part::Ref(reference) => out.push_str(&text_of(&reference.resolve(scope)?)),
            }
        }
        Ok(out)
    }
}

/// Fills in every string of a JSON document (see the module's doc).
pub fn render_json(value: &Value, scope: &Scope<'_>) -> Result<Value, TemplateError> {
    Ok(match value {
        Value::String(text) => {
            let template = Template::parse(text)?;
            match template.sole_reference() {
                Some(reference) => reference.resolve(scope)?,
                None => Value::String(template.render(scope)?),
            }
        }
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|v| render_json(v, scope))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| Ok((k.clone(), render_json(v, scope)?)))
                .collect::<Result<_, TemplateError>>()?,
        ),
        other => other.clone(),
    })
}

/// Every reference in the strings of a JSON document.
pub fn json_references(value: &Value) -> Result<Vec<Reference>, TemplateError> {
    let mut found = Vec::new();
    collect(value, &mut found)?;
    Ok(found)
}

fn collect(value: &Value, found: &mut Vec<Reference>) -> Result<(), TemplateError> {
    match value {
        Value::String(text) => found.extend(Template::parse(text)?.references().cloned()),
        Value::Array(items) => {
            for item in items {
                collect(item, found)?;
            }
        }
        Value::Object(map) => {
            for item in map.values() {
                collect(item, found)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// Checks, at submission, a reference made by the step at `position`:
/// steps it names must come earlier, `input` paths must exist.
pub fn check(
    reference: &Reference,
    position: usize,
    steps: &[&str],
    input: &Value,
) -> Result<(), TemplateError> {
    let unresolved = |why: String| TemplateError::Unresolved {
        reference: reference.to_string(),
        why,
    };
    if let Reference::Input(path) = reference {
        follow(input, path).map_err(unresolved)?;
    }
    if let Some(step) = reference.step() {
        match steps.iter().position(|s| *s == step) {
            None => return Err(unresolved(format!("there is no step {step:?}"))),
            Some(i) if i >= position => {
                return Err(unresolved(format!(
                    "step {step:?} does not run before this one"
                )));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn scope_with<'a>(input: &'a Value, steps: &'a BTreeMap<String, Answer>) -> Scope<'a> {
        Scope {
            saga_id: "order-17",
            input,
            steps,
        }
    }

    fn answers() -> BTreeMap<String, Answer> {
        let mut steps = BTreeMap::new();
        steps.insert(
            "create-user".to_owned(),
            Answer {
                status: 201,
                headers: [("location".to_owned(), "/users/42".to_owned())].into(),
                body: Some(json!({"id": 42, "tags": ["a", "b"], "name": "Ann"})),
            },
        );
        steps
    }

    #[test]
    fn paths_headers_and_bodies_are_filled_in() {
        let input = json!({"user": {"email": "ann@example.com"}, "plan": "pro"});
        let steps = answers();
        let scope = scope_with(&input, &steps);
        let path =
            Template::parse("/users/{{ steps.create-user.body.id }}/plans/{{input.plan}}").unwrap();
        assert_eq!(path.render(&scope).unwrap(), "/users/42/plans/pro");
        let header = Template::parse("{{steps.create-user.headers.Location}}").unwrap();
        assert_eq!(header.render(&scope).unwrap(), "/users/42");
        let key = Template::parse("{{saga.id}}/{{steps.create-user.status}}").unwrap();
        assert_eq!(key.render(&scope).unwrap(), "order-17/201");

        let body = json!({
            "user_id": "{{steps.create-user.body.id}}",
            "greeting": "Hello {{steps.create-user.body.name}}",
            "first_tag": "{{steps.create-user.body.tags.0}}",
            "to": ["{{input.user.email}}"],
            "count": 3,
        });
        let rendered = render_json(&body, &scope).unwrap();
        assert_eq!(
            rendered,
            json!({"user_id": 42, "greeting": "Hello Ann", "first_tag": "a", "to": ["ann@example.com"], "count": 3})
        );
    }

    #[test]
    fn what_cannot_be_resolved_is_named() {
        let input = json!({});
        let steps = answers();
        let scope = scope_with(&input, &steps);
        let missing = Template::parse("/x/{{steps.create-user.body.account.id}}").unwrap();
        assert_eq!(
            missing.render(&scope).unwrap_err().to_string(),
            "cannot resolve {{steps.create-user.body.account.id}}: no \"account\" at the top level"
        );
        let no_step = Template::parse("{{steps.charge.status}}").unwrap();
        assert!(
            no_step
                .render(&scope)
                .unwrap_err()
                .to_string()
                .contains("step \"charge\" has no answer")
        );
    }

    #[test]
    fn bad_templates_are_refused_when_parsed() {
        assert!(
            Template::parse("/x/{{input.a")
                .unwrap_err()
                .to_string()
                .contains("without its }}")
        );
        assert!(
            Template::parse("{{steps.a}}")
                .unwrap_err()
                .to_string()
                .contains("is not a reference")
        );
        assert!(
            Template::parse("{{input..a}}")
                .unwrap_err()
                .to_string()
                .contains("empty path segment")
        );
        assert_eq!(Template::parse("plain").unwrap().references().count(), 0);
    }

    #[test]
    fn submission_checks_step_order_and_input_paths() {
        let input = json!({"user": {"name": "Ann"}});
        let steps = ["create-user", "create-subscription", "send-email"];
        let by = |text: &str| json_references(&json!({"v": text})).unwrap().remove(0);
        assert!(check(&by("{{steps.create-user.body.id}}"), 1, &steps, &input).is_ok());
        let later = check(&by("{{steps.send-email.status}}"), 1, &steps, &input).unwrap_err();
        assert!(
            later.to_string().contains("does not run before this one"),
            "{later}"
        );
        let unknown = check(&by("{{steps.bill.status}}"), 2, &steps, &input).unwrap_err();
        assert!(
            unknown.to_string().contains("there is no step \"bill\""),
            "{unknown}"
        );
        assert!(check(&by("{{input.user.name}}"), 0, &steps, &input).is_ok());
        let absent = check(&by("{{input.user.email}}"), 0, &steps, &input).unwrap_err();
        assert!(
            absent.to_string().contains("no \"email\" at user"),
            "{absent}"
        );
    }
}
