//! The `flannel` binary as a runtime sees it, for everything that needs no
//! namespace: VERSION, STATUS, GC, DEL of an unknown container, and the
//! error JSON for bad input (no root needed).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::{Value, json};

/// Runs the plugin binary with exactly `env` and `stdin`; returns (exit ok, stdout JSON or Null).
fn plugin(env: &[(&str, &str)], stdin: &str) -> (bool, Value, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flannel"));
    cmd.env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let json = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {text}"))
    };
    (out.status.success(), json, text)
}

fn config(dir: &Path, version: &str) -> Value {
    json!({
        "cniVersion": version,
        "name": "cbr0",
        "type": "flannel",
        "subnetFile": dir.join("subnet.env"),
        "dataDir": dir.join("data"),
        "delegate": {"hairpinMode": true, "isDefaultGateway": true},
    })
}

fn write_subnet_env(dir: &Path) {
    std::fs::write(
        dir.join("subnet.env"),
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.5.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
    )
    .unwrap();
}

fn add_env(netns: &str) -> Vec<(&str, &str)> {
    vec![
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "abc123"),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/usr/lib/cni"),
    ]
}

#[test]
fn version_lists_what_we_support_in_the_asked_version() {
    // podman's exact call: stdin {"cniVersion":"1.0.0"}, the rest "dummy".
    let (ok, out, _) = plugin(
        &[
            ("CNI_COMMAND", "VERSION"),
            ("CNI_IFNAME", "dummy"),
            ("CNI_NETNS", "dummy"),
            ("CNI_PATH", "dummy"),
        ],
        r#"{"cniVersion":"1.0.0"}"#,
    );
    assert!(ok);
    assert_eq!(out["cniVersion"], "1.0.0");
    assert_eq!(
        out["supportedVersions"],
        json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
    );
    let (ok, out, _) = plugin(&[("CNI_COMMAND", "VERSION")], "");
    assert!(ok);
    assert_eq!(out["cniVersion"], "1.1.0");
}

#[test]
fn missing_subnet_env_is_try_again_later_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, out, _) = plugin(
        &add_env("/run/netns/none"),
        &config(dir.path(), "0.3.1").to_string(),
    );
    assert!(!ok);
    assert_eq!(out["code"], 11, "{out}");
    assert_eq!(
        out["cniVersion"], "0.3.1",
        "errors answer in the asked version"
    );
    let msg = out["msg"].as_str().unwrap();
    assert!(
        msg.contains(&dir.path().join("subnet.env").display().to_string()),
        "{msg}"
    );
    assert!(msg.contains("flanneld"), "{msg}");
}

#[test]
fn status_is_ready_only_with_a_complete_subnet_env() {
    let dir = tempfile::tempdir().unwrap();
    let conf = config(dir.path(), "1.1.0").to_string();
    let (ok, out, _) = plugin(&[("CNI_COMMAND", "STATUS")], &conf);
    assert!(!ok);
    assert_eq!(out["code"], 50);
    assert!(out["msg"].as_str().unwrap().contains("subnet.env"), "{out}");
    std::fs::write(
        dir.path().join("subnet.env"),
        "FLANNEL_NETWORK=10.244.0.0/16\n",
    )
    .unwrap();
    let (ok, out, _) = plugin(&[("CNI_COMMAND", "STATUS")], &conf);
    assert!(!ok);
    assert!(
        out["msg"].as_str().unwrap().contains("FLANNEL_SUBNET"),
        "{out}"
    );
    write_subnet_env(dir.path());
    let (ok, out, text) = plugin(&[("CNI_COMMAND", "STATUS")], &conf);
    assert!(ok, "{out}");
    assert!(text.is_empty(), "STATUS prints nothing on success: {text}");
}

/// One bad call: environment, stdin, expected code, text the message names.
type Case<'a> = (Vec<(&'a str, &'a str)>, String, u64, &'a str);

