//! The OpenAPI description (`openapi.json`) as the contract every answer keeps: each answer an
//! end-to-end test receives through [`crate::support::World::call`] must be described there
//! (its path, method and status) and its JSON body must validate against the schema given for
//! it. An answer the description does not know fails the test that received it.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use jsonschema::Validator;
use serde_json::{Value, json};

/// The checked-in description.
pub static SPEC: LazyLock<Value> = LazyLock::new(|| {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../openapi.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("openapi.json")).expect("openapi.json is JSON")
});

static VALIDATORS: LazyLock<Mutex<HashMap<String, Arc<Validator>>>> = LazyLock::new(Default::default);

/// A validator for the schema at `pointer` (a JSON pointer into the description), with every
/// `$ref` resolved against the description itself.
fn validator(pointer: &str) -> Arc<Validator> {
    let mut cache = VALIDATORS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    cache
        .entry(pointer.to_owned())
        .or_insert_with(|| {
            let mut root = SPEC.clone();
            open_copies_for_compositions(&mut root);
            close(&mut root["components"]["schemas"]);
            close(&mut root["paths"]);
            // A fragment is a URI: the braces of path templates are percent-encoded.
            root["$ref"] = json!(format!("#{}", pointer.replace('{', "%7B").replace('}', "%7D")));
            root["$schema"] = json!("https://json-schema.org/draft/2020-12/schema");
            let validator = jsonschema::options()
                .should_validate_formats(true)
                .build(&root)
                .unwrap_or_else(|e| panic!("the schema at {pointer} does not compile: {e}"));
            Arc::new(validator)
        })
        .clone()
}

/// Every object schema that lists its properties refuses others here, so a field an answer
/// gains (or renames) must be described before a test passes (the published description stays
/// open, so that clients tolerate additions).
fn close(schema: &mut Value) {
    match schema {
        Value::Object(fields) if fields.contains_key("x-open") => {}
        Value::Object(fields) => {
            let open = !fields.contains_key("additionalProperties") && !fields.contains_key("unevaluatedProperties");
            let composed = ["allOf", "anyOf", "oneOf"].iter().any(|k| fields.contains_key(*k));
            if open && (fields.get("properties").is_some_and(Value::is_object) || composed) {
                fields.insert("unevaluatedProperties".into(), json!(false));
            }
            descend(fields);
        }
        Value::Array(items) => items.iter_mut().for_each(close),
        _ => {}
    }
}

/// Closes the schemas inside, except the parts of a composition and of a condition: those are
/// closed by the whole, which sees every part's properties (each part only sees its own).
fn descend(fields: &mut serde_json::Map<String, Value>) {
    for (key, value) in fields.iter_mut() {
        match (key.as_str(), value) {
            ("allOf" | "anyOf" | "oneOf", Value::Array(parts)) => parts.iter_mut().for_each(open_parts),
            ("if" | "then" | "else" | "not", part) => open_parts(part),
            (_, value) => close(value),
        }
    }
}

/// A part of a composition: left open itself, its insides closed.
fn open_parts(part: &mut Value) {
    if let Value::Object(fields) = part {
        descend(fields);
    }
}

/// A schema named in a composition (`allOf: [{$ref: Webhook}]` with more properties beside)
/// is named there through an open copy (`Webhook~open`), which the closing leaves open.
fn open_copies_for_compositions(root: &mut Value) {
    fn retarget(value: &mut Value, names: &mut Vec<String>) {
        match value {
            Value::Object(fields) => {
                for (key, inner) in fields.iter_mut() {
                    if let ("allOf" | "anyOf" | "oneOf", Value::Array(parts)) = (key.as_str(), &mut *inner) {
                        for part in parts.iter_mut() {
                            if let Some(name) =
                                part["$ref"].as_str().and_then(|r| r.strip_prefix("#/components/schemas/"))
                            {
                                let name = name.to_owned();
                                part["$ref"] = json!(format!("#/components/schemas/{name}~open"));
                                names.push(name);
                            }
                        }
                    }
                    retarget(inner, names);
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|item| retarget(item, names)),
            _ => {}
        }
    }
    let mut names = Vec::new();
    retarget(root, &mut names);
    for name in names {
        let mut copy = root["components"]["schemas"][&name].clone();
        open_parts(&mut copy);
        if let Value::Object(fields) = &mut copy {
            fields.insert("x-open".into(), json!(true));
        }
        root["components"]["schemas"][format!("{name}~open")] = copy;
    }
}

fn escape(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

/// The description's path template for a concrete path: the one whose literal segments all
/// match, preferring literals over parameters (`/decide/signed-in` over `/decide/{token}`).
pub fn template(path: &str) -> Option<String> {
    let segments: Vec<&str> = path.split('/').collect();
    SPEC["paths"]
        .as_object()
        .unwrap()
        .keys()
        .filter_map(|template| {
            let parts: Vec<&str> = template.split('/').collect();
            if parts.len() != segments.len() {
                return None;
            }
            let mut literals = 0;
            for (part, segment) in parts.iter().zip(&segments) {
                if part.starts_with('{') {
                    if segment.is_empty() {
                        return None;
                    }
                } else if part == segment {
                    literals += 1;
                } else {
                    return None;
                }
            }
            Some((literals, template.clone()))
        })
        .max()
        .map(|(_, template)| template)
}

/// Checks one answer against the description; panics with what is wrong.
pub fn check(method: &str, path_and_query: &str, status: u16, body: &str) {
    let path = path_and_query.split('?').next().unwrap();
    let method = method.to_lowercase();
    let operation = template(path).filter(|t| SPEC["paths"][t][&method].is_object());
    let Some(template) = operation else {
        // No such route or method: the answer is a plain error.
        assert!(status == 404 || status == 405, "{method} {path} is not described, yet answered {status}: {body}");
        return validate("/components/schemas/Error", &method, path, status, body);
    };
    let responses = &SPEC["paths"][&template][&method]["responses"];
    let key = if responses[status.to_string()].is_object() { status.to_string() } else { "default".to_owned() };
    assert!(
        responses[&key].is_object(),
        "{method} {template} answered {status}, which the description does not list: {body}"
    );
    if responses[&key]["content"]["application/json"]["schema"].is_object() && !body.is_empty() {
        let pointer = format!("/paths/{}/{method}/responses/{key}/content/application~1json/schema", escape(&template));
        validate(&pointer, &method, path, status, body);
    }
}

fn validate(pointer: &str, method: &str, path: &str, status: u16, body: &str) {
    let Ok(instance) = serde_json::from_str::<Value>(body) else {
        panic!("{method} {path} answered {status} with a body that is not JSON: {body}")
    };
    let validator = validator(pointer);
    let errors: Vec<String> =
        validator.iter_errors(&instance).map(|e| format!("{} at {}", e, e.instance_path())).collect();
    assert!(
        errors.is_empty(),
        "{method} {path} answered {status} with a body that breaks the description ({pointer}):\n{}\n{body}",
        errors.join("\n")
    );
}
