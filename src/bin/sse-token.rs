//! `sse-token`: mints an HS256 token for trying the gateway (README tour, Postman, load tests).
//!
//! ```text
//! sse-token <app> <user> [--role publisher|operator]... [--ttl SECONDS]
//! ```
//! The secret comes from `JWT_SECRET` (environment or `.env`), as the gateway reads it.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use jsonwebtoken::{EncodingKey, Header};
use serde_json::{Value, json};

const USAGE: &str = "usage: sse-token <app> <user> [--role publisher|operator]... [--ttl SECONDS]

Prints an HS256 token for <user> of application <app>, signed with JWT_SECRET (environment or
.env), valid for --ttl seconds (default 3600). --role publisher may POST /publish; --role operator
may list every connection of the application.";

/// The roles the gateway grants (src/auth.rs); any other would be ignored there, silently.
const ROLES: [&str; 2] = ["publisher", "operator"];

fn main() -> ExitCode {
    let _ = dotenvy::dotenv();
    let mut args = std::env::args().skip(1);
    let mut positional = Vec::new();
    let mut roles = Vec::new();
    let mut ttl: u64 = 3600;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--role" => match args.next() {
                Some(role) if ROLES.contains(&role.as_str()) => roles.push(role),
                Some(role) => {
                    return usage(&format!(
                        "unknown role {role:?}: the gateway knows publisher and operator"
                    ));
                }
                None => return usage("--role takes publisher or operator"),
            },
            "--ttl" => match args.next().and_then(|t| t.parse().ok()) {
                Some(t) => ttl = t,
                None => return usage("--ttl takes a number of seconds"),
            },
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            _ => positional.push(arg),
        }
    }
    let [app, user] = positional.as_slice() else {
        return usage("give an application and a user");
    };
    // The gateway refuses such tokens (invalid_claims): say so now, not at the first request.
    for (what, id) in [("application", app), ("user", user)] {
        if !sse_gateway::ids::is_safe_id(id) {
            return usage(&format!(
                "{what} {id:?} is not a safe id: 1 to {} of A-Z a-z 0-9 . _ ~ @ + = -",
                sse_gateway::ids::MAX_LEN
            ));
        }
    }
    let Ok(secret) = std::env::var("JWT_SECRET") else {
        return usage("JWT_SECRET is not set (environment or .env)");
    };
    let now = jsonwebtoken::get_current_timestamp();
    let mut claims = json!({"iss": app, "sub": user, "iat": now, "exp": now + ttl});
    if !roles.is_empty() {
        claims["sse_role"] = Value::from(roles);
    }
    match jsonwebtoken::encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    ) {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sse-token: {e}");
            ExitCode::FAILURE
        }
    }
}

fn usage(problem: &str) -> ExitCode {
    if !problem.is_empty() {
        eprintln!("sse-token: {problem}");
    }
    eprintln!("{USAGE}");
    ExitCode::from(64)
}
