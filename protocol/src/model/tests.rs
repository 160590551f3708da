//! Tests of the wire model: validation, redaction, and the text forms on the wire.

use super::*;

fn spec() -> ApplicationSpec {
    ApplicationSpec {
        max_instances: 4,
        delay_release_ms: 1000,
        ..ApplicationSpec::new("pi", "/bin/pi")
    }
}

#[test]
fn isolation_is_written_as_the_text_it_replaced() {
    for (i, text) in [
        (Isolation::CgroupV1, "cgroup v1"),
        (Isolation::CgroupV2, "cgroup v2"),
        (Isolation::None, "none"),
    ] {
        let bytes = postcard::to_allocvec(&i).unwrap_or_default();
        assert_eq!(
            bytes,
            postcard::to_allocvec(text).unwrap_or_default(),
            "{i}"
        );
        assert_eq!(postcard::from_bytes::<Isolation>(&bytes).ok(), Some(i));
        assert_eq!(text.parse::<Isolation>().ok(), Some(i));
    }
    let odd = postcard::to_allocvec("cgroup v3").unwrap_or_default();
    assert!(postcard::from_bytes::<Isolation>(&odd).is_err());
    assert_eq!(
        "cgroup v3"
            .parse::<Isolation>()
            .err()
            .map(|e| e.to_string()),
        Some("unknown isolation `cgroup v3` (expected `cgroup v1`, `cgroup v2` or `none`)".into())
    );
}

#[test]
fn redacted_blanks_only_secrets() {
    let mut s = spec();
    s.env.insert("A".into(), EnvValue::plain("shown"));
    s.env.insert(
        "TOKEN".into(),
        EnvValue {
            value: "hidden".into(),
            secret: true,
        },
    );
    let r = s.redacted();
    assert_eq!(r.env["A"].value, "shown");
    assert_eq!(r.env["TOKEN"].value, "");
    assert!(r.env["TOKEN"].secret);
}

#[test]
fn cpus_and_bytes_format_for_people() {
    assert_eq!(format_cpus(1500), "1.5");
    assert_eq!(format_cpus(2000), "2");
    assert_eq!(format_cpus(10), "0.01");
    assert_eq!(format_bytes(64 * 1024 * 1024), "64 MiB");
    assert_eq!(format_bytes(1536), "1.5 KiB");
}

#[test]
fn valid_spec_passes() {
    assert_eq!(spec().validate(), Ok(()));
}

#[test]
fn errors_name_the_field() {
    let mut s = spec();
    s.name = "Bad Name".into();
    assert_eq!(s.validate().unwrap_err().field, "name");
    let mut s = spec();
    s.command = " ".into();
    assert_eq!(s.validate().unwrap_err().field, "command");
    let mut s = spec();
    s.max_instances = 0;
    assert_eq!(s.validate().unwrap_err().field, "max_instances");
    let mut s = spec();
    s.working_dir = Some("relative".into());
    assert_eq!(s.validate().unwrap_err().field, "working_dir");
    let mut s = spec();
    s.env.insert("A=B".into(), EnvValue::plain("x"));
    assert_eq!(s.validate().unwrap_err().field, "env");
    let mut s = spec();
    s.env.insert("A".into(), EnvValue::plain("x\0"));
    assert_eq!(s.validate().unwrap_err().field, "env");
    let mut s = spec();
    s.user = Some("Root!".into());
    assert_eq!(s.validate().unwrap_err().field, "user");
    let mut s = spec();
    s.group = Some(String::new());
    assert_eq!(s.validate().unwrap_err().field, "group");
    let mut s = spec();
    s.resources.cpu_millis = 5;
    assert_eq!(s.validate().unwrap_err().field, "resources.cpus");
    let mut s = spec();
    s.resources.memory_bytes = Some(1024);
    assert_eq!(s.validate().unwrap_err().field, "resources.memory");
    let mut s = spec();
    s.resources.gpus = APP_GPUS_MAX + 1;
    assert_eq!(s.validate().unwrap_err().field, "resources.gpus");
    let mut s = spec();
    s.selector.insert("Zone".into(), "a".into());
    assert_eq!(s.validate().unwrap_err().field, "selector");
    let mut s = spec();
    s.selector.insert("zone".into(), "a b".into());
    assert_eq!(s.validate().unwrap_err().field, "selector");
    let mut s = spec();
    s.task_timeout_ms = Some(0);
    assert_eq!(s.validate().unwrap_err().field, "task_timeout");
    let mut s = spec();
    s.delay_release_ms = APP_DELAY_RELEASE_MS_MAX + 1;
    assert_eq!(s.validate().unwrap_err().field, "delay_release");
    let mut s = spec();
    s.max_attempts = 0;
    assert_eq!(s.validate().unwrap_err().field, "max_attempts");
}
