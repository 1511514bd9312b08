//! Requests → pipeline settings: validation (every bad value answered as INVALID_ARGUMENT
//! naming its field) and the configuration "as applied", with every default filled in.
//! What needs a peer (a tokenizer, a dictionary in the store, a rewrite model) is left for
//! [`crate::api`] to fetch.

use lmforge_proto::v1 as pb;

use crate::clean::{Blocklist, BlocklistAction, CleanRules, LanguageRules};
use crate::dedup::{DedupSettings, NearSettings};
use crate::error::{IngestError, Result};
use crate::parse::{CsvMapping, DialoguePrefixes, Format, ParseOptions};
use crate::pii::PiiRules;
use crate::pipeline::{BalanceSettings, PipelineSettings, SplitSettings};
use crate::repetition::RepetitionRules;

/// Synonym augmentation still to resolve (the dictionary may live in the store).
#[derive(Debug, Clone)]
pub struct SynonymPlan {
    /// Artifact URI; empty → built-in dictionary.
    pub dictionary_uri: String,
    /// Replacement probability.
    pub probability: f64,
    /// Copies per record.
    pub copies: u32,
}

/// Model rewrite still to resolve.
#[derive(Debug, Clone)]
pub struct RewritePlan {
    /// The request's settings (validated).
    pub config: pb::ModelRewrite,
    /// Copies per record.
    pub copies: u32,
    /// Fraction of train records.
    pub sample_fraction: f64,
}

/// A validated request.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Dataset name.
    pub dataset_name: String,
    /// Declared format, `None` → detect.
    pub format: Option<Format>,
    /// Input encoding.
    pub encoding: &'static encoding_rs::Encoding,
    /// Settings without peer-provided parts (tokenizer, dictionary, rewriter).
    pub settings: PipelineSettings,
    /// Model whose tokenizer counts tokens.
    pub tokenizer_model: Option<String>,
    /// Synonym augmentation.
    pub synonym: Option<SynonymPlan>,
    /// Model rewrite.
    pub rewrite: Option<RewritePlan>,
    /// The configuration as applied.
    pub applied: pb::IngestConfig,
}

