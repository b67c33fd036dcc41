//! Where the load goes and who it claims to be: `http://` URLs (loopback only, refused otherwise),
//! source address lists, the app/user layout of connections, and `{app}`/`{user}` name templates.
//!
//! The loopback rule is enforced here, once, for every address the tool will ever connect to or
//! bind: the subscriber URL, the publish URL, the Redis URL and the source addresses.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// A parsed `http://host:port/path?query` URL whose host is a loopback address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub addr: SocketAddr,
    /// The `Host` header value, as written in the URL.
    pub host_header: String,
    /// Path and query, starting with '/'. May contain templates such as `{user}`.
    pub path: String,
}

/// Parses `scheme://host[:port][/path]`; `scheme` must be one of `schemes`. The host must be an IP
/// literal or `localhost` and must be loopback: this tool never sends load anywhere else.
pub fn parse_url(url: &str, schemes: &[(&str, u16)]) -> Result<(String, Url), String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| format!("{url:?}: expected scheme://host:port/path"))?;
    let scheme = scheme.to_ascii_lowercase();
    let default_port = schemes
        .iter()
        .find(|(s, _)| *s == scheme)
        .map(|(_, p)| *p)
        .ok_or_else(|| format!("{url:?}: scheme {scheme:?} is not supported here"))?;
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_string()),
        Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
        None => (rest, "/".to_string()),
    };
    // Credentials (redis://:pass@host) are not part of the address.
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host, port) = split_host_port(hostport, default_port)?;
    let ip = resolve_loopback(host)?;
    Ok((
        scheme,
        Url {
            addr: SocketAddr::new(ip, port),
            host_header: hostport.to_string(),
            path,
        },
    ))
}

fn split_host_port(s: &str, default_port: u16) -> Result<(&str, u16), String> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("{s:?}: unterminated IPv6 literal"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| format!("{s:?}: bad port"))?,
            None => default_port,
        };
        return Ok((host, port));
    }
    match s.rsplit_once(':') {
        Some((h, p)) => Ok((h, p.parse().map_err(|_| format!("{s:?}: bad port"))?)),
        None => Ok((s, default_port)),
    }
}

/// `localhost` or a loopback IP literal; anything else (names included: they could resolve
/// anywhere) is refused.
pub fn resolve_loopback(host: &str) -> Result<IpAddr, String> {
    let ip: IpAddr = if host.eq_ignore_ascii_case("localhost") {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        host.parse()
            .map_err(|_| format!("{host:?}: only loopback IP literals or localhost are allowed"))?
    };
    if !ip.is_loopback() {
        return Err(format!(
            "{ip} is not a loopback address: this tool only sends load to this machine"
        ));
    }
    Ok(ip)
}

/// Parses `127.0.0.1-127.0.0.8,127.0.1.1`: single addresses and inclusive IPv4 ranges, all loopback.
pub fn parse_source_ips(spec: &str) -> Result<Vec<IpAddr>, String> {
    let mut out = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match item.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (resolve_loopback(a)?, resolve_loopback(b)?);
                let (IpAddr::V4(a), IpAddr::V4(b)) = (a, b) else {
                    return Err(format!("{item:?}: ranges are IPv4 only"));
                };
                let (a, b) = (u32::from(a), u32::from(b));
                if b < a || b - a >= 4096 {
                    return Err(format!("{item:?}: empty range or more than 4096 addresses"));
                }
                out.extend((a..=b).map(|n| IpAddr::V4(Ipv4Addr::from(n))));
            }
            None => out.push(resolve_loopback(item)?),
        }
    }
    if out.is_empty() {
        return Err("no source address given".into());
    }
    Ok(out)
}

/// How connections map onto users and apps. Connection `i` (global, across shards) belongs to user
/// `i % users`; user `u` belongs to app `u % apps`. Names are `{app_prefix}{a}` and `{user_prefix}{u}`.
#[derive(Debug, Clone)]
pub struct Layout {
    pub users: u32,
    pub apps: u32,
    pub app_prefix: String,
    pub user_prefix: String,
}

