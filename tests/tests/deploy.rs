//! The deployment files in `deploy/` and `spin.toml`, checked against the schemas of the
//! platforms that run them, read from `../shared/reference/spinkube/` (kept beside the
//! project, never copied into it): the SpinApp CRD of spin-operator 0.6 and Spin 3.6's
//! manifest schema. Where those files are absent the schema checks say so and check nothing;
//! everything else here runs everywhere.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{Value, json};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn reference(name: &str) -> Option<PathBuf> {
    let path = root().join("../shared/reference/spinkube").join(name);
    if path.exists() {
        Some(path)
    } else {
        println!("{} is not here: its schema check is skipped", path.display());
        None
    }
}

/// Every document of a YAML file, as JSON.
fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|document| {
            let value =
                serde_yaml_ng::Value::deserialize(document).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            serde_json::to_value(value).unwrap()
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn spinkube(name: &str) -> Vec<Value> {
    documents(&root().join("deploy/spinkube").join(name))
}

fn spin_toml() -> Value {
    let text = std::fs::read_to_string(root().join("spin.toml")).unwrap();
    serde_json::to_value(toml::from_str::<toml::Value>(&text).unwrap()).unwrap()
}

/// The SpinApps this project ships.
fn spin_apps() -> Vec<(String, Value)> {
    ["spinapp-redis.yaml", "spinapp-cosmos.yaml"]
        .into_iter()
        .flat_map(|file| spinkube(file).into_iter().map(move |doc| (file.to_owned(), doc)))
        .collect()
}

fn errors(validator: &jsonschema::Validator, instance: &Value) -> Vec<String> {
    validator.iter_errors(instance).map(|e| format!("{} at {}", e, e.instance_path())).collect()
}

#[test]
fn the_spinapps_match_the_spinapp_crd() {
    let Some(crd) = reference("spinapp-crd.yaml") else { return };
    let crd = documents(&crd).remove(0);
    let version = crd["spec"]["versions"].as_array().unwrap().iter().find(|v| v["served"] == json!(true)).unwrap();
    let validator = jsonschema::validator_for(&version["schema"]["openAPIV3Schema"]).unwrap();
    let api_version = format!("{}/{}", crd["spec"]["group"].as_str().unwrap(), version["name"].as_str().unwrap());
    for (file, app) in spin_apps() {
        assert_eq!(app["kind"], "SpinApp", "{file}");
        assert_eq!(app["apiVersion"], json!(api_version), "{file}");
        let found = errors(&validator, &app);
        assert!(found.is_empty(), "{file}: {found:#?}");
    }
    // The schema has teeth: a misspelt field type is refused.
    let mut broken = spin_apps().remove(0).1;
    broken["spec"]["replicas"] = json!("three");
    assert!(!errors(&validator, &broken).is_empty());
}

#[test]
fn spin_toml_matches_spins_manifest_schema() {
    let Some(schema) = reference("spin-manifest.schema.json") else { return };
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(schema).unwrap()).unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let manifest = spin_toml();
    let found = errors(&validator, &manifest);
    assert!(found.is_empty(), "{found:#?}");
    let mut broken = manifest.clone();
    broken["component"]["request-fn"]["sauce"] = json!("x");
    assert!(!errors(&validator, &broken).is_empty(), "unknown keys are refused");
}

#[test]
fn every_spinapp_sets_every_required_variable_and_refuses_to_start_without_its_store() {
    let manifest = spin_toml();
    let declared = manifest["variables"].as_object().unwrap();
    let required: Vec<&String> =
        declared.iter().filter(|(_, v)| v["required"] == json!(true)).map(|(k, _)| k).collect();
    assert!(required.iter().any(|name| *name == "sweep_secret"));
    let secret_keys: BTreeMap<String, HashSet<String>> = spinkube("secrets.example.yaml")
        .iter()
        .map(|s| {
            let name = s["metadata"]["name"].as_str().unwrap().to_owned();
            (name, s["stringData"].as_object().unwrap().keys().cloned().collect())
        })
        .collect();
    for (file, app) in spin_apps() {
        let spec = &app["spec"];
        let variables = spec["variables"].as_array().unwrap();
        let value_of = |name: &str| variables.iter().find(|v| v["name"] == name);
        for name in &required {
            assert!(value_of(name).is_some(), "{file} does not set the required variable {name}");
        }
        for variable in variables {
            let name = variable["name"].as_str().unwrap();
            assert!(declared.contains_key(name), "{file} sets {name}, which spin.toml does not declare");
            if let Some(reference) = variable["valueFrom"]["secretKeyRef"].as_object() {
                assert_eq!(reference["optional"], json!(false), "{file}: {name} may not silently go missing");
                let (secret, key) = (reference["name"].as_str().unwrap(), reference["key"].as_str().unwrap());
                assert!(
                    secret_keys.get(secret).is_some_and(|keys| keys.contains(key)),
                    "{file}: {name} reads {secret}/{key}, which secrets.example.yaml does not have"
                );
            }
            if declared[name]["secret"] == json!(true) {
                assert!(variable["value"].is_null(), "{file}: the secret {name} is written in the manifest");
            }
        }
        assert!(spec["replicas"].as_u64().unwrap() > 1, "{file} runs several instances");
        match value_of("store").and_then(|v| v["value"].as_str()) {
            Some("redis") => {
                let url = &value_of("redis_url").expect("redis_url")["valueFrom"]["secretKeyRef"];
                assert!(url.is_object(), "{file}: redis_url comes from a Secret (it holds the password)");
                assert!(value_of("redis_host").is_some(), "{file}: redis_host lets the components reach Redis");
            }
            Some("key_value") => {
                // The shared store comes from the runtime config; without it a pod would run
                // on a SQLite file of its own, so the same Secret is a non-optional volume.
                let secret = spec["runtimeConfig"]["loadFromSecret"].as_str().expect("loadFromSecret");
                let volume = spec["volumes"].as_array().unwrap().iter().find(|v| v["secret"]["secretName"] == secret);
                let volume = volume.unwrap_or_else(|| panic!("{file}: {secret} is not mounted"));
                assert_eq!(volume["secret"]["optional"], json!(false), "{file}");
                let mounted = spec["volumeMounts"].as_array().unwrap().iter().any(|m| m["name"] == volume["name"]);
                assert!(mounted, "{file}: the runtime-config volume is not mounted");
                let config = secret_keys.get(secret).expect("the runtime config's Secret is in the example");
                assert!(config.contains("runtime-config.toml"));
            }
            other => panic!("{file}: store is {other:?}"),
        }
    }
}

