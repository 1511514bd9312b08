//! Binding a service's ports. Binding happens before `serve` so that tests can pass
//! `127.0.0.1:0` listeners and read the chosen ports back.

use std::net::SocketAddr;

use tokio::net::TcpListener;

use crate::StartupError;

/// The two ports every service has: gRPC and the admin HTTP port.
#[derive(Debug)]
pub struct Listeners {
    /// gRPC (the service API, health, reflection).
    pub grpc: TcpListener,
    /// Admin HTTP: `/metrics`, `/healthz`, `/readyz`.
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds both addresses; `grpc_setting`/`admin_setting` name them in errors.
    pub async fn bind(
        grpc: (SocketAddr, &'static str),
        admin: (SocketAddr, &'static str),
    ) -> Result<Self, StartupError> {
        Ok(Self {
            grpc: bind(grpc.0, grpc.1).await?,
            admin: bind(admin.0, admin.1).await?,
        })
    }

    /// Binds both on an ephemeral loopback port (tests, `lmforge up --ephemeral`).
    pub async fn ephemeral() -> Result<Self, StartupError> {
        let any: SocketAddr = ([127, 0, 0, 1], 0).into();
        Self::bind((any, "grpc listener"), (any, "admin listener")).await
    }

    /// The bound gRPC address.
    pub fn grpc_addr(&self) -> SocketAddr {
        local_addr(&self.grpc)
    }

    /// The bound admin address.
    pub fn admin_addr(&self) -> SocketAddr {
        local_addr(&self.admin)
    }
}

/// Binds one address, naming `setting` when it fails.
pub async fn bind(addr: SocketAddr, setting: &'static str) -> Result<TcpListener, StartupError> {
    TcpListener::bind(addr)
        .await
        .map_err(|io| StartupError::Bind {
            setting,
            addr: addr.to_string(),
            io,
        })
}

/// The address a bound listener listens on.
pub fn local_addr(listener: &TcpListener) -> SocketAddr {
    listener
        .local_addr()
        .expect("a bound TCP listener always has a local address")
}
