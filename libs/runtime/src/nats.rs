//! NATS with JetStream: a validated, bounded-wait connection and the readiness probe.

use std::time::{Duration, Instant};

use crate::StartupError;

/// The flag / env var every service reads the NATS URL from.
pub const URL_SETTING: &str = "LMFORGE_NATS_URL";

/// Checks the URL's shape: `nats://host:port` (also `tls://`, `ws://`, `wss://`; a list
/// separated by commas for a cluster).
pub fn validate_url(url: &str) -> Result<(), StartupError> {
    for part in url.split(',') {
        let part = part.trim();
        let parsed = url::Url::parse(part).map_err(|e| StartupError::Invalid {
            setting: URL_SETTING,
            reason: format!("`{part}` is not a URL: {e}"),
        })?;
        if !matches!(parsed.scheme(), "nats" | "tls" | "ws" | "wss") {
            return Err(StartupError::Invalid {
                setting: URL_SETTING,
                reason: format!(
                    "`{part}` must start with nats://, tls://, ws:// or wss:// (got `{}`)",
                    parsed.scheme()
                ),
            });
        }
        if parsed.host_str().is_none_or(str::is_empty) {
            return Err(StartupError::Invalid {
                setting: URL_SETTING,
                reason: format!("`{part}` has no host"),
            });
        }
    }
    Ok(())
}

/// Connects (retrying until `startup_timeout`) and checks that JetStream is enabled.
/// After start-up the client reconnects by itself; [`probe`] reports outages.
pub async fn connect(
    url: &str,
    client_name: &str,
    startup_timeout: Duration,
) -> Result<async_nats::Client, StartupError> {
    validate_url(url)?;
    let started = Instant::now();
    let unreachable = |reason: String| StartupError::Unreachable {
        setting: URL_SETTING,
        target: url.to_owned(),
        waited_secs: startup_timeout.as_secs(),
        reason,
    };
    let client = loop {
        let attempt = async_nats::ConnectOptions::new()
            .name(client_name)
            .connection_timeout(Duration::from_secs(3))
            .connect(url)
            .await;
        match attempt {
            Ok(client) => break client,
            Err(error) if started.elapsed() >= startup_timeout => {
                return Err(unreachable(error.to_string()));
            }
            Err(error) => {
                tracing::debug!(%error, "nats not answering yet, retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    };
    probe(&client)
        .await
        .map_err(|reason| StartupError::Invalid {
            setting: URL_SETTING,
            reason: format!("{url} answers, but {reason}"),
        })?;
    Ok(client)
}

/// One readiness probe: connected, and JetStream answers an account-info request.
pub async fn probe(client: &async_nats::Client) -> Result<(), String> {
    if client.connection_state() != async_nats::connection::State::Connected {
        return Err(format!("connection {}", client.connection_state()));
    }
    // The raw `$JS.API.INFO` request rather than `query_account()`: the typed reply of
    // async-nats 0.51 does not parse what nats-server 2.9 (Debian's) sends.
    let reply = tokio::time::timeout(
        Duration::from_secs(2),
        client.request("$JS.API.INFO", bytes::Bytes::new()),
    )
    .await
    .map_err(|_| "JetStream gave no answer within 2s".to_owned())?
    .map_err(|e| format!("JetStream does not answer ({e}); is nats-server running with -js?"))?;
    let info: serde_json::Value = serde_json::from_slice(&reply.payload)
        .map_err(|e| format!("JetStream answered something that is not JSON: {e}"))?;
    match info.get("error") {
        None => Ok(()),
        Some(error) => Err(format!(
            "JetStream refused the account info request: {error}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_before_connecting() {
        assert!(validate_url("nats://127.0.0.1:4222").is_ok());
        assert!(validate_url("nats://a:4222, nats://b:4222").is_ok());
        let error = validate_url("http://127.0.0.1:4222").expect_err("wrong scheme");
        assert!(error.to_string().starts_with("LMFORGE_NATS_URL:"));
        assert!(validate_url("127.0.0.1:4222").is_err());
    }
}
