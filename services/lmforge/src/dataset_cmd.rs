//! `lmforge dataset …`: the ingest service from the command line. Uploads stream the file
//! with a progress bar; lists, versions and reports print as tables; `head` prints records
//! as JSONL.

use std::path::PathBuf;

use anyhow::Context;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use lmforge_proto::v1 as pb;
use lmforge_proto::v1::dataset_service_client::DatasetServiceClient;
use tokio::io::AsyncReadExt;
use tonic::transport::Channel;

/// Upload chunk size: well under gRPC's 4 MiB message limit.
const CHUNK: usize = 1024 * 1024;

/// `lmforge dataset` arguments.
#[derive(Debug, clap::Args)]
pub struct DatasetArgs {
    /// Address of the ingest service.
    #[arg(
        long,
        env = "LMFORGE_INGEST_URL",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    pub ingest_url: String,
    #[command(subcommand)]
    pub command: DatasetCommand,
}

/// The dataset subcommands.
// Parsed once per process: the size of the upload variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, clap::Subcommand)]
pub enum DatasetCommand {
    /// Upload a file and create a new dataset version from it.
    Upload(UploadArgs),
    /// List datasets.
    List {
        /// Name prefix.
        #[arg(long, default_value = "")]
        prefix: String,
    },
    /// Show a dataset and its versions.
    Show {
        /// Dataset name.
        name: String,
    },
    /// Print the processing report of a version (`name`, `name/3`, `name@latest`, an id).
    Report {
        /// Dataset version reference.
        version: String,
    },
    /// Print the first records of a version as JSONL.
    Head {
        /// Dataset version reference.
        version: String,
        /// How many records.
        #[arg(short = 'n', long, default_value_t = 10)]
        count: u64,
        /// Only this split: train, eval or test.
        #[arg(long)]
        split: Option<String>,
    },
}

/// `lmforge dataset upload` options (the common ones; defaults as in dataset.proto).
#[derive(Debug, clap::Args)]
pub struct UploadArgs {
    /// The data file.
    pub file: PathBuf,
    /// Dataset name (created when missing).
    #[arg(long)]
    pub name: String,
    /// openai, sharegpt, alpaca, csv, dialogue, text; default: detected.
    #[arg(long)]
    pub format: Option<String>,
    /// Description of the version.
    #[arg(long, default_value = "")]
    pub description: String,
    /// Input encoding (utf-8, gbk, gb18030, utf-16).
    #[arg(long, default_value = "")]
    pub encoding: String,
    /// Fraction of lines that may fail to parse (reported by line) before the upload is
    /// refused; default 0.1.
    #[arg(long)]
    pub max_parse_errors: Option<f64>,
    /// CSV column of the user turn.
    #[arg(long)]
    pub csv_question: Option<String>,
    /// CSV column of the assistant turn.
    #[arg(long)]
    pub csv_answer: Option<String>,
    /// CSV columns copied into labels (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub csv_labels: Vec<String>,
    /// Minimum length in characters.
    #[arg(long)]
    pub min_chars: Option<u32>,
    /// Maximum length in characters.
    #[arg(long)]
    pub max_chars: Option<u32>,
    /// Maximum length in tokens (needs --tokenizer-model).
    #[arg(long)]
    pub max_tokens: Option<u32>,
    /// Registered model whose tokenizer counts tokens.
    #[arg(long, default_value = "")]
    pub tokenizer_model: String,
    /// Turn on the Gopher repetition filters.
    #[arg(long)]
    pub repetition_filter: bool,
    /// Languages to keep (ISO 639-1, comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub languages: Vec<String>,
    /// Blocklisted phrases (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub blocklist: Vec<String>,
    /// Flag blocklisted records instead of dropping them.
    #[arg(long)]
    pub blocklist_flag: bool,
    /// Near-duplicate threshold.
    #[arg(long)]
    pub near_dup_threshold: Option<f64>,
    /// Turn near-duplicate removal off.
    #[arg(long)]
    pub no_near_dedup: bool,
    /// Train fraction (eval gets the rest unless --test-ratio).
    #[arg(long)]
    pub train_ratio: Option<f64>,
    /// Test fraction.
    #[arg(long)]
    pub test_ratio: Option<f64>,
    /// Split seed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Label key to balance the train split on.
    #[arg(long)]
    pub balance_label: Option<String>,
    /// Cap per label value.
    #[arg(long)]
    pub max_per_label: Option<u32>,
    /// Floor per label value (upsampling).
    #[arg(long)]
    pub min_per_label: Option<u32>,
    /// Synonym augmentation; optionally the artifact URI of a dictionary.
    #[arg(long, num_args = 0..=1, default_missing_value = "")]
    pub synonyms: Option<String>,
    /// Paraphrase the train split with this registered model.
    #[arg(long)]
    pub rewrite_model: Option<String>,
}

