//! Minting HS256 tokens from the shared secret: `iss` = app, `sub` = user, `exp`, and optionally
//! the publisher role, the claims sse-gateway verifies.
//!
//! Tokens are minted when a connection is opened and dropped once the request is written, so
//! holding 20k idle streams costs no token memory.

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    sub: &'a str,
    exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    sse_role: Option<&'a str>,
}

pub struct Minter {
    key: EncodingKey,
    header: Header,
    ttl_secs: u64,
}

impl Minter {
    pub fn new(secret: &[u8], ttl_secs: u64) -> Minter {
        Minter {
            key: EncodingKey::from_secret(secret),
            header: Header::new(Algorithm::HS256),
            ttl_secs,
        }
    }

    pub fn mint(&self, app: &str, user: &str, role: Option<&str>) -> Result<String, String> {
        let claims = Claims {
            iss: app,
            sub: user,
            exp: jsonwebtoken::get_current_timestamp() + self.ttl_secs,
            sse_role: role,
        };
        jsonwebtoken::encode(&self.header, &claims, &self.key).map_err(|e| format!("jwt: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation};

    #[test]
    fn round_trip() {
        let t = Minter::new(b"s3cret", 60)
            .mint("app0", "u1", Some("publisher"))
            .unwrap();
        let mut v = Validation::new(Algorithm::HS256);
        v.set_required_spec_claims(&["exp", "iss", "sub"]);
        let d =
            jsonwebtoken::decode::<serde_json::Value>(&t, &DecodingKey::from_secret(b"s3cret"), &v)
                .unwrap();
        assert_eq!(d.claims["iss"], "app0");
        assert_eq!(d.claims["sub"], "u1");
        assert_eq!(d.claims["sse_role"], "publisher");
    }
}
