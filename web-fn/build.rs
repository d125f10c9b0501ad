//! Embeds `openapi.json` minified: the checked-in file is indented for people, and every byte
//! of the component is paid at each cold start.

fn main() {
    let source = concat!(env!("CARGO_MANIFEST_DIR"), "/../openapi.json");
    println!("cargo:rerun-if-changed={source}");
    let text = std::fs::read_to_string(source).expect("openapi.json at the repository's root");
    let value: serde_json::Value = serde_json::from_str(&text).expect("openapi.json is JSON");
    let out = std::path::Path::new(&std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("openapi.min.json");
    std::fs::write(out, serde_json::to_string(&value).expect("JSON serialises")).expect("writing the minified copy");
}
