//! Keeping secrets out of logs, error messages and `Debug` output: Redis URLs
//! are shown with their password masked ([`redact_url`]), and a password read
//! from a file is held as a [`Secret`], which never prints itself.

use std::fmt;

/// What stands in for a masked password.
pub const MASK: &str = "***";

/// `url` with every password in it replaced by `***`, for logs and errors:
/// `rediss://user:***@host:6380/0`, `redis://:***@host`,
/// `redis+unix:///run/redis.sock?user=u&pass=***`. User names, hosts, ports
/// and database numbers stay readable.
///
/// Input that is not a well-formed URL is masked as if it were one, erring
/// towards masking: whatever stands before the last `@` (after the scheme)
/// counts as user information, and all of it but the user name (the text
/// before its first `:`) is masked, whatever characters it holds. A `pass`
/// or `password` query parameter (how unix-socket URLs carry a password) has
/// its value masked.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.find("://") {
        Some(i) => url.split_at(i + 3),
        None => ("", url),
    };
    let mut out = String::with_capacity(url.len());
    out.push_str(scheme);
    match rest.rfind('@') {
        Some(at) => {
            let (userinfo, host) = (&rest[..at], &rest[at..]);
            match userinfo.split_once(':') {
                Some((user, _password)) => {
                    out.push_str(user);
                    out.push(':');
                    out.push_str(MASK);
                }
                None => out.push_str(userinfo),
            }
            out.push_str(host);
        }
        None => out.push_str(rest),
    }
    mask_query_passwords(&out)
}

/// `s` with the value of every `pass=` / `password=` query parameter masked.
fn mask_query_passwords(s: &str) -> String {
    let Some(q) = s.find('?') else {
        return s.to_string();
    };
    let (head, query) = s.split_at(q + 1);
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _value))
                if key.eq_ignore_ascii_case("pass") || key.eq_ignore_ascii_case("password") =>
            {
                format!("{key}={MASK}")
            }
            _ => pair.to_string(),
        })
        .collect();
    format!("{head}{}", pairs.join("&"))
}

/// A secret (a password read from a file): `Debug` and `Display` show `***`,
/// never the value; [`Secret::expose`] hands it to the one place that needs
/// it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({MASK})")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(MASK)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_and_password_keep_the_user_and_mask_the_password() {
        assert_eq!(
            redact_url("rediss://nowconnect:S3cret@redis.example:6380/0"),
            "rediss://nowconnect:***@redis.example:6380/0"
        );
    }

    #[test]
    fn a_password_without_a_user_is_masked() {
        assert_eq!(
            redact_url("redis://:S3cret@127.0.0.1:6379/0"),
            "redis://:***@127.0.0.1:6379/0"
        );
        // An empty password is masked too: the mask tells nothing about length.
        assert_eq!(redact_url("redis://u:@h:1"), "redis://u:***@h:1");
    }

    #[test]
    fn urls_without_credentials_are_unchanged() {
        for url in [
            "redis://127.0.0.1:6379/0",
            "rediss://redis.example:6380",
            "redis://[::1]:6379/2",
            "redis+unix:///run/redis.sock?db=1",
            "redis://nowconnect@host:6379", // a user name alone is no secret
        ] {
            assert_eq!(redact_url(url), url);
        }
    }

    #[test]
    fn passwords_with_url_delimiters_are_masked_whole() {
        // Raw `@`, `/`, `?`, `#` and `:` inside a password (not percent-encoded).
        for (url, want) in [
            ("redis://u:p@ss@host:1/0", "redis://u:***@host:1/0"),
            ("redis://u:pa/ss@host:1/0", "redis://u:***@host:1/0"),
            ("redis://:pa?ss=1@host:1", "redis://:***@host:1"),
            ("redis://:pa#ss@host:1", "redis://:***@host:1"),
            ("redis://u:a:b:c@host", "redis://u:***@host"),
            ("rediss://u:%40S3cret@host", "rediss://u:***@host"),
            ("redis://u:pw@[::1]:6379", "redis://u:***@[::1]:6379"),
        ] {
            let got = redact_url(url);
            assert_eq!(got, want, "{url}");
        }
    }

    #[test]
    fn unix_socket_passwords_in_the_query_are_masked() {
        assert_eq!(
            redact_url("redis+unix:///run/redis.sock?db=1&user=u&pass=S3cret"),
            "redis+unix:///run/redis.sock?db=1&user=u&pass=***"
        );
        assert_eq!(
            redact_url("unix:///run/redis.sock?PASSWORD=S3cret&db=2"),
            "unix:///run/redis.sock?PASSWORD=***&db=2"
        );
    }

    #[test]
    fn unparsable_input_never_leaks_a_password() {
        for (input, secret) in [
            ("user:S3cret@host:6379", "S3cret"),
            ("redis:/:S3cret@host", "S3cret"),
            ("::S3cret@", "S3cret"),
            ("redis://u:S3cret@", "S3cret"),
            ("rediss://u:S3cret@@@", "S3cret"),
            ("x?pass=S3cret", "S3cret"),
        ] {
            let got = redact_url(input);
            assert!(!got.contains(secret), "{input} -> {got}");
            assert!(got.contains(MASK), "{input} -> {got}");
        }
        // Nothing that looks like credentials: shown as given.
        assert_eq!(redact_url("not a url"), "not a url");
        assert_eq!(redact_url(""), "");
    }

    #[test]
    fn secrets_never_print_themselves() {
        let s = Secret::new("S3cret");
        assert_eq!(format!("{s:?}"), "Secret(***)");
        assert_eq!(format!("{s}"), "***");
        assert_eq!(s.expose(), "S3cret");
    }
}
