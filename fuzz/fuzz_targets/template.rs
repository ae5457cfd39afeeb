//! The saga template engine and definitions: any template parses or is
//! refused, renders or names what it cannot resolve; any JSON definition
//! is checked without a panic.
#![no_main]

use std::collections::BTreeMap;

use breakwater::control::saga::spec::SagaSpec;
use breakwater::control::saga::template::{self, Answer, Scope, Template};
use libfuzzer_sys::fuzz_target;
use serde_json::json;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let input = json!({"user": {"name": "Ann", "tags": ["a", "b"]}, "n": 3});
    let mut steps = BTreeMap::new();
    steps.insert(
        "a".to_owned(),
        Answer {
            status: 201,
            headers: BTreeMap::from([("x-id".to_owned(), "7".to_owned())]),
            body: Some(json!({"id": 7, "items": [{"k": "v"}]})),
        },
    );
    let scope = Scope {
        saga_id: "fuzz",
        input: &input,
        steps: &steps,
    };
    if let Ok(parsed) = Template::parse(text) {
        let _ = parsed.render(&scope);
        for reference in parsed.references() {
            let _ = template::check(reference, 1, &["a", "b"], &input);
        }
    }
    let _ = template::render_json(&json!({"s": text, "list": [text]}), &scope);
    if let Ok(spec) = serde_json::from_str::<SagaSpec>(text) {
        let _ = spec.check();
    }
});
