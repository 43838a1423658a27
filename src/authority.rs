//! Which names a request may use to reach this server: the `Host` allow-list
//! that stops DNS rebinding, and the `Origin` check of WebSocket handshakes.
//!
//! DNS rebinding: a page on `evil.example` makes its name resolve to
//! 127.0.0.1, and the browser then lets that page read answers from a
//! server on loopback, because to the browser it is still `evil.example`.
//! The browser does send `Host: evil.example`, so refusing unknown `Host`
//! values closes the hole for every endpoint, the WebSocket included.
//!
//! Rules, also in the protocol reference (section 11):
//! - `server.allowed_hosts` empty (the default) allows `localhost`,
//!   `127.0.0.1`, `[::1]` and the bound IP address, on any port; when the
//!   server is bound to an unspecified address (`0.0.0.0`, `[::]`) it also
//!   allows every IP literal, which no DNS answer can rebind. Other names
//!   must be listed.
//! - A list replaces those defaults. An entry without a port matches its
//!   host on any port; an entry with a port (`chat.example:8443`) matches
//!   only a `Host` that names that port. `"*"` allows any host.
//! - Names compare case-insensitively and ignore one trailing dot. A request
//!   without `Host` (HTTP/1.0 tools) is allowed: browsers always send one.
//! - An `Origin` is compared by scheme (`http` or `https` only), host and
//!   port, a missing port meaning the scheme's default. With no
//!   `server.allowed_origins`, it must name the same host and port as the
//!   `Host` header (a `Host` without a port means the origin scheme's
//!   default port).
//!
//! Threads: a [`HostPolicy`] is built once at start and read by every
//! connection thread; everything here is immutable or a pure function.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The host and optional port of a `Host` header or allow-list entry,
/// normalised: lower case, no trailing dot, IPv6 in brackets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authority {
    /// `example.com`, `127.0.0.1` or `[::1]`.
    pub host: String,
    /// The port, when one was written.
    pub port: Option<u16>,
}

impl Authority {
    /// Parses `host[:port]` (`[v6]` or `[v6]:port` for IPv6). `None` when it
    /// is not one: empty, a scheme or path, spaces, a bad port, user info.
    pub fn parse(text: &str) -> Option<Authority> {
        let (host, port) = if let Some(rest) = text.strip_prefix('[') {
            let (inside, after) = rest.split_once(']')?;
            inside.parse::<Ipv6Addr>().ok()?;
            let port = match after {
                "" => None,
                _ => Some(parse_port(after.strip_prefix(':')?)?),
            };
            (format!("[{}]", inside.to_ascii_lowercase()), port)
        } else {
            let (host, port) = match text.split_once(':') {
                Some((host, port)) => (host, Some(parse_port(port)?)),
                None => (text, None),
            };
            let host = host.strip_suffix('.').unwrap_or(host);
            let valid = !host.is_empty()
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
            if !valid {
                return None;
            }
            (host.to_ascii_lowercase(), port)
        };
        Some(Authority { host, port })
    }

    /// True when the host is an IP address rather than a name.
    fn is_ip_literal(&self) -> bool {
        self.host.parse::<Ipv4Addr>().is_ok() || self.host.starts_with('[')
    }
}

fn parse_port(text: &str) -> Option<u16> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// The `Host` values this server answers; see the module docs.
#[derive(Debug, Clone)]
pub struct HostPolicy {
    any_host: bool,
    any_ip_literal: bool,
    entries: Vec<Authority>,
}

impl HostPolicy {
    /// The policy for `server.allowed_hosts = list` on a server bound to
    /// `bound`. Entries that do not parse never match (the configuration
    /// refuses them before this).
    pub fn new(list: &[String], bound: SocketAddr) -> HostPolicy {
        if !list.is_empty() {
            return HostPolicy {
                any_host: list.iter().any(|e| e == "*"),
                any_ip_literal: false,
                entries: list.iter().filter_map(|e| Authority::parse(e)).collect(),
            };
        }
        let mut entries: Vec<Authority> = ["localhost", "127.0.0.1", "[::1]"]
            .into_iter()
            .filter_map(Authority::parse)
            .collect();
        let ip = bound.ip();
        let bound_host = match ip {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("[{v6}]"),
        };
        if let Some(a) = Authority::parse(&bound_host) {
            if !entries.contains(&a) {
                entries.push(a);
            }
        }
        HostPolicy {
            any_host: false,
            any_ip_literal: ip.is_unspecified(),
            entries,
        }
    }

    /// Whether a request with this `Host` header (if any) may be answered.
    pub fn allows(&self, host: Option<&str>) -> bool {
        let Some(host) = host else {
            return true;
        };
        if self.any_host {
            return true;
        }
        let Some(given) = Authority::parse(host.trim()) else {
            return false;
        };
        if self.any_ip_literal && given.is_ip_literal() {
            return true;
        }
        self.entries
            .iter()
            .any(|e| e.host == given.host && (e.port.is_none() || e.port == given.port))
    }
}

/// A browser origin: `http` or `https`, a host, and a port (the scheme's
/// default when none was written).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// True for `https`.
    pub secure: bool,
    /// Normalised like [`Authority::host`].
    pub host: String,
    /// The explicit port or the scheme's default.
    pub port: u16,
}

