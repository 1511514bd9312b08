//! `lmforge key create|list|revoke`: API keys of the gateway, through its admin gRPC API
//! (authenticated with an admin key, e.g. the gateway's bootstrap `LMFORGE_GATEWAY_ADMIN_KEY`).

use anyhow::Context;
use lmforge_proto::v1 as pb;
use lmforge_proto::v1::gateway_admin_service_client::GatewayAdminServiceClient;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

/// `lmforge key` arguments.
#[derive(Debug, clap::Args)]
pub struct KeyArgs {
    /// Address of the gateway's gRPC API.
    #[arg(
        long,
        env = "LMFORGE_GATEWAY_URL",
        default_value = "http://127.0.0.1:50055",
        global = true
    )]
    pub gateway_url: String,
    /// An admin API key.
    #[arg(
        long,
        env = "LMFORGE_GATEWAY_ADMIN_KEY",
        hide_env_values = true,
        global = true
    )]
    pub admin_key: Option<String>,
    #[command(subcommand)]
    pub command: KeyCommand,
}

/// The key subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum KeyCommand {
    /// Create a key; its secret is printed once.
    Create {
        /// Display name.
        name: String,
        /// Public model names or `prefix*` patterns the key may use (repeatable); none → all.
        #[arg(long = "model")]
        models: Vec<String>,
        /// Requests per minute (0 → unlimited).
        #[arg(long)]
        rpm: Option<u32>,
        /// Tokens per minute (0 → unlimited).
        #[arg(long)]
        tpm: Option<u32>,
        /// Lifetime, e.g. `30d`; unset → never expires.
        #[arg(long, value_parser = lmforge_runtime::args::parse_duration)]
        ttl: Option<std::time::Duration>,
        /// May call the admin API.
        #[arg(long)]
        admin: bool,
    },
    /// List keys, newest first.
    List {
        /// Include revoked and expired keys.
        #[arg(long)]
        all: bool,
    },
    /// Revoke a key by id.
    Revoke {
        /// Key id (UUID).
        id: String,
        /// Why (kept with the key).
        #[arg(long, default_value = "")]
        reason: String,
    },
}

/// Adds the admin key to every call.
type AuthInterceptor =
    Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send>;

type Client = GatewayAdminServiceClient<
    tonic::service::interceptor::InterceptedService<Channel, AuthInterceptor>,
>;

/// A client of the admin API sending `admin_key`.
pub async fn connect(url: &str, admin_key: &str) -> anyhow::Result<Client> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
        .with_context(|| format!("bad gateway URL {url}"))?
        .connect()
        .await
        .with_context(|| format!("cannot reach the gateway at {url}"))?;
    let value: MetadataValue<_> = format!("Bearer {admin_key}")
        .parse()
        .context("the admin key is not valid header text")?;
    let interceptor: AuthInterceptor = Box::new(move |mut request: tonic::Request<()>| {
        request
            .metadata_mut()
            .insert("authorization", value.clone());
        Ok(request)
    });
    Ok(GatewayAdminServiceClient::with_interceptor(
        channel,
        interceptor,
    ))
}

fn show(key: &pb::ApiKey) -> String {
    let (rpm, tpm) = key
        .rate_limits
        .as_ref()
        .map(|l| (l.requests_per_minute, l.tokens_per_minute))
        .unwrap_or_default();
    let models = if key.allowed_models.is_empty() {
        "*".to_owned()
    } else {
        key.allowed_models.join(",")
    };
    let state = if key.revoked_at.is_some() {
        "revoked"
    } else {
        "active"
    };
    format!(
        "{}  {:<20} {:<14} models={} rpm={} tpm={}{} {}",
        key.id,
        key.name,
        key.prefix,
        models,
        rpm,
        tpm,
        if key.admin { " admin" } else { "" },
        state
    )
}

/// Runs one `lmforge key` command.
pub async fn run(args: KeyArgs) -> anyhow::Result<()> {
    let admin_key = args
        .admin_key
        .context("an admin key is required: --admin-key or LMFORGE_GATEWAY_ADMIN_KEY")?;
    let mut client = connect(&args.gateway_url, &admin_key).await?;
    let status = crate::model_cmd::status_error;
    match args.command {
        KeyCommand::Create {
            name,
            models,
            rpm,
            tpm,
            ttl,
            admin,
        } => {
            let rate_limits = (rpm.is_some() || tpm.is_some()).then(|| pb::RateLimits {
                requests_per_minute: rpm.unwrap_or(0),
                tokens_per_minute: tpm.unwrap_or(0),
            });
            let created = client
                .create_api_key(pb::CreateApiKeyRequest {
                    name,
                    allowed_models: models,
                    rate_limits,
                    expiry: ttl
                        .map(|t| pb::create_api_key_request::Expiry::Ttl(prost_types_duration(t))),
                    admin,
                    metadata: Default::default(),
                })
                .await
                .map_err(status)?
                .into_inner();
            if let Some(key) = &created.key {
                println!("{}", show(key));
            }
            println!("secret (shown once): {}", created.secret);
        }
        KeyCommand::List { all } => {
            let mut page_token = String::new();
            loop {
                let page = client
                    .list_api_keys(pb::ListApiKeysRequest {
                        page_size: 200,
                        page_token,
                        include_inactive: all,
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                for key in &page.keys {
                    println!("{}", show(key));
                }
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
        }
        KeyCommand::Revoke { id, reason } => {
            let key = client
                .revoke_api_key(pb::RevokeApiKeyRequest { id, reason })
                .await
                .map_err(status)?
                .into_inner();
            println!("{}", show(&key));
        }
    }
    Ok(())
}

fn prost_types_duration(d: std::time::Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}
