//! The shutdown signal of a service binary: SIGTERM (what orchestrators send) or Ctrl-C.

use std::future::Future;

/// Resolves on the first SIGTERM or Ctrl-C. The handlers are installed when this is called
/// (inside a Tokio runtime), not when the future is first polled, so a signal that arrives
/// while the service is still starting is not lost to the default action.
pub fn signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    let streams = {
        use tokio::signal::unix::{SignalKind, signal};
        (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        )
    };
    async move {
        #[cfg(unix)]
        {
            match streams {
                (Ok(mut interrupt), Ok(mut terminate)) => tokio::select! {
                    _ = interrupt.recv() => tracing::info!("ctrl-c received, shutting down"),
                    _ = terminate.recv() => tracing::info!("SIGTERM received, shutting down"),
                },
                (Err(error), _) | (_, Err(error)) => {
                    tracing::error!(%error, "cannot listen for signals");
                    std::future::pending::<()>().await;
                }
            }
        }
        #[cfg(not(unix))]
        {
            if let Err(error) = tokio::signal::ctrl_c().await {
                tracing::error!(%error, "cannot listen for ctrl-c");
                std::future::pending::<()>().await;
            }
            tracing::info!("ctrl-c received, shutting down");
        }
    }
}