/// Checks a dataset name: 1–128 chars of `[a-z0-9._-]`.
pub fn check_name(field: &str, name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 128 {
        return Err(IngestError::invalid(field, "must be 1–128 characters"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
    {
        return Err(IngestError::invalid(
            field,
            format!("`{name}` may hold only a-z, 0-9, `.`, `_` and `-`"),
        ));
    }
    Ok(())
}

/// The domain format of a proto enum value; `None` for UNSPECIFIED.
pub fn format_of(field: &str, value: i32) -> Result<Option<Format>> {
    use pb::DatasetFormat as F;
    Ok(
        match F::try_from(value)
            .map_err(|_| IngestError::invalid(field, format!("unknown format {value}")))?
        {
            F::Unspecified => None,
            F::OpenaiMessages => Some(Format::OpenAiMessages),
            F::Sharegpt => Some(Format::ShareGpt),
            F::Alpaca => Some(Format::Alpaca),
            F::Csv => Some(Format::Csv),
            F::PlainDialogue => Some(Format::PlainDialogue),
            F::RawText => Some(Format::RawText),
        },
    )
}

/// The proto enum value of a format.
pub fn format_value(format: Format) -> i32 {
    use pb::DatasetFormat as F;
    (match format {
        Format::OpenAiMessages => F::OpenaiMessages,
        Format::ShareGpt => F::Sharegpt,
        Format::Alpaca => F::Alpaca,
        Format::Csv => F::Csv,
        Format::PlainDialogue => F::PlainDialogue,
        Format::RawText => F::RawText,
    }) as i32
}

fn fraction(field: &str, value: f64, open_low: bool) -> Result<f64> {
    let ok = value.is_finite() && value <= 1.0 && if open_low { value > 0.0 } else { value >= 0.0 };
    if ok {
        Ok(value)
    } else {
        let range = if open_low { "(0, 1]" } else { "[0, 1]" };
        Err(IngestError::invalid(
            field,
            format!("{value} is not in {range}"),
        ))
    }
}

/// Validates a spec; `p` is the field path of the spec (`metadata` or `spec`).
pub fn plan(p: &str, spec: &pb::DatasetIngestSpec) -> Result<Plan> {
    let pb::DatasetIngestSpec {
        dataset_name,
        format,
        filename,
        config,
        description,
        tags: _,
        client_request_id,
        expected_size_bytes: _,
        expected_sha256,
    } = spec;
    check_name(&format!("{p}.dataset_name"), dataset_name)?;
    let format = format_of(&format!("{p}.format"), *format)?;
    if filename.chars().count() > 256 {
        return Err(IngestError::invalid(
            format!("{p}.filename"),
            "at most 256 characters",
        ));
    }
    if description.chars().count() > 4096 {
        return Err(IngestError::invalid(
            format!("{p}.description"),
            "at most 4096 characters",
        ));
    }
    if client_request_id.len() > 128 {
        return Err(IngestError::invalid(
            format!("{p}.client_request_id"),
            "at most 128 characters",
        ));
    }
    if !expected_sha256.is_empty() {
        lmforge_store::validate_sha256(expected_sha256)
            .map_err(|e| IngestError::invalid(format!("{p}.expected_sha256"), e.to_string()))?;
    }
    let config = config.clone().unwrap_or_default();
    let pb::IngestConfig {
        parse,
        cleaning,
        dedup,
        split,
        balance,
        augmentation,
    } = config;
    let c = format!("{p}.config");

    // Parsing.
    let parse = parse.unwrap_or_default();
    let encoding_label = if parse.encoding.is_empty() {
        "utf-8"
    } else {
        parse.encoding.as_str()
    };
    let encoding =
        encoding_rs::Encoding::for_label(encoding_label.as_bytes()).ok_or_else(|| {
            IngestError::invalid(
                format!("{c}.parse.encoding"),
                format!("unknown encoding `{encoding_label}`"),
            )
        })?;
    let csv_in = parse.csv.clone().unwrap_or_default();
    let delimiter = match csv_in.delimiter.as_deref() {
        None => {
            if filename.to_ascii_lowercase().ends_with(".tsv") {
                b'\t'
            } else {
                b','
            }
        }
        Some(d) if d.len() == 1 && d.is_ascii() => d.as_bytes()[0],
        Some("\\t") => b'\t',
        Some(d) => {
            return Err(IngestError::invalid(
                format!("{c}.parse.csv.delimiter"),
                format!("`{d}` is not exactly one ASCII character"),
            ));
        }
    };
    let csv = CsvMapping {
        question: csv_in
            .question_column
            .clone()
            .unwrap_or_else(|| "question".into()),
        answer: csv_in
            .answer_column
            .clone()
            .unwrap_or_else(|| "answer".into()),
        system: csv_in.system_column.clone().filter(|s| !s.is_empty()),
        id: csv_in.id_column.clone().filter(|s| !s.is_empty()),
        labels: csv_in.label_columns.clone(),
        delimiter,
    };
    let dialogue_in = parse.plain_dialogue.clone().unwrap_or_default();
    let defaults = DialoguePrefixes::default();
    let pick = |given: &Vec<String>, default: Vec<String>| {
        if given.is_empty() {
            default
        } else {
            given.clone()
        }
    };
    let dialogue = DialoguePrefixes {
        user: pick(&dialogue_in.user_prefixes, defaults.user),
        assistant: pick(&dialogue_in.assistant_prefixes, defaults.assistant),
        system: pick(&dialogue_in.system_prefixes, defaults.system),
    };
    let max_parse_error_fraction = fraction(
        &format!("{c}.parse.max_parse_error_fraction"),
        parse.max_parse_error_fraction.unwrap_or(0.1),
        false,
    )?;

    // Cleaning.
    let cleaning = cleaning.unwrap_or_default();
    let cf = format!("{c}.cleaning");
    let length = cleaning.length.clone().unwrap_or_default();
    let min_chars = length.min_chars.unwrap_or(1);
    if let Some(max) = length.max_chars
        && max < min_chars
    {
        return Err(IngestError::invalid(
            format!("{cf}.length.max_chars"),
            format!("{max} is below min_chars {min_chars}"),
        ));
    }
    if let (Some(min), Some(max)) = (length.min_tokens, length.max_tokens)
        && max < min
    {
        return Err(IngestError::invalid(
            format!("{cf}.length.max_tokens"),
            format!("{max} is below min_tokens {min}"),
        ));
    }
    let tokenizer_model = (!length.tokenizer_model.trim().is_empty())
        .then(|| length.tokenizer_model.trim().to_owned());
    if (length.min_tokens.is_some() || length.max_tokens.is_some()) && tokenizer_model.is_none() {
        return Err(IngestError::invalid(
            format!("{cf}.length.tokenizer_model"),
            "required when a token bound is set",
        ));
    }
    let repetition = match cleaning.repetition.clone() {
        Some(r) if r.enabled => {
            let d = RepetitionRules::default();
            let top_ngram = if r.top_ngram_char_fraction.is_empty() {
                d.top_ngram.clone()
            } else {
                r.top_ngram_char_fraction
                    .iter()
                    .map(|t| {
                        if !(1..=10).contains(&t.n) {
                            return Err(IngestError::invalid(
                                format!("{cf}.repetition.top_ngram_char_fraction.n"),
                                format!("{} is not in 1–10", t.n),
                            ));
                        }
                        Ok((
                            t.n as usize,
                            fraction(
                                &format!(
                                    "{cf}.repetition.top_ngram_char_fraction.max_char_fraction"
                                ),
                                t.max_char_fraction,
                                true,
                            )?,
                        ))
                    })
                    .collect::<Result<Vec<_>>>()?
            };
            Some(RepetitionRules {
                max_dup_line_frac: fraction(
                    &format!("{cf}.repetition.max_duplicate_line_fraction"),
                    r.max_duplicate_line_fraction.unwrap_or(d.max_dup_line_frac),
                    false,
                )?,
                max_dup_para_frac: fraction(
                    &format!("{cf}.repetition.max_duplicate_paragraph_fraction"),
                    r.max_duplicate_paragraph_fraction
                        .unwrap_or(d.max_dup_para_frac),
                    false,
                )?,
                max_dup_line_char_frac: fraction(
                    &format!("{cf}.repetition.max_duplicate_line_char_fraction"),
                    r.max_duplicate_line_char_fraction
                        .unwrap_or(d.max_dup_line_char_frac),
                    false,
                )?,
                top_ngram,
            })
        }
        _ => None,
    };
    let language = match cleaning.language.clone() {
        Some(l) => {
            for code in &l.allowed_languages {
                if code.len() != 2 || !code.bytes().all(|b| b.is_ascii_lowercase()) {
                    return Err(IngestError::invalid(
                        format!("{cf}.language.allowed_languages"),
                        format!("`{code}` is not an ISO 639-1 code"),
                    ));
                }
            }
            Some(LanguageRules {
                allowed: l.allowed_languages.clone(),
                min_confidence: fraction(
                    &format!("{cf}.language.min_confidence"),
                    l.min_confidence.unwrap_or(0.5),
                    false,
                )?,
            })
        }
        None => None,
    };
    let pii_in = cleaning.pii.unwrap_or_default();
    let pii = PiiRules {
        email: pii_in.email.unwrap_or(true),
        phone: pii_in.phone.unwrap_or(true),
        cn_resident_id: pii_in.cn_resident_id.unwrap_or(true),
        bank_card: pii_in.bank_card.unwrap_or(true),
    };
    let blocklist_in = cleaning.blocklist.clone();
    let blocklist = match &blocklist_in {
        Some(b) if !b.phrases.is_empty() => {
            let field = format!("{cf}.blocklist.phrases");
            if b.phrases.len() > 10_000 {
                return Err(IngestError::invalid(field, "at most 10000 phrases"));
            }
            if let Some(bad) = b
                .phrases
                .iter()
                .find(|p| p.trim().is_empty() || p.chars().count() > 256)
            {
                return Err(IngestError::invalid(
                    field,
                    format!("`{bad}`: each phrase must be 1–256 characters"),
                ));
            }
            let action = match pb::BlocklistAction::try_from(b.action) {
                Ok(pb::BlocklistAction::Flag) => BlocklistAction::Flag,
                Ok(_) => BlocklistAction::Drop,
                Err(_) => {
                    return Err(IngestError::invalid(
                        format!("{cf}.blocklist.action"),
                        format!("unknown action {}", b.action),
                    ));
                }
            };
            Some(
                Blocklist::new(&b.phrases, action, b.case_insensitive.unwrap_or(true))
                    .map_err(|e| IngestError::invalid(field, e))?,
            )
        }
        _ => None,
    };
    let clean = CleanRules {
        fix_mojibake: cleaning.fix_mojibake.unwrap_or(true),
        strip_control: cleaning.strip_control_chars.unwrap_or(true),
        nfkc: cleaning.nfkc.unwrap_or(true),
        normalize_whitespace: cleaning.normalize_whitespace.unwrap_or(true),
        drop_incomplete: cleaning.drop_incomplete_dialogues.unwrap_or(true),
        min_chars: min_chars as usize,
        max_chars: length.max_chars.map(|m| m as usize),
        min_tokens: length.min_tokens.map(|m| m as usize),
        max_tokens: length.max_tokens.map(|m| m as usize),
        tokenizer: None,
        repetition: repetition.clone(),
        language: language.clone(),
        pii,
        blocklist,
    };

    // Dedup.
    let dedup_in = dedup.unwrap_or_default();
    let minhash = dedup_in.minhash.unwrap_or_default();
    let near = if minhash.enabled.unwrap_or(true) {
        let threshold = fraction(
            &format!("{c}.dedup.minhash.threshold"),
            minhash.threshold.unwrap_or(0.8),
            true,
        )?;
        let num_perm = minhash.num_perm.unwrap_or(128);
        if !(16..=1024).contains(&num_perm) {
            return Err(IngestError::invalid(
                format!("{c}.dedup.minhash.num_perm"),
                format!("{num_perm} is not in 16–1024"),
            ));
        }
        let shingle = minhash.shingle_size.unwrap_or(5);
        if !(1..=32).contains(&shingle) {
            return Err(IngestError::invalid(
                format!("{c}.dedup.minhash.shingle_size"),
                format!("{shingle} is not in 1–32"),
            ));
        }
        Some(NearSettings {
            threshold,
            num_perm: num_perm as usize,
            shingle: shingle as usize,
        })
    } else {
        None
    };
    let dedup_settings = DedupSettings {
        exact: dedup_in.exact.unwrap_or(true),
        near,
    };

    // Split.
    let split_in = split.unwrap_or_default();
    let sf = format!("{c}.split");
    let train = fraction(
        &format!("{sf}.train_ratio"),
        split_in.train_ratio.unwrap_or(0.9),
        false,
    )?;
    let eval = fraction(
        &format!("{sf}.eval_ratio"),
        split_in
            .eval_ratio
            .unwrap_or(if split_in.train_ratio.is_some() {
                1.0 - train - split_in.test_ratio.unwrap_or(0.0)
            } else {
                0.1
            })
            .max(0.0),
        false,
    )?;
    let test = fraction(
        &format!("{sf}.test_ratio"),
        split_in.test_ratio.unwrap_or(0.0),
        false,
    )?;
    if ((train + eval + test) - 1.0).abs() > 1e-6 {
        return Err(IngestError::invalid(
            format!("{sf}.train_ratio"),
            format!("train {train} + eval {eval} + test {test} must sum to 1"),
        ));
    }
    let split_settings = SplitSettings {
        train,
        eval,
        test,
        seed: split_in.seed.unwrap_or(42),
    };
    let mut notes = Vec::new();
    if !split_in.stratify_by_label.is_empty() {
        notes.push(format!(
            "split.stratify_by_label `{}`: records are split by content hash, so each label keeps its proportion in expectation",
            split_in.stratify_by_label
        ));
    }

    // Balance.
    let balance_settings = match &balance {
        None => None,
        Some(b) => {
            if b.label_key.is_empty() {
                return Err(IngestError::invalid(
                    format!("{c}.balance.label_key"),
                    "required",
                ));
            }
            if let (Some(min), Some(max)) = (b.min_per_label, b.max_per_label)
                && min > max
            {
                return Err(IngestError::invalid(
                    format!("{c}.balance.min_per_label"),
                    format!("{min} is above max_per_label {max}"),
                ));
            }
            Some(BalanceSettings {
                label_key: b.label_key.clone(),
                max_per_label: b.max_per_label.map(u64::from),
                min_per_label: b.min_per_label.map(u64::from),
                seed: b.seed.unwrap_or(split_settings.seed),
            })
        }
    };

    // Augmentation.
    let aug = augmentation.clone().unwrap_or_default();
    let synonym = match &aug.synonym {
        None => None,
        Some(s) => {
            let copies = s.copies_per_record.unwrap_or(1);
            if !(1..=10).contains(&copies) {
                return Err(IngestError::invalid(
                    format!("{c}.augmentation.synonym.copies_per_record"),
                    format!("{copies} is not in 1–10"),
                ));
            }
            Some(SynonymPlan {
                dictionary_uri: s.dictionary_uri.trim().to_owned(),
                probability: fraction(
                    &format!("{c}.augmentation.synonym.replace_probability"),
                    s.replace_probability.unwrap_or(0.1),
                    true,
                )?,
                copies,
            })
        }
    };
    let rewrite = match &aug.rewrite {
        None => None,
        Some(r) => {
            let copies = r.copies_per_record.unwrap_or(1);
            if !(1..=10).contains(&copies) {
                return Err(IngestError::invalid(
                    format!("{c}.augmentation.rewrite.copies_per_record"),
                    format!("{copies} is not in 1–10"),
                ));
            }
            if pb::RewriteMode::try_from(r.mode).is_err() {
                return Err(IngestError::invalid(
                    format!("{c}.augmentation.rewrite.mode"),
                    format!("unknown mode {}", r.mode),
                ));
            }
            let sample_fraction = fraction(
                &format!("{c}.augmentation.rewrite.sample_fraction"),
                r.sample_fraction.unwrap_or(1.0),
                true,
            )?;
            if r.model.trim().is_empty() {
                notes.push("augment.rewrite skipped: no model given (set augmentation.rewrite.model to a registered model)".into());
                None
            } else {
                Some(RewritePlan {
                    config: r.clone(),
                    copies,
                    sample_fraction,
                })
            }
        }
    };

    let applied = pb::IngestConfig {
        parse: Some(pb::ParseOptions {
            encoding: encoding.name().to_ascii_lowercase(),
            csv: Some(pb::CsvColumnMapping {
                question_column: Some(csv.question.clone()),
                answer_column: Some(csv.answer.clone()),
                system_column: csv.system.clone(),
                id_column: csv.id.clone(),
                label_columns: csv.labels.clone(),
                delimiter: Some((csv.delimiter as char).to_string()),
            }),
            plain_dialogue: Some(pb::PlainDialogueOptions {
                user_prefixes: dialogue.user.clone(),
                assistant_prefixes: dialogue.assistant.clone(),
                system_prefixes: dialogue.system.clone(),
            }),
            default_system_prompt: parse.default_system_prompt.clone(),
            max_parse_error_fraction: Some(max_parse_error_fraction),
        }),
        cleaning: Some(pb::CleaningConfig {
            nfkc: Some(clean.nfkc),
            strip_control_chars: Some(clean.strip_control),
            fix_mojibake: Some(clean.fix_mojibake),
            normalize_whitespace: Some(clean.normalize_whitespace),
            length: Some(pb::LengthBounds {
                min_chars: Some(min_chars),
                max_chars: length.max_chars,
                min_tokens: length.min_tokens,
                max_tokens: length.max_tokens,
                tokenizer_model: tokenizer_model.clone().unwrap_or_default(),
            }),
            repetition: Some(match &repetition {
                Some(r) => pb::RepetitionFilter {
                    enabled: true,
                    max_duplicate_line_fraction: Some(r.max_dup_line_frac),
                    max_duplicate_paragraph_fraction: Some(r.max_dup_para_frac),
                    max_duplicate_line_char_fraction: Some(r.max_dup_line_char_frac),
                    top_ngram_char_fraction: r
                        .top_ngram
                        .iter()
                        .map(|(n, f)| pb::TopNgramThreshold {
                            n: *n as u32,
                            max_char_fraction: *f,
                        })
                        .collect(),
                },
                None => pb::RepetitionFilter::default(),
            }),
            language: language.as_ref().map(|l| pb::LanguageFilter {
                allowed_languages: l.allowed.clone(),
                min_confidence: Some(l.min_confidence),
            }),
            pii: Some(pb::PiiRedaction {
                email: Some(pii.email),
                phone: Some(pii.phone),
                cn_resident_id: Some(pii.cn_resident_id),
                bank_card: Some(pii.bank_card),
            }),
            blocklist: blocklist_in.map(|b| pb::Blocklist {
                phrases: b.phrases,
                action: if b.action == pb::BlocklistAction::Flag as i32 {
                    b.action
                } else {
                    pb::BlocklistAction::Drop as i32
                },
                case_insensitive: Some(b.case_insensitive.unwrap_or(true)),
            }),
            drop_incomplete_dialogues: Some(clean.drop_incomplete),
        }),
        dedup: Some(pb::DedupConfig {
            exact: Some(dedup_settings.exact),
            minhash: Some(match &dedup_settings.near {
                Some(n) => pb::MinHashConfig {
                    enabled: Some(true),
                    threshold: Some(n.threshold),
                    num_perm: Some(n.num_perm as u32),
                    shingle_size: Some(n.shingle as u32),
                },
                None => pb::MinHashConfig {
                    enabled: Some(false),
                    ..Default::default()
                },
            }),
        }),
        split: Some(pb::SplitConfig {
            train_ratio: Some(train),
            eval_ratio: Some(eval),
            test_ratio: Some(test),
            seed: Some(split_settings.seed),
            stratify_by_label: split_in.stratify_by_label.clone(),
        }),
        balance: balance_settings.as_ref().map(|b| pb::BalanceConfig {
            label_key: b.label_key.clone(),
            max_per_label: b.max_per_label.map(|v| v as u32),
            min_per_label: b.min_per_label.map(|v| v as u32),
            seed: Some(b.seed),
        }),
        augmentation: (aug.synonym.is_some() || aug.rewrite.is_some()).then(|| aug.clone()),
    };

    let settings = PipelineSettings {
        format: format.unwrap_or(Format::OpenAiMessages),
        parse: ParseOptions {
            csv,
            dialogue,
            default_system_prompt: parse.default_system_prompt.clone(),
        },
        max_parse_error_fraction,
        clean,
        dedup: dedup_settings,
        split: split_settings,
        balance: balance_settings,
        synonym: None,
        rewrite: None,
        notes,
        shard_records: 100_000,
        shard_bytes: 64 << 20,
        source_name: if filename.is_empty() {
            "upload".into()
        } else {
            filename.clone()
        },
    };
    Ok(Plan {
        dataset_name: dataset_name.clone(),
        format,
        encoding,
        settings,
        tokenizer_model,
        synonym,
        rewrite,
        applied,
    })
}
