//! OTLP/gRPC span export.
//!
//! The SDK's batch processor exports from its own OS thread by blocking on the exporter's
//! future, but the tonic exporter needs a Tokio reactor. So export gets a small runtime of
//! its own ([`ExportRuntime`]) and an adapter ([`RuntimeExporter`]) that runs each export on it.

use std::sync::Arc;
use std::time::Duration;

use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SpanData, SpanExporter};

use crate::TelemetryError;

/// The runtime that OTLP exports run on.
#[derive(Debug)]
pub(crate) struct ExportRuntime {
    runtime: tokio::runtime::Runtime,
}

impl ExportRuntime {
    /// Builds the runtime and a batch processor whose exporter sends to `endpoint` on it.
    pub(crate) fn new(
        endpoint: &str,
        delay: Duration,
    ) -> Result<(Self, BatchSpanProcessor), TelemetryError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("otlp-export")
            .enable_all()
            .build()
            .map_err(|e| TelemetryError::Exporter(format!("export runtime: {e}")))?;
        let exporter = {
            // tonic builds its channel (and spawns its buffer task) on the current runtime.
            let _entered = runtime.enter();
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .with_timeout(Duration::from_secs(5))
                .build()
                .map_err(|e| TelemetryError::Exporter(format!("`{endpoint}`: {e}")))?
        };
        let exporter = RuntimeExporter {
            inner: Arc::new(exporter),
            handle: runtime.handle().clone(),
        };
        let config = BatchConfigBuilder::default()
            .with_scheduled_delay(delay)
            .build();
        let processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(config)
            .build();
        Ok((Self { runtime }, processor))
    }

    /// Stops the runtime without waiting; callable from inside another runtime.
    pub(crate) fn shutdown(self) {
        self.runtime.shutdown_background();
    }
}

/// Runs the wrapped exporter's futures on the export runtime.
#[derive(Debug)]
struct RuntimeExporter {
    inner: Arc<opentelemetry_otlp::SpanExporter>,
    handle: tokio::runtime::Handle,
}

impl SpanExporter for RuntimeExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let inner = Arc::clone(&self.inner);
        match self
            .handle
            .spawn(async move { inner.export(batch).await })
            .await
        {
            Ok(result) => result,
            Err(join) => Err(OTelSdkError::InternalFailure(join.to_string())),
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let _entered = self.handle.enter();
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        // Called once while the provider is built, before any export holds a clone.
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.set_resource(resource);
        } else {
            debug_assert!(false, "set_resource called while an export is in flight");
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        let _entered = self.handle.enter();
        self.inner.force_flush()
    }
}
