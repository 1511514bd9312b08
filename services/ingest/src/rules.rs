//! The stable ids of the pipeline's rules (`RuleReport.rule`), in pipeline order.

/// One rule of the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rule {
    /// `clean.mojibake`.
    Mojibake = 0,
    /// `clean.control_chars`.
    ControlChars,
    /// `clean.nfkc`.
    Nfkc,
    /// `clean.whitespace`.
    Whitespace,
    /// `filter.incomplete_dialogue`.
    IncompleteDialogue,
    /// `filter.length`.
    Length,
    /// `filter.repetition`.
    Repetition,
    /// `filter.language`.
    Language,
    /// `pii.email`.
    PiiEmail,
    /// `pii.phone`.
    PiiPhone,
    /// `pii.cn_resident_id`.
    PiiResidentId,
    /// `pii.bank_card`.
    PiiBankCard,
    /// `blocklist`.
    Blocklist,
    /// `dedup.exact`.
    DedupExact,
    /// `dedup.minhash`.
    DedupMinhash,
    /// `balance`.
    Balance,
    /// `augment.synonym`.
    AugmentSynonym,
    /// `augment.rewrite`.
    AugmentRewrite,
}

impl Rule {
    /// Every rule in pipeline order.
    pub const ALL: [Rule; 18] = [
        Rule::Mojibake,
        Rule::ControlChars,
        Rule::Nfkc,
        Rule::Whitespace,
        Rule::IncompleteDialogue,
        Rule::Length,
        Rule::Repetition,
        Rule::Language,
        Rule::PiiEmail,
        Rule::PiiPhone,
        Rule::PiiResidentId,
        Rule::PiiBankCard,
        Rule::Blocklist,
        Rule::DedupExact,
        Rule::DedupMinhash,
        Rule::Balance,
        Rule::AugmentSynonym,
        Rule::AugmentRewrite,
    ];

    /// The stable id.
    pub fn id(self) -> &'static str {
        match self {
            Rule::Mojibake => "clean.mojibake",
            Rule::ControlChars => "clean.control_chars",
            Rule::Nfkc => "clean.nfkc",
            Rule::Whitespace => "clean.whitespace",
            Rule::IncompleteDialogue => "filter.incomplete_dialogue",
            Rule::Length => "filter.length",
            Rule::Repetition => "filter.repetition",
            Rule::Language => "filter.language",
            Rule::PiiEmail => "pii.email",
            Rule::PiiPhone => "pii.phone",
            Rule::PiiResidentId => "pii.cn_resident_id",
            Rule::PiiBankCard => "pii.bank_card",
            Rule::Blocklist => "blocklist",
            Rule::DedupExact => "dedup.exact",
            Rule::DedupMinhash => "dedup.minhash",
            Rule::Balance => "balance",
            Rule::AugmentSynonym => "augment.synonym",
            Rule::AugmentRewrite => "augment.rewrite",
        }
    }
}
