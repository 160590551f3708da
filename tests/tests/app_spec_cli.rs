//! Application files through the `flame` CLI: each field's mistakes are refused naming the
//! field, an update of an unknown application says how to register it, and a secret
//! environment value reaches the executor yet is never shown.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the report.

use flame_tests::test_service::{self, ServiceSession};
use flame_tests::{Cluster, ClusterOptions};
use serde_json::Value;
use std::path::Path;

/// A secret value, distinctive enough that finding it anywhere is a leak.
const SECRET: &str = "s3cret-value-4711";
const PLAIN: &str = "plain-visible-value";

/// The names in `flame app list --output json`.
async fn app_names(cluster: &Cluster) -> Vec<String> {
    let out = cluster.flame(&["app", "list", "--output", "json"]).await;
    out.assert_success();
    let apps: Value =
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{out}"));
    let mut names: Vec<String> = apps
        .as_array()
        .unwrap_or_else(|| panic!("not an array:\n{out}"))
        .iter()
        .map(|a| {
            a["spec"]["name"]
                .as_str()
                .expect("no spec.name")
                .to_string()
        })
        .collect();
    names.sort();
    names
}

/// Writes `text` to `dir/file` and returns the path as a string.
fn write(dir: &Path, file: &str, text: &str) -> String {
    let path = dir.join(file);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn each_bad_field_is_named() {
    let cluster = Cluster::start(ClusterOptions::default().nodes(0)).await;
    let files = tempfile::tempdir().unwrap();
    // (the field, a line or table that gets it wrong). Values of the wrong type count as
    // much as values out of range: the user needs to know which line to fix either way.
    let cases = [
        ("shim", "shim = \"tcp\""),
        ("user", "user = \"Root!\""),
        ("group", "group = \"Wheel!\""),
        ("working_dir", "working_dir = \"relative/dir\""),
        ("resources.cpus", "[resources]\ncpus = 0"),
        ("resources.cpus", "[resources]\ncpus = \"many\""),
        ("resources.memory", "[resources]\nmemory = \"lots\""),
        ("resources.memory", "[resources]\nmemory = 1024"),
        ("resources.gpus", "[resources]\ngpus = 1000"),
        ("resources.gpus", "[resources]\ngpus = -1"),
        ("selector", "[selector]\nZone = \"a\""),
        ("selector", "[selector]\nzone = \"a b\""),
        ("env", "[env]\n\"A=B\" = \"x\""),
        ("env", "[env]\nTOKEN = { value = \"x\", secret = \"yes\" }"),
        ("max_instances", "max_instances = 0"),
        ("max_attempts", "max_attempts = 0"),
        ("delay_release", "delay_release = \"soon\""),
        ("task_timeout", "task_timeout = \"forever\""),
        ("task_timeout", "task_timeout = \"0s\""),
    ];
    let mut failures = Vec::new();
    for (i, (field, bad)) in cases.iter().enumerate() {
        let text = format!("name = \"bad-{i}\"\ncommand = \"/bin/true\"\n{bad}\n");
        let path = write(files.path(), &format!("case-{i}.toml"), &text);
        let out = cluster.flame(&["app", "register", &path]).await;
        out.assert_failure();
        assert!(out.stderr.starts_with("error: "), "{out}");
        assert!(
            out.stderr.contains(&path),
            "the error does not name the file:\n{out}"
        );
        // The file's path could spell a field by chance; look at the rest. A nested field
        // may be named by its full path or by its key.
        let said = out.stderr.replace(&path, "FILE");
        let key = field.rsplit('.').next().unwrap_or(field);
        if !said.contains(key) {
            failures.push(format!(
                "{field} = {bad:?}: the error does not name `{field}`: {}",
                said.trim_end()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} bad files were refused without naming the field:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    assert_eq!(app_names(&cluster).await, ["ping", "shell"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn update_of_an_unknown_application_hints_at_register() {
    let cluster = Cluster::start(ClusterOptions::default().nodes(0)).await;
    let files = tempfile::tempdir().unwrap();
    let path = write(
        files.path(),
        "ghost.toml",
        "name = \"ghost\"\ncommand = \"/bin/true\"\n",
    );
    let out = cluster.flame(&["app", "update", &path]).await;
    out.assert_failure();
    assert!(out.stderr.starts_with("error: "), "{out}");
    assert!(out.stderr.contains("ghost"), "{out}");
    assert!(out.stderr.contains("hint: "), "{out}");
    assert!(out.stderr.contains("flame app register"), "{out}");
    assert_eq!(app_names(&cluster).await, ["ping", "shell"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn secret_env_reaches_the_executor_but_is_never_shown() {
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let files = tempfile::tempdir().unwrap();
    let text = format!(
        "name = \"secretive\"\ncommand = \"{}\"\ndelay_release = \"0s\"\nallow_root = true\n\n[env]\nPLAIN_VAR = \"{PLAIN}\"\nAPI_TOKEN = {{ value = \"{SECRET}\", secret = true }}\n",
        test_service::path().display()
    );
    let path = write(files.path(), "secretive.toml", &text);
    let mut shown = Vec::new();
    for args in [
        vec!["app", "register", &path],
        vec!["app", "update", &path],
        vec!["app", "show", "secretive"],
        vec!["app", "show", "secretive", "--output", "json"],
        vec!["app", "list"],
        vec!["app", "list", "--output", "json"],
    ] {
        let out = cluster.flame(&args).await;
        out.assert_success();
        assert!(
            !out.stdout.contains(SECRET) && !out.stderr.contains(SECRET),
            "`flame {}` shows the secret:\n{out}",
            args.join(" ")
        );
        shown.push(out);
    }
    // The plain value and the secret's name are shown; the secret's value is blank.
    let table = &shown[2];
    assert!(table.stdout.contains(PLAIN), "{table}");
    assert!(table.stdout.contains("API_TOKEN"), "{table}");
    let json: Value = serde_json::from_str(&shown[3].stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", shown[3]));
    let env = &json["spec"]["env"];
    assert_eq!(env["PLAIN_VAR"]["value"], PLAIN, "{json:#}");
    assert_eq!(env["API_TOKEN"]["secret"], true, "{json:#}");
    assert_eq!(env["API_TOKEN"]["value"], "", "{json:#}");

    // The library sees the same; only the executor gets the value.
    let client = cluster.client().await;
    let info = client.get_application("secretive").await.unwrap();
    assert_eq!(info.spec.env["API_TOKEN"].value, "", "{info:#?}");
    let mut session = ServiceSession::open(&client, "secretive").await;
    let environ = session.output("read /proc/self/environ").await;
    let vars: Vec<&str> = environ.split('\0').collect();
    assert!(
        vars.contains(&format!("API_TOKEN={SECRET}").as_str()),
        "the executor did not get the secret: {vars:?}"
    );
    assert!(
        vars.contains(&format!("PLAIN_VAR={PLAIN}").as_str()),
        "{vars:?}"
    );
    session.finish().await;
    client.close().await;
}
