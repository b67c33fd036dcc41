//! `REDIS_URL` forms that real deployments use: an ACL user with a password, and TLS (`rediss://`).

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

async fn wait_ready(gw: &Gateway, want: u16) -> Value {
    let mut last = Value::Null;
    for _ in 0..100 {
        let r = http().get(gw.url("/ready")).send().await.unwrap();
        let status = r.status().as_u16();
        last = r.json().await.unwrap();
        if status == want {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("/ready never answered {want}: {last}\n{}", gw.logs());
}

/// Publishes durably through the gateway and checks that the stream gets it: proves the command
/// link (Redis Function), the subscriber link and the registry all work over this URL.
async fn round_trip(gw: &Gateway) {
    let mut c = gw.connect("shop", "alice").await;
    let r = gw
        .publish("shop", json!({"user": "alice", "type": "t", "data": 1}))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(c.next().await.event, "t");
}

#[tokio::test]
async fn acl_user_and_password_in_the_url() {
    let redis = RedisServer::start_with(&[
        "--requirepass",
        "default-pw",
        "--user",
        "gateway",
        "on",
        ">gateway-pw-7c1",
        "~*",
        "&*",
        "+@all",
    ]);
    let url = format!("redis://gateway:gateway-pw-7c1@127.0.0.1:{}", redis.port);
    let gw = Gateway::builder()
        .process()
        .env("REDIS_URL", &url)
        .start()
        .await;
    wait_ready(&gw, 200).await;
    round_trip(&gw).await;
    assert!(!gw.logs().contains("gateway-pw-7c1"), "password logged");

    // A wrong password: the gateway stays up, says it is not ready, and keeps retrying.
    let bad = format!("redis://gateway:wrong@127.0.0.1:{}", redis.port);
    let gw = Gateway::builder().env("REDIS_URL", &bad).start().await;
    let body = wait_ready(&gw, 503).await;
    assert_eq!(body["commands"], false);
}

#[tokio::test]
async fn tls_with_rediss() {
    let dir = TempDir::new();
    let p = |f: &str| dir.path.join(f).to_string_lossy().into_owned();
    // A throwaway CA and a server certificate for 127.0.0.1 signed by it.
    // A self-signed CA: `openssl req -x509` with a key and a certificate of its own.
    let ca = |cn: &str, key: &str, cert: &str| -> Vec<String> {
        let subject = format!("/CN={cn}");
        [
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            &subject,
            "-keyout",
            &p(key),
            "-out",
            &p(cert),
        ]
        .map(str::to_string)
        .to_vec()
    };
    let owned = |args: &[&str]| args.iter().map(|a| a.to_string()).collect::<Vec<_>>();
    let steps: Vec<Vec<String>> = vec![
        ca("test-ca", "ca.key", "ca.pem"),
        owned(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            &p("server.key"),
            "-out",
            &p("server.csr"),
        ]),
        owned(&[
            "x509",
            "-req",
            "-in",
            &p("server.csr"),
            "-CA",
            &p("ca.pem"),
            "-CAkey",
            &p("ca.key"),
            "-CAcreateserial",
            "-days",
            "1",
            "-out",
            &p("server.pem"),
            "-extfile",
            &p("san.ext"),
        ]),
        owned(&["verify", "-CAfile", &p("ca.pem"), &p("server.pem")]),
        ca("other-ca", "other.key", "other-ca.pem"),
    ];
    std::fs::write(p("san.ext"), "subjectAltName=IP:127.0.0.1,DNS:localhost\n").unwrap();
    for args in steps {
        let out = Command::new("openssl")
            .args(&args)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let redis = RedisServer::start_with(&[
        "--tls-port",
        "{port}",
        "--tls-cert-file",
        &p("server.pem"),
        "--tls-key-file",
        &p("server.key"),
        "--tls-ca-cert-file",
        &p("ca.pem"),
        "--tls-auth-clients",
        "no",
    ]);
    // The gateway trusts the system roots; SSL_CERT_FILE (read from the process environment)
    // points them at the test CA: a process of its own each.
    let gw = Gateway::builder()
        .process()
        .env("REDIS_URL", &format!("rediss://127.0.0.1:{}", redis.port))
        .env("SSL_CERT_FILE", &p("ca.pem"))
        .start()
        .await;
    wait_ready(&gw, 200).await;
    round_trip(&gw).await;

    // Trusting another CA, the link does not come up: the certificate is really checked.
    let untrusting = Gateway::builder()
        .process()
        .env("REDIS_URL", &format!("rediss://127.0.0.1:{}", redis.port))
        .env("SSL_CERT_FILE", &p("other-ca.pem"))
        .start()
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let r = http().get(untrusting.url("/ready")).send().await.unwrap();
    assert_eq!(r.status(), 503);
}