impl Layout {
    pub fn user_of(&self, conn: u64) -> u32 {
        (conn % self.users as u64) as u32
    }
    pub fn app_of(&self, user: u32) -> u32 {
        user % self.apps
    }
    pub fn app_name(&self, app: u32) -> String {
        format!("{}{app}", self.app_prefix)
    }
    pub fn user_name(&self, user: u32) -> String {
        format!("{}{user}", self.user_prefix)
    }
}

/// Replaces `{app}`, `{user}` and `{conn}` in a template.
pub fn render(template: &str, app: &str, user: &str, conn: u64) -> String {
    let mut out = template.replace("{app}", app).replace("{user}", user);
    if out.contains("{conn}") {
        out = out.replace("{conn}", &conn.to_string());
    }
    out
}

/// `i/n`: this process takes the global connection indices `i, i+n, i+2n, ...` so users and
/// source addresses spread evenly over the processes of a split run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: u32,
    pub count: u32,
}

impl std::str::FromStr for Shard {
    type Err = String;
    fn from_str(s: &str) -> Result<Shard, String> {
        let (i, n) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: expected i/n, e.g. 0/4"))?;
        let index: u32 = i.parse().map_err(|_| format!("{s:?}: bad shard index"))?;
        let count: u32 = n.parse().map_err(|_| format!("{s:?}: bad shard count"))?;
        if count == 0 || index >= count {
            return Err(format!("{s:?}: need 0 <= i < n"));
        }
        Ok(Shard { index, count })
    }
}

impl Shard {
    /// The global connection indices of this shard out of `total`.
    pub fn indices(self, total: u64) -> impl Iterator<Item = u64> {
        (self.index as u64..total).step_by(self.count as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HTTP: &[(&str, u16)] = &[("http", 80)];

    #[test]
    fn urls() {
        let (_, u) = parse_url("http://127.0.0.1:8080/sse?x=1", HTTP).unwrap();
        assert_eq!(u.addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(u.path, "/sse?x=1");
        assert_eq!(u.host_header, "127.0.0.1:8080");
        let (_, u) = parse_url("http://localhost", HTTP).unwrap();
        assert_eq!((u.addr.port(), u.path.as_str()), (80, "/"));
        let (_, u) = parse_url("http://[::1]:9/a", HTTP).unwrap();
        assert!(u.addr.ip().is_loopback());
        let (_, u) = parse_url("redis://:pw@127.0.0.2:7000", &[("redis", 6379)]).unwrap();
        assert_eq!(u.addr, "127.0.0.2:7000".parse().unwrap());
    }

    #[test]
    fn only_loopback() {
        for bad in [
            "http://10.0.0.1/sse",
            "http://example.com/sse",
            "http://192.168.1.1:80/",
            "http://[2001:db8::1]/",
            "https://127.0.0.1/",
        ] {
            assert!(parse_url(bad, HTTP).is_err(), "{bad}");
        }
        assert!(parse_source_ips("127.0.0.1,10.0.0.1").is_err());
        assert_eq!(parse_source_ips("127.0.0.1-127.0.0.3").unwrap().len(), 3);
    }

    #[test]
    fn shards_partition() {
        let s: Shard = "1/3".parse().unwrap();
        assert_eq!(s.indices(8).collect::<Vec<_>>(), vec![1, 4, 7]);
        assert!("3/3".parse::<Shard>().is_err());
        let all: u64 = (0..3)
            .map(|i| Shard { index: i, count: 3 }.indices(10).count() as u64)
            .sum();
        assert_eq!(all, 10);
    }

    #[test]
    fn templates() {
        assert_eq!(render("/sub/{app}/{user}", "a0", "u1", 5), "/sub/a0/u1");
        assert_eq!(
            render("{app}:channel:{user}#{conn}", "a", "u", 5),
            "a:channel:u#5"
        );
    }
}