fn format_of(name: &str) -> anyhow::Result<pb::DatasetFormat> {
    Ok(match name {
        "openai" | "messages" => pb::DatasetFormat::OpenaiMessages,
        "sharegpt" => pb::DatasetFormat::Sharegpt,
        "alpaca" => pb::DatasetFormat::Alpaca,
        "csv" => pb::DatasetFormat::Csv,
        "dialogue" | "plain" => pb::DatasetFormat::PlainDialogue,
        "text" | "raw" => pb::DatasetFormat::RawText,
        other => anyhow::bail!(
            "unknown format `{other}` (openai, sharegpt, alpaca, csv, dialogue, text)"
        ),
    })
}

fn split_of(name: &str) -> anyhow::Result<pb::DatasetSplit> {
    Ok(match name {
        "train" => pb::DatasetSplit::Train,
        "eval" => pb::DatasetSplit::Eval,
        "test" => pb::DatasetSplit::Test,
        other => anyhow::bail!("unknown split `{other}` (train, eval, test)"),
    })
}

fn split_name(value: i32) -> &'static str {
    match pb::DatasetSplit::try_from(value) {
        Ok(pb::DatasetSplit::Train) => "train",
        Ok(pb::DatasetSplit::Eval) => "eval",
        Ok(pb::DatasetSplit::Test) => "test",
        _ => "-",
    }
}

