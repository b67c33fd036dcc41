//! `sse-token`: mints an HS256 token for trying the gateway (README tour, Postman, load tests).
//!
//! ```text
//! sse-token <app> <user> [--role publisher|operator]... [--ttl SECONDS]
//! ```
//! The secret comes from `JWT_SECRET` (environment or `.env`), as the gateway reads it.

use std::process::ExitCode;

use jsonwebtoken::{EncodingKey, Header};
use serde_json::{Value, json};

fn main() -> ExitCode {
    let _ = dotenvy::dotenv();
    let mut args = std::env::args().skip(1);
    let mut positional = Vec::new();
    let mut roles = Vec::new();
    let mut ttl: u64 = 3600;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--role" => roles.extend(args.next()),
            "--ttl" => match args.next().and_then(|t| t.parse().ok()) {
                Some(t) => ttl = t,
                None => return usage("--ttl takes a number of seconds"),
            },
            "-h" | "--help" => return usage(""),
            _ => positional.push(arg),
        }
    }
    let [app, user] = positional.as_slice() else {
        return usage("give an application and a user");
    };
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
    eprintln!("usage: sse-token <app> <user> [--role publisher|operator]... [--ttl SECONDS]");
    ExitCode::from(64)
}
