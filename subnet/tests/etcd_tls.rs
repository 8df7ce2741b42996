//! The etcd store over TLS with client certificates, as flannel's
//! `--etcd-certfile/--etcd-keyfile/--etcd-cafile` use it.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::etcd_server::{EtcdServer, run_with_timeout};
use subnet::etcd::{EtcdOptions, EtcdStore, EtcdTls};
use subnet::store::LeaseStore;

/// Runs one openssl command in `dir`, panicking with its stderr on failure.
fn openssl(dir: &Path, args: &str) {
    let mut cmd = Command::new("sh");
    cmd.current_dir(dir)
        .arg("-c")
        .arg(format!("openssl {args}"));
    let out = run_with_timeout(cmd, Duration::from_secs(30)).unwrap();
    assert!(
        out.status.success(),
        "openssl {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate.
fn make_certs(dir: &Path) {
    let key = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    openssl(
        dir,
        &format!("req -x509 {key} -keyout ca-key.pem -out ca.pem -days 2 -subj /CN=test-ca"),
    );
    for (name, usage) in [("server", "serverAuth"), ("client", "clientAuth")] {
        openssl(
            dir,
            &format!("req {key} -keyout {name}-key.pem -out {name}.csr -subj /CN={name}"),
        );
        std::fs::write(
            dir.join(format!("{name}.ext")),
            format!("subjectAltName=IP:127.0.0.1\nextendedKeyUsage={usage}\n"),
        )
        .unwrap();
        openssl(
            dir,
            &format!(
                "x509 -req -in {name}.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial \
                 -out {name}.pem -days 2 -extfile {name}.ext"
            ),
        );
    }
}

async fn connect(server: &EtcdServer, tls: Option<EtcdTls>) -> EtcdStore {
    EtcdStore::connect(&EtcdOptions {
        endpoints: vec![server.endpoint()],
        prefix: "/coreos.com/network".into(),
        credentials: None,
        request_timeout: Some(Duration::from_secs(5)),
        tls,
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn client_certificates_are_used_and_required() {
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let server = EtcdServer::start_tls(certs.path());
    assert!(server.endpoint().starts_with("https://"));
    let read = |name: &str| std::fs::read(certs.path().join(name)).unwrap();
    let tls = EtcdTls {
        cert_pem: read("client.pem"),
        key_pem: read("client-key.pem"),
        ca_pem: Some(read("ca.pem")),
    };
    assert!(
        !format!("{tls:?}").contains("PRIVATE KEY"),
        "the key is never printed"
    );

    let store = connect(&server, Some(tls)).await;
    let config = r#"{"Network":"10.244.0.0/16"}"#;
    store
        .client()
        .put("/coreos.com/network/config", config, None)
        .await
        .unwrap();
    assert_eq!(
        store.network_config().await.unwrap().as_deref(),
        Some(config)
    );
    assert!(store.list().await.unwrap().leases.is_empty());

    // A client without a certificate is refused by the server.
    let anonymous = EtcdTls {
        cert_pem: Vec::new(),
        key_pem: Vec::new(),
        ca_pem: Some(read("ca.pem")),
    };
    let refused = EtcdStore::connect(&EtcdOptions {
        endpoints: vec![server.endpoint()],
        prefix: "/coreos.com/network".into(),
        credentials: None,
        request_timeout: Some(Duration::from_secs(5)),
        tls: Some(anonymous),
    })
    .await;
    match refused {
        Err(_) => {}
        Ok(store) => assert!(store.network_config().await.is_err()),
    }
}