impl UploadArgs {
    /// The ingest spec these options describe.
    pub fn spec(&self) -> anyhow::Result<pb::DatasetIngestSpec> {
        let format = self
            .format
            .as_deref()
            .map(format_of)
            .transpose()?
            .unwrap_or(pb::DatasetFormat::Unspecified);
        let split = match (self.train_ratio, self.test_ratio) {
            (None, None) => None,
            (train, test) => {
                let train = train.unwrap_or(0.9);
                let test = test.unwrap_or(0.0);
                Some(pb::SplitConfig {
                    train_ratio: Some(train),
                    eval_ratio: Some((1.0 - train - test).max(0.0)),
                    test_ratio: Some(test),
                    seed: self.seed,
                    ..Default::default()
                })
            }
        };
        let split = split.or(self.seed.map(|s| pb::SplitConfig {
            seed: Some(s),
            ..Default::default()
        }));
        let config = pb::IngestConfig {
            parse: Some(pb::ParseOptions {
                encoding: self.encoding.clone(),
                max_parse_error_fraction: self.max_parse_errors,
                csv: Some(pb::CsvColumnMapping {
                    question_column: self.csv_question.clone(),
                    answer_column: self.csv_answer.clone(),
                    label_columns: self.csv_labels.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            cleaning: Some(pb::CleaningConfig {
                length: Some(pb::LengthBounds {
                    min_chars: self.min_chars,
                    max_chars: self.max_chars,
                    max_tokens: self.max_tokens,
                    tokenizer_model: self.tokenizer_model.clone(),
                    ..Default::default()
                }),
                repetition: self.repetition_filter.then(|| pb::RepetitionFilter {
                    enabled: true,
                    ..Default::default()
                }),
                language: (!self.languages.is_empty()).then(|| pb::LanguageFilter {
                    allowed_languages: self.languages.clone(),
                    min_confidence: None,
                }),
                blocklist: (!self.blocklist.is_empty()).then(|| pb::Blocklist {
                    phrases: self.blocklist.clone(),
                    action: (if self.blocklist_flag {
                        pb::BlocklistAction::Flag
                    } else {
                        pb::BlocklistAction::Drop
                    }) as i32,
                    case_insensitive: None,
                }),
                ..Default::default()
            }),
            dedup: Some(pb::DedupConfig {
                exact: None,
                minhash: Some(pb::MinHashConfig {
                    enabled: Some(!self.no_near_dedup),
                    threshold: self.near_dup_threshold,
                    ..Default::default()
                }),
            }),
            split,
            balance: self.balance_label.as_ref().map(|key| pb::BalanceConfig {
                label_key: key.clone(),
                max_per_label: self.max_per_label,
                min_per_label: self.min_per_label,
                seed: None,
            }),
            augmentation: (self.synonyms.is_some() || self.rewrite_model.is_some()).then(|| {
                pb::AugmentationConfig {
                    synonym: self.synonyms.as_ref().map(|uri| pb::SynonymReplacement {
                        dictionary_uri: uri.clone(),
                        ..Default::default()
                    }),
                    rewrite: self.rewrite_model.as_ref().map(|m| pb::ModelRewrite {
                        model: m.clone(),
                        ..Default::default()
                    }),
                }
            }),
        };
        Ok(pb::DatasetIngestSpec {
            dataset_name: self.name.clone(),
            format: format as i32,
            filename: self
                .file
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default(),
            config: Some(config),
            description: self.description.clone(),
            ..Default::default()
        })
    }
}

/// An ingest client on `url` (`http://host:port`).
pub async fn connect(url: &str) -> anyhow::Result<DatasetServiceClient<Channel>> {
    let endpoint = lmforge_runtime::args::parse_endpoint(url).map_err(anyhow::Error::msg)?;
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("cannot reach the ingest service at {url}"))?;
    Ok(DatasetServiceClient::new(channel).max_decoding_message_size(64 << 20))
}

/// Streams `args.file` to the service with a progress bar; returns the response.
pub async fn upload(
    client: &mut DatasetServiceClient<Channel>,
    args: &UploadArgs,
    show_progress: bool,
) -> anyhow::Result<pb::UploadDatasetResponse> {
    let mut spec = args.spec()?;
    let file = tokio::fs::File::open(&args.file)
        .await
        .with_context(|| format!("cannot open {}", args.file.display()))?;
    let size = file.metadata().await?.len();
    spec.expected_size_bytes = size;
    let progress = if show_progress {
        ProgressBar::new(size)
    } else {
        ProgressBar::hidden()
    };
    progress.set_style(
        ProgressStyle::with_template("{msg:<28} {bar:30} {bytes}/{total_bytes} {bytes_per_sec}")
            .expect("the template is a valid constant"),
    );
    progress.set_message(spec.filename.clone());
    let metadata = pb::UploadDatasetRequest {
        payload: Some(pb::upload_dataset_request::Payload::Metadata(spec)),
    };
    let reader_progress = progress.clone();
    let chunks = futures::stream::unfold(file, move |mut file| {
        let progress = reader_progress.clone();
        async move {
            let mut buffer = vec![0u8; CHUNK];
            match file.read(&mut buffer).await {
                Ok(0) | Err(_) => None,
                Ok(read) => {
                    buffer.truncate(read);
                    progress.inc(read as u64);
                    Some((
                        pb::UploadDatasetRequest {
                            payload: Some(pb::upload_dataset_request::Payload::Chunk(buffer)),
                        },
                        file,
                    ))
                }
            }
        }
    });
    let response = client
        .upload_dataset(futures::stream::iter([metadata]).chain(chunks))
        .await
        .map_err(crate::model_cmd::status_error);
    progress.finish_and_clear();
    Ok(response?.into_inner())
}

/// Uploads `args.file` (progress bar when `show_progress`), prints the new version and its
/// cleaning report, and returns both.
pub async fn upload_and_report(
    client: &mut DatasetServiceClient<Channel>,
    args: &UploadArgs,
    show_progress: bool,
) -> anyhow::Result<(pb::DatasetVersion, pb::DatasetReport)> {
    let response = upload(client, args, show_progress).await?;
    let version = response.version.unwrap_or_default();
    if response.reused {
        println!(
            "content unchanged: version {} already holds it",
            version.version
        );
    }
    print_versions(std::slice::from_ref(&version));
    let report = client
        .get_dataset_report(pb::GetDatasetReportRequest {
            dataset_version: version.id.clone(),
        })
        .await
        .map_err(crate::model_cmd::status_error)?
        .into_inner();
    println!();
    print_report(&report);
    Ok((version, report))
}

/// Prints datasets as a table.
pub fn print_datasets(datasets: &[pb::Dataset]) {
    println!(
        "{:<40} {:>8} {:>8}  description",
        "name", "versions", "latest"
    );
    for d in datasets {
        println!(
            "{:<40} {:>8} {:>8}  {}",
            d.name, d.version_count, d.latest_version, d.description
        );
    }
}

/// Prints versions as a table.
pub fn print_versions(versions: &[pb::DatasetVersion]) {
    println!(
        "{:<30} {:>7}  {:<8} {:<16} {:>9} {:>8} {:>8} {:>8}  {:<14} source",
        "dataset", "version", "status", "format", "records", "train", "eval", "test", "digest"
    );
    for v in versions {
        let count = |s: pb::DatasetSplit| {
            v.splits
                .iter()
                .find(|i| i.split == s as i32)
                .map_or(0, |i| i.record_count)
        };
        let status = match pb::DatasetVersionStatus::try_from(v.status) {
            Ok(pb::DatasetVersionStatus::Ready) => "READY",
            Ok(pb::DatasetVersionStatus::Failed) => "FAILED",
            Ok(pb::DatasetVersionStatus::Processing) => "RUNNING",
            _ => "-",
        };
        println!(
            "{:<30} {:>7}  {:<8} {:<16} {:>9} {:>8} {:>8} {:>8}  {:<14} {}",
            v.dataset_name,
            v.version,
            status,
            format!(
                "{:?}",
                pb::DatasetFormat::try_from(v.format).unwrap_or_default()
            ),
            v.record_count,
            count(pb::DatasetSplit::Train),
            count(pb::DatasetSplit::Eval),
            count(pb::DatasetSplit::Test),
            v.digest.get(..12).unwrap_or("-"),
            v.source
        );
    }
}

/// Prints a report: summary, rules, parse errors, clusters, distributions, histogram.
pub fn print_report(r: &pb::DatasetReport) {
    println!(
        "dataset {} version {} ({})",
        r.dataset_name, r.version, r.dataset_version_id
    );
    println!(
        "format {:?}: {} input lines, {} parsed, {} parse errors, {} output records",
        pb::DatasetFormat::try_from(r.format).unwrap_or_default(),
        r.input_lines,
        r.parsed_records,
        r.parse_error_count,
        r.output_records
    );
    println!();
    println!(
        "{:<28} {:>9} {:>9} {:>9} {:>9}  reasons",
        "rule", "removed", "changed", "flagged", "added"
    );
    for rule in &r.rules {
        let mut reasons: Vec<String> = rule
            .reasons
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        reasons.sort();
        println!(
            "{:<28} {:>9} {:>9} {:>9} {:>9}  {}",
            rule.rule,
            rule.removed,
            rule.changed,
            rule.flagged,
            rule.added,
            reasons.join(" ")
        );
    }
    let examples: Vec<_> = r
        .rules
        .iter()
        .flat_map(|rule| {
            rule.examples
                .iter()
                .take(1)
                .map(move |e| (rule.rule.as_str(), e))
        })
        .collect();
    if !examples.is_empty() {
        println!("\nexamples (one per rule):");
        for (rule, e) in examples {
            println!(
                "  {rule:<26} line {:<6} {}: {}",
                e.line,
                e.reason,
                excerpt(if e.before.is_empty() {
                    &e.after
                } else {
                    &e.before
                })
            );
        }
    }
    if !r.parse_errors.is_empty() {
        println!("\nparse errors ({} total):", r.parse_error_count);
        for e in r.parse_errors.iter().take(20) {
            println!("  line {:<8} {}", e.line, e.message);
        }
    }
    if !r.dedup_clusters.is_empty() {
        println!("\nduplicate clusters ({} total):", r.dedup_cluster_count);
        for c in r.dedup_clusters.iter().take(20) {
            let method = if c.method == pb::DedupMethod::Exact as i32 {
                "exact"
            } else {
                "minhash"
            };
            println!(
                "  {method:<8} kept {} (line {}), removed {} (lines {:?}), min similarity {:.2}",
                c.kept_record_id,
                c.kept_line,
                c.removed_record_ids.len(),
                c.removed_lines.iter().take(10).collect::<Vec<_>>(),
                c.min_similarity
            );
        }
    }
    println!(
        "\n{:<8} {:>9} {:>12} {:>10}  sha256",
        "split", "records", "bytes", "tokens"
    );
    for s in &r.splits {
        println!(
            "{:<8} {:>9} {:>12} {:>10}  {}",
            split_name(s.split),
            s.record_count,
            s.size_bytes,
            s.token_count,
            s.sha256.get(..16).unwrap_or("-")
        );
    }
    let mut labels: Vec<_> = r.label_distribution.iter().collect();
    labels.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    if !labels.is_empty() {
        println!("\nlabels:");
        for (k, v) in labels.iter().take(30) {
            println!("  {k:<40} {v:>9}");
        }
    }
    if !r.rare_labels.is_empty() {
        println!("rare classes: {}", r.rare_labels.join(", "));
    }
    if !r.language_distribution.is_empty() {
        let mut langs: Vec<_> = r
            .language_distribution
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        langs.sort();
        println!("languages: {}", langs.join(" "));
    }
    println!("\nlength ({}):", r.length_unit);
    let max = r
        .length_histogram
        .iter()
        .map(|b| b.count)
        .max()
        .unwrap_or(0)
        .max(1);
    for b in r.length_histogram.iter().filter(|b| b.count > 0) {
        let range = if b.max_length == 0 {
            format!("{}+", b.min_length)
        } else {
            format!("{}–{}", b.min_length, b.max_length)
        };
        println!(
            "  {range:>12} {:>9} {}",
            b.count,
            "█".repeat(((b.count * 40) / max) as usize)
        );
    }
    for note in &r.notes {
        println!("note: {note}");
    }
}

fn excerpt(s: &str) -> String {
    let short: String = s.chars().take(80).collect();
    short.replace('\n', " ")
}

/// Runs one `lmforge dataset` command.
pub async fn run(args: DatasetArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.ingest_url).await?;
    let status = crate::model_cmd::status_error;
    match args.command {
        DatasetCommand::Upload(upload_args) => {
            upload_and_report(&mut client, &upload_args, true).await?;
        }
        DatasetCommand::List { prefix } => {
            let mut datasets = Vec::new();
            let mut page_token = String::new();
            loop {
                let page = client
                    .list_datasets(pb::ListDatasetsRequest {
                        page_size: 1000,
                        page_token,
                        name_prefix: prefix.clone(),
                        ..Default::default()
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                datasets.extend(page.datasets);
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            print_datasets(&datasets);
        }
        DatasetCommand::Show { name } => {
            let dataset = client
                .get_dataset(pb::GetDatasetRequest { name: name.clone() })
                .await
                .map_err(status)?
                .into_inner();
            print_datasets(std::slice::from_ref(&dataset));
            let versions = client
                .list_dataset_versions(pb::ListDatasetVersionsRequest {
                    dataset_name: name,
                    page_size: 1000,
                    ..Default::default()
                })
                .await
                .map_err(status)?
                .into_inner();
            println!();
            print_versions(&versions.versions);
        }
        DatasetCommand::Report { version } => {
            let report = client
                .get_dataset_report(pb::GetDatasetReportRequest {
                    dataset_version: version,
                })
                .await
                .map_err(status)?
                .into_inner();
            print_report(&report);
        }
        DatasetCommand::Head {
            version,
            count,
            split,
        } => {
            let split = split
                .as_deref()
                .map(split_of)
                .transpose()?
                .unwrap_or(pb::DatasetSplit::Unspecified);
            let mut stream = client
                .download_dataset_version(pb::DownloadDatasetVersionRequest {
                    dataset_version: version,
                    split: split as i32,
                    max_records: count,
                    ..Default::default()
                })
                .await
                .map_err(status)?
                .into_inner();
            while let Some(message) = stream.next().await {
                if let Some(pb::download_dataset_version_response::Payload::Record(r)) =
                    message.map_err(status)?.payload
                {
                    let messages: Vec<serde_json::Value> = r
                        .messages
                        .iter()
                        .map(|m| {
                            let role = match pb::ChatRole::try_from(m.role) {
                                Ok(pb::ChatRole::System) => "system",
                                Ok(pb::ChatRole::Assistant) => "assistant",
                                _ => "user",
                            };
                            serde_json::json!({"role": role, "content": m.content})
                        })
                        .collect();
                    let mut line = serde_json::json!({"id": r.id, "split": split_name(r.split), "messages": messages, "labels": r.labels, "source": r.source});
                    if !r.text.is_empty() {
                        line["text"] = serde_json::Value::String(r.text);
                    }
                    println!("{line}");
                }
            }
        }
    }
    Ok(())
}
