//! docker/docker-compose.yml, checked without a Docker engine: it goes through Compose's own
//! `config` (parsing, interpolation, env file), and the resolved model is checked against what the
//! other deployment files expect. Compose v2 comes from `.ci/tools/deploy.sh` (run by `make test`).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::deployment::*;
use common::external::{output_text, read, seconds};
use common::external::{repo, tool};
use common::*;
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------------
// docker-compose.yml, through Compose itself.

/// `docker compose`, or a standalone `docker-compose` (v2) when the docker client has no plugin.
fn compose() -> Command {
    let plugin = Command::new("docker")
        .args(["compose", "version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let mut cmd = if plugin {
        let mut c = Command::new("docker");
        c.arg("compose");
        c
    } else {
        Command::new(tool("docker-compose"))
    };
    // The file's own settings, not the caller's environment, decide the project name and port.
    for var in [
        "COMPOSE_PROJECT_NAME",
        "COMPOSE_FILE",
        "COMPOSE_PROFILES",
        "COMPOSE_ENV_FILES",
        "HTTP_PORT",
        "HTTP_HOST",
        "NOFILE_LIMIT",
        "RUST_IMAGE",
        "RUNTIME_IMAGE",
        "REDIS_IMAGE",
        "NGINX_IMAGE",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// The resolved compose model, as `make up` would see it: the repository's docker/ directory in a
/// temp root with `.env` copied from .env.example (never the developer's own .env).
fn compose_model(root: &Path) -> Value {
    compose_model_with(root, &[])
}

/// [`compose_model`] with variables set in Compose's environment.
fn compose_model_with(root: &Path, vars: &[(&str, &str)]) -> Value {
    let docker = root.join("docker");
    std::fs::create_dir_all(&docker).expect("mkdir");
    for f in ["Dockerfile", "docker-compose.yml", "nginx.conf"] {
        std::fs::copy(repo().join("docker").join(f), docker.join(f)).expect("copy docker/");
    }
    std::fs::copy(repo().join(".env.example"), root.join(".env")).expect("copy .env.example");
    // The Makefile's invocation, from the repository root.
    let makefile = read("Makefile");
    assert!(
        makefile.contains("-f docker/docker-compose.yml --env-file .env"),
        "the Makefile's COMPOSE no longer matches what this test runs"
    );
    let out = compose()
        .current_dir(root)
        .envs(vars.iter().copied())
        .args(["-f", "docker/docker-compose.yml", "--env-file", ".env"])
        .args(["config", "--format", "json"])
        .output()
        .expect("run compose");
    assert!(
        out.status.success(),
        "compose config failed:\n{}",
        output_text(&out)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}:\n{}", output_text(&out)))
}

/// `KEY=value` lines of .env.example.
fn env_example() -> HashMap<String, String> {
    read(".env.example")
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

#[test]
fn compose_file_resolves_to_the_intended_stack() {
    let root = TempDir::new();
    let model = compose_model(&root.path);
    let root_dir = root.path.canonicalize().expect("canonical");
    let services = &model["services"];
    assert_eq!(model["name"], "sse-gateway");
    let mut names: Vec<&String> = services.as_object().expect("services").keys().collect();
    names.sort();
    assert_eq!(names, ["gateway", "nginx", "redis"]);
    for name in ["gateway", "nginx", "redis"] {
        assert_eq!(services[name]["restart"], "unless-stopped", "{name}");
    }

    // The gateway: built from the repository root with docker/Dockerfile, configured by .env plus
    // the stack's own Redis, checked by the image's HEALTHCHECK, reachable only inside the stack.
    let gw = &services["gateway"];
    let context = PathBuf::from(gw["build"]["context"].as_str().expect("context"));
    assert_eq!(context.canonicalize().expect("context exists"), root_dir);
    assert_eq!(gw["build"]["dockerfile"], "docker/Dockerfile");
    let env = &gw["environment"];
    let example = env_example();
    assert_eq!(
        env["JWT_SECRET"],
        example["JWT_SECRET"].as_str(),
        "env_file"
    );
    assert_eq!(env["REDIS_URL"], "redis://redis:6379");
    assert_eq!(env["APP_PORT"], "8080");
    // The operator listener on the container's interfaces, reachable from the operator network
    // only (no published port, nginx not on that network).
    assert_eq!(env["OPERATOR_ADDR"], "0.0.0.0:9180");
    let operator_net = "operator";
    assert!(
        gw["networks"].get(operator_net).is_some(),
        "{}",
        gw["networks"]
    );
    assert_eq!(model["networks"][operator_net]["internal"], true);
    assert_eq!(
        example["APP_MODE"], "debug",
        "the example is for `make run`"
    );
    assert_eq!(
        env["APP_MODE"], "production",
        "the stack runs in production mode"
    );
    assert_eq!(
        gw["build"].get("args"),
        None,
        "no base image set: the Dockerfile's official defaults"
    );
    assert_eq!(
        gw["healthcheck"].get("test"),
        None,
        "the gateway inherits the image's HEALTHCHECK (tested below); a test here would shadow it"
    );
    assert!(dockerfile().iter().any(|(k, _)| k == "HEALTHCHECK"));
    assert_eq!(gw["depends_on"]["redis"]["condition"], "service_healthy");
    assert_eq!(gw.get("ports"), None);
    let grace = seconds(gw["stop_grace_period"].as_str().expect("stop_grace_period"));
    assert!(
        grace > 10.0,
        "stop_grace_period {grace}s must outlast SHUTDOWN_TIMEOUT (10 s)"
    );

    // The port agrees across the files: compose's APP_PORT, nginx's upstream, the image's EXPOSE
    // (only that one: `docker run -P` publishes every EXPOSEd port, the operator's would be too).
    let expose: Vec<String> = dockerfile()
        .into_iter()
        .filter(|(k, _)| k == "EXPOSE")
        .map(|(_, v)| v)
        .collect();
    assert_eq!(expose, ["8080"]);
    let upstream = shipped_nginx()
        .one("http")
        .all("upstream")
        .flat_map(|u| u.all("server"))
        .map(|s| s.args[0].clone())
        .collect::<Vec<_>>();
    assert_eq!(upstream, ["gateway:8080"]);

    // Redis: pinned 7.x, health-checked, not published, on the internal network only.
    let redis = &services["redis"];
    let image = redis["image"].as_str().expect("image");
    assert!(image.starts_with("redis:7."), "{image}");
    assert_eq!(
        redis["healthcheck"]["test"],
        json!(["CMD", "redis-cli", "ping"])
    );
    assert_eq!(redis.get("ports"), None);
    assert_eq!(redis["networks"].as_object().map(|n| n.len()), Some(1));
    let backend = redis["networks"]
        .as_object()
        .and_then(|n| n.keys().next())
        .expect("network");
    assert_eq!(model["networks"][backend]["internal"], true);

    // nginx: pinned, the shipped nginx.conf mounted read-only, the one published port, started
    // after a healthy gateway, health-checked on a path nginx.conf serves.
    let nginx = &services["nginx"];
    let image = nginx["image"].as_str().expect("image");
    assert!(
        image.starts_with("nginx:1.") && image != "nginx:latest",
        "{image}"
    );
    let volumes = nginx["volumes"].as_array().expect("volumes");
    assert!(
        volumes.iter().any(|v| {
            v["source"] == json!(root_dir.join("docker/nginx.conf").display().to_string())
                && v["target"] == "/etc/nginx/nginx.conf"
                && v["read_only"] == true
        }),
        "{volumes:?}"
    );
    let ports = nginx["ports"].as_array().expect("ports");
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0]["target"], 80);
    assert_eq!(ports[0]["published"], "80");
    assert_eq!(
        ports[0].get("host_ip"),
        None,
        "every address, IPv4 and IPv6, unless HTTP_HOST says otherwise"
    );
    assert_eq!(
        nginx["depends_on"]["gateway"]["condition"],
        "service_healthy"
    );
    let check = nginx["healthcheck"]["test"].to_string();
    assert!(check.contains("/nginx-health"), "{check}");
    shipped_nginx()
        .one("http")
        .one("server")
        .location(&["=", "/nginx-health"]);
    assert!(
        nginx["networks"].get(backend.as_str()).is_none(),
        "nginx must not reach Redis"
    );
    assert!(
        nginx["networks"].get(operator_net).is_none()
            && redis["networks"].get(operator_net).is_none(),
        "only scrapers join the operator network"
    );
    for (name, service) in services.as_object().expect("services") {
        for port in service["ports"].as_array().into_iter().flatten() {
            assert_ne!(port["target"], 9180, "{name} publishes the operator port");
        }
    }
}

/// Without an image registry (or with a private mirror), the base images, the published address and
/// the open-file limit come from the environment (docs/deployment.md).
#[test]
fn compose_takes_images_port_and_limits_from_the_environment() {
    let root = TempDir::new();
    let model = compose_model_with(
        &root.path,
        &[
            ("RUST_IMAGE", "mirror.example/rust:1.90.0-slim-bookworm"),
            ("RUNTIME_IMAGE", "mirror.example/debian:bookworm-slim"),
            ("REDIS_IMAGE", "mirror.example/redis:7.4-alpine"),
            ("NGINX_IMAGE", "mirror.example/nginx:1.28-alpine"),
            ("HTTP_HOST", "127.0.0.1"),
            ("HTTP_PORT", "8081"),
            ("NOFILE_LIMIT", "20000"),
        ],
    );
    let services = &model["services"];
    assert_eq!(
        services["gateway"]["build"]["args"],
        json!({
            "RUST_IMAGE": "mirror.example/rust:1.90.0-slim-bookworm",
            "RUNTIME_IMAGE": "mirror.example/debian:bookworm-slim"
        })
    );
    assert_eq!(
        services["redis"]["image"],
        "mirror.example/redis:7.4-alpine"
    );
    assert_eq!(
        services["nginx"]["image"],
        "mirror.example/nginx:1.28-alpine"
    );
    let port = &services["nginx"]["ports"][0];
    assert_eq!(
        (&port["host_ip"], &port["published"], &port["target"]),
        (&json!("127.0.0.1"), &json!("8081"), &json!(80))
    );
    for name in ["gateway", "nginx"] {
        assert_eq!(
            services[name]["ulimits"]["nofile"],
            json!({"soft": 20000, "hard": 20000}),
            "{name}"
        );
    }
}