#[test]
fn bad_input_gets_the_right_code_and_names_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    write_subnet_env(dir.path());
    let conf = config(dir.path(), "1.0.0").to_string();
    let cases: Vec<Case> = vec![
        (vec![], conf.clone(), 4, "CNI_COMMAND"),
        (vec![("CNI_COMMAND", "FROB")], conf.clone(), 4, "FROB"),
        (add_env("/x"), "{not json".into(), 6, "not valid JSON"),
        (add_env("/x"), "[1,2]".into(), 6, "not a JSON object"),
        (
            add_env("/x"),
            config(dir.path(), "0.2.0").to_string(),
            1,
            "0.2.0",
        ),
        (
            add_env("/x"),
            json!({"cniVersion": "1.0.0", "type": "flannel"}).to_string(),
            7,
            "name",
        ),
        (
            vec![
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "../../etc"),
                ("CNI_NETNS", "/x"),
                ("CNI_IFNAME", "eth0"),
            ],
            conf.clone(),
            4,
            "CNI_CONTAINERID",
        ),
        (
            vec![
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "a"),
                ("CNI_NETNS", "/x"),
            ],
            conf.clone(),
            4,
            "CNI_IFNAME",
        ),
        (
            vec![
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "a"),
                ("CNI_IFNAME", "eth0"),
            ],
            conf.clone(),
            4,
            "CNI_NETNS",
        ),
        (
            vec![
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "a"),
                ("CNI_NETNS", "/x"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_ARGS", "FOO=1"),
            ],
            conf.clone(),
            4,
            "FOO",
        ),
        (
            add_env("/nonexistent/netns"),
            conf.clone(),
            3,
            "/nonexistent/netns",
        ),
        (
            vec![("CNI_COMMAND", "GC")],
            config(dir.path(), "1.1.0").to_string(),
            7,
            "valid-attachments",
        ),
    ];
    for (env, stdin, code, needle) in cases {
        let (ok, out, _) = plugin(&env, &stdin);
        assert!(!ok, "{env:?} {stdin} succeeded");
        assert_eq!(out["code"], code, "{env:?} {stdin}: {out}");
        let msg = out["msg"].as_str().unwrap();
        assert!(msg.contains(needle), "{env:?}: {msg:?} lacks {needle:?}");
    }
}

#[test]
fn del_of_an_unknown_container_and_gc_succeed_without_subnet_env() {
    let dir = tempfile::tempdir().unwrap();
    let conf = config(dir.path(), "1.1.0");
    // containerd's second DEL: no netns, no prevResult, nothing reserved.
    let (ok, out, text) = plugin(
        &[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "gone"),
            ("CNI_NETNS", ""),
            ("CNI_IFNAME", "eth0"),
        ],
        &conf.to_string(),
    );
    assert!(ok, "{out}");
    assert!(text.is_empty());
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "x", "ifname": "eth0"}]);
    let (ok, out, _) = plugin(&[("CNI_COMMAND", "GC")], &gc.to_string());
    assert!(ok, "{out}");
}

#[test]
fn arbitrary_stdin_never_panics() {
    use proptest::prelude::*;
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_owned();
    // Random bytes and random JSON-shaped configs through the library entry
    // point (the binary is the same code); the outcome is always success or
    // a CNI error JSON.
    let json_value = prop_oneof![
        Just(json!(null)),
        Just(json!(true)),
        any::<i64>().prop_map(|n| json!(n)),
        ".{0,12}".prop_map(|s| json!(s)),
        Just(json!([])),
        Just(json!({})),
    ];
    let keys = prop_oneof![
        Just("cniVersion"),
        Just("name"),
        Just("delegate"),
        Just("ipam"),
        Just("runtimeConfig"),
        Just("prevResult"),
        Just("cni.dev/valid-attachments"),
        Just("subnetFile"),
    ];
    let mut runner = proptest::test_runner::TestRunner::default();
    runner
        .run(
            &(
                proptest::collection::vec(any::<u8>(), 0..64),
                proptest::collection::vec((keys, json_value), 0..6),
                prop_oneof![Just("VERSION"), Just("STATUS"), Just("GC"), Just("CHECK")],
            ),
            |(bytes, fields, command)| {
                let mut obj = serde_json::Map::new();
                obj.insert("cniVersion".into(), json!("1.1.0"));
                obj.insert("dataDir".into(), json!(data_dir));
                obj.insert("subnetFile".into(), json!(data_dir.join("missing.env")));
                for (k, v) in fields {
                    obj.insert(k.into(), v);
                }
                let structured = Value::Object(obj).to_string();
                for stdin in [bytes.as_slice(), structured.as_bytes()] {
                    let env = |k: &str| match k {
                        "CNI_COMMAND" => Some(command.to_owned()),
                        "CNI_CONTAINERID" => Some("c1".to_owned()),
                        "CNI_IFNAME" => Some("eth0".to_owned()),
                        "CNI_NETNS" => Some("/nonexistent".to_owned()),
                        _ => None,
                    };
                    let outcome = cni_plugin::run(env, stdin);
                    if !outcome.success {
                        let v: Value = serde_json::from_str(&outcome.stdout)
                            .map_err(|e| TestCaseError::fail(e.to_string()))?;
                        prop_assert!(v["code"].is_u64() && v["msg"].is_string());
                    }
                }
                Ok(())
            },
        )
        .unwrap();
}