#[test]
fn the_sweep_cronjob_runs_every_minute_one_at_a_time_with_the_sweep_secret_from_a_file() {
    let job = spinkube("sweep-cronjob.yaml").remove(0);
    assert_eq!(job["kind"], "CronJob");
    assert_eq!(job["spec"]["schedule"], "* * * * *");
    assert_eq!(job["spec"]["concurrencyPolicy"], "Forbid");
    let pod = &job["spec"]["jobTemplate"]["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let command = container["args"][0].as_str().unwrap();
    assert!(command.contains("-X POST") && command.contains("/internal/sweep"), "{command}");
    // The header comes from a mounted Secret, not the command line (visible to `ps`).
    assert!(command.contains("-H @/run/portcullis/header") && !command.contains("Bearer"), "{command}");
    let volume = &pod["volumes"][0]["secret"];
    assert_eq!((volume["secretName"].as_str(), &volume["optional"]), (Some("portcullis-sweep-header"), &json!(false)));
    assert_eq!(container["volumeMounts"][0]["mountPath"], "/run/portcullis");
    let example = spinkube("secrets.example.yaml");
    assert!(
        example
            .iter()
            .any(|s| s["metadata"]["name"] == "portcullis-sweep-header" && s["stringData"]["header"].is_string())
    );
    // Every call fits in the job's deadline.
    assert!(command.contains("--max-time \"$left\""), "{command}");
    assert!(job["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"].as_u64().unwrap() < 60);
    assert_eq!(container["securityContext"]["allowPrivilegeEscalation"], json!(false));
}

#[test]
fn redis_runs_one_at_a_time_for_portcullis_alone_with_the_rights_the_tests_use() {
    let documents = spinkube("redis.yaml");
    let of_kind = |kind: &str| documents.iter().find(|d| d["kind"] == kind).unwrap_or_else(|| panic!("no {kind}"));
    let deployment = of_kind("Deployment");
    assert_eq!(deployment["spec"]["replicas"], json!(1));
    assert_eq!(deployment["spec"]["strategy"]["type"], "Recreate", "never two Redis servers behind the Service");
    let args: Vec<&str> = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let user = |name: &str| -> Vec<&str> {
        let at = args.windows(2).position(|w| w == ["--user", name]).unwrap_or_else(|| panic!("no user {name}"));
        args[at + 2..].iter().take_while(|a| !a.starts_with("--")).copied().collect()
    };
    assert_eq!(user("default"), ["off"]);
    let rules = user("portcullis");
    assert_eq!(rules[..2], ["on", ">$(REDIS_PASSWORD)"]);
    assert_eq!(rules[2..], portcullis_host::redis_server::PORTCULLIS_RULES, "the tests run with these rights");
    let policy = of_kind("NetworkPolicy");
    let allowed = &policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"];
    for (file, app) in spin_apps() {
        for (label, value) in allowed.as_object().unwrap() {
            assert_eq!(&app["spec"]["podLabels"][label], value, "{file} carries the label Redis admits");
        }
    }
}

#[test]
fn the_runtime_config_files_name_the_default_store() {
    for (file, kind) in [("cosmos.toml", "azure_cosmos"), ("sqlite.toml", "spin")] {
        let text = std::fs::read_to_string(root().join("deploy/runtime-config").join(file)).unwrap();
        let config: toml::Value = toml::from_str(&text).unwrap();
        assert_eq!(config["key_value_store"]["default"]["type"].as_str(), Some(kind), "{file}");
    }
    // The cosmos one is also what the example Secret carries.
    let secret = spinkube("secrets.example.yaml")
        .into_iter()
        .find(|s| s["metadata"]["name"] == "portcullis-runtime-config")
        .unwrap();
    let embedded: toml::Value = toml::from_str(secret["stringData"]["runtime-config.toml"].as_str().unwrap()).unwrap();
    assert_eq!(embedded["key_value_store"]["default"]["type"].as_str(), Some("azure_cosmos"));
}