impl Origin {
    /// Parses `scheme://host[:port]` (one trailing `/` tolerated). Any
    /// scheme other than `http` and `https`, `null`, a path or user info
    /// gives `None`.
    pub fn parse(text: &str) -> Option<Origin> {
        let (scheme, rest) = text.trim().split_once("://")?;
        let secure = if scheme.eq_ignore_ascii_case("https") {
            true
        } else if scheme.eq_ignore_ascii_case("http") {
            false
        } else {
            return None;
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let authority = Authority::parse(rest)?;
        Some(Origin {
            secure,
            host: authority.host,
            port: authority.port.unwrap_or(default_port(secure)),
        })
    }
}

fn default_port(secure: bool) -> u16 {
    if secure {
        443
    } else {
        80
    }
}

/// Whether a WebSocket handshake with these `Origin` and `Host` headers may
/// proceed under `server.allowed_origins = allowed` (see the module docs).
/// No `Origin` (not a browser) is always allowed.
pub fn origin_allowed(origin: Option<&str>, host: Option<&str>, allowed: &[String]) -> bool {
    let Some(origin) = origin else {
        return true;
    };
    if allowed.iter().any(|a| a == "*") {
        return true;
    }
    let Some(origin) = Origin::parse(origin) else {
        return false;
    };
    if !allowed.is_empty() {
        return allowed
            .iter()
            .filter_map(|a| Origin::parse(a))
            .any(|a| a == origin);
    }
    let Some(host) = host.and_then(|h| Authority::parse(h.trim())) else {
        return false;
    };
    host.host == origin.host && host.port.unwrap_or(default_port(origin.secure)) == origin.port
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(host: &str, port: Option<u16>) -> Option<Authority> {
        Some(Authority {
            host: host.to_owned(),
            port,
        })
    }

    #[test]
    fn authorities_parse_and_normalise() {
        assert_eq!(Authority::parse("LocalHost"), a("localhost", None));
        assert_eq!(
            Authority::parse("a.example.:8080"),
            a("a.example", Some(8080))
        );
        assert_eq!(Authority::parse("[::1]:80"), a("[::1]", Some(80)));
        assert_eq!(
            Authority::parse("[::FFFF:1.2.3.4]"),
            a("[::ffff:1.2.3.4]", None)
        );
        for bad in [
            "", ":80", "a:", "a:b", "a:99999", "a b", "http://a", "a/b", "u@a", "[::1", "[x]",
            "[::1]80", "::1", "a:+80",
        ] {
            assert_eq!(Authority::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn default_hosts_are_loopback_and_the_bound_address() {
        let p = HostPolicy::new(&[], "10.1.2.3:8080".parse().unwrap());
        for ok in [
            "localhost",
            "localhost:1",
            "127.0.0.1:8080",
            "[::1]:9",
            "10.1.2.3:8080",
        ] {
            assert!(p.allows(Some(ok)), "{ok}");
        }
        for bad in [
            "evil.example",
            "10.1.2.4:8080",
            "localhost.evil.example",
            "",
            "a b",
        ] {
            assert!(!p.allows(Some(bad)), "{bad}");
        }
        assert!(p.allows(None));
        // Bound everywhere: any IP literal, still no unknown name.
        let p = HostPolicy::new(&[], "0.0.0.0:8080".parse().unwrap());
        assert!(p.allows(Some("192.168.1.9:8080")));
        assert!(p.allows(Some("[fe80::1]:8080")));
        assert!(!p.allows(Some("rebind.evil.example:8080")));
    }

    #[test]
    fn a_list_replaces_the_defaults() {
        let list = vec!["chat.example".to_owned(), "pinned.example:8443".to_owned()];
        let p = HostPolicy::new(&list, "127.0.0.1:8080".parse().unwrap());
        assert!(p.allows(Some("chat.example:1234")));
        assert!(p.allows(Some("pinned.example:8443")));
        assert!(!p.allows(Some("pinned.example:8080")));
        assert!(!p.allows(Some("pinned.example")));
        assert!(!p.allows(Some("127.0.0.1:8080")));
        let p = HostPolicy::new(&["*".to_owned()], "127.0.0.1:8080".parse().unwrap());
        assert!(p.allows(Some("anything.example")));
    }

    #[test]
    fn origins_compare_by_scheme_host_and_port() {
        assert!(origin_allowed(None, Some("h:1"), &[]));
        assert!(origin_allowed(Some("http://h:1"), Some("h:1"), &[]));
        assert!(origin_allowed(Some("https://H:1/"), Some("h:1"), &[]));
        assert!(origin_allowed(Some("http://h"), Some("h"), &[]));
        assert!(origin_allowed(Some("https://h"), Some("h"), &[]));
        assert!(origin_allowed(Some("http://h:80"), Some("h"), &[]));
        assert!(!origin_allowed(Some("https://h:80"), Some("h"), &[]));
        assert!(!origin_allowed(Some("ftp://h:1"), Some("h:1"), &[]));
        assert!(!origin_allowed(Some("h:1"), Some("h:1"), &[]));
        assert!(!origin_allowed(Some("null"), Some("h:1"), &[]));
        assert!(!origin_allowed(Some("http://evil:1"), Some("h:1"), &[]));
        assert!(!origin_allowed(Some("http://h:2"), Some("h:1"), &[]));
        assert!(!origin_allowed(Some("http://h:1"), None, &[]));
        let list = vec!["https://app.example".to_owned()];
        assert!(origin_allowed(
            Some("https://app.example"),
            Some("h:1"),
            &list
        ));
        assert!(origin_allowed(
            Some("https://APP.example:443"),
            Some("h:1"),
            &list
        ));
        assert!(!origin_allowed(
            Some("http://app.example"),
            Some("h:1"),
            &list
        ));
        assert!(!origin_allowed(Some("http://h:1"), Some("h:1"), &list));
        let any = vec!["*".to_owned()];
        assert!(origin_allowed(Some("ftp://whatever"), Some("h:1"), &any));
    }
}
