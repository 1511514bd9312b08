//! The search filter grammar of `SearchModelVersions` (documented at the top of
//! `registry.proto`): clauses `<key> <op> <value>` joined by `AND`, parsed into typed
//! [`Clause`]s that [`crate::catalog::search_versions`] turns into bound SQL, never into
//! SQL text built from user input.

use crate::error::{RegistryError, Result};

/// What a clause compares.
#[derive(Debug, Clone, PartialEq)]
pub enum Key {
    /// A text column or JSON text field (SQL expression, fixed by us).
    Text(&'static str),
    /// `tags.<key>`.
    Tag(String),
    /// An integer column.
    Int(&'static str),
    /// `metrics.<key>`.
    Metric(String),
}

/// Comparison operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `=`
    Eq,
    /// `!=`
    Ne,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
    /// `LIKE`
    Like,
    /// `ILIKE`
    ILike,
    /// `IN (…)`
    In,
}

impl Op {
    /// The SQL operator.
    pub fn sql(self) -> &'static str {
        match self {
            Self::Eq => "=",
            Self::Ne => "<>",
            Self::Lt => "<",
            Self::Le => "<=",
            Self::Gt => ">",
            Self::Ge => ">=",
            Self::Like => "LIKE",
            Self::ILike => "ILIKE",
            Self::In => "IN",
        }
    }
}

/// A literal.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A number.
    Number(f64),
    /// A quoted string.
    Text(String),
    /// `IN` list.
    List(Vec<Value>),
}

/// One `<key> <op> <value>`.
#[derive(Debug, Clone, PartialEq)]
pub struct Clause {
    /// Left side.
    pub key: Key,
    /// Operator.
    pub op: Op,
    /// Right side (type-checked against the key).
    pub value: Value,
}

fn error(position: usize, reason: impl std::fmt::Display) -> RegistryError {
    RegistryError::invalid("filter", format!("at character {}: {reason}", position + 1))
}

struct Lexer<'a> {
    text: &'a str,
    position: usize,
}

impl<'a> Lexer<'a> {
    fn skip_space(&mut self) {
        let rest = &self.text[self.position..];
        self.position += rest.len() - rest.trim_start().len();
    }

    fn rest(&self) -> &'a str {
        &self.text[self.position..]
    }

    fn word(&mut self) -> Option<(usize, &'a str)> {
        self.skip_space();
        let start = self.position;
        // Backquotes allow any character inside a key: tags.`my key`.
        let mut quoted = false;
        let length = self
            .rest()
            .char_indices()
            .find(|&(_, c)| {
                if c == '`' {
                    quoted = !quoted;
                    return false;
                }
                !(quoted || c.is_alphanumeric() || "._-".contains(c))
            })
            .map_or(self.rest().len(), |(index, _)| index);
        if length == 0 {
            return None;
        }
        self.position += length;
        Some((start, &self.text[start..self.position]))
    }

    fn operator(&mut self) -> Result<Op> {
        self.skip_space();
        let start = self.position;
        for (symbol, op) in [
            ("!=", Op::Ne),
            ("<=", Op::Le),
            (">=", Op::Ge),
            ("=", Op::Eq),
            ("<", Op::Lt),
            (">", Op::Gt),
        ] {
            if self.rest().starts_with(symbol) {
                self.position += symbol.len();
                return Ok(op);
            }
        }
        match self.word() {
            Some((_, w)) if w.eq_ignore_ascii_case("like") => Ok(Op::Like),
            Some((_, w)) if w.eq_ignore_ascii_case("ilike") => Ok(Op::ILike),
            Some((_, w)) if w.eq_ignore_ascii_case("in") => Ok(Op::In),
            _ => Err(error(
                start,
                "expected an operator (= != < <= > >= LIKE ILIKE IN)",
            )),
        }
    }

    fn literal(&mut self) -> Result<Value> {
        self.skip_space();
        let start = self.position;
        if let Some(body) = self.rest().strip_prefix('\'') {
            let mut text = String::new();
            let mut chars = body.char_indices().peekable();
            while let Some((index, c)) = chars.next() {
                if c == '\'' {
                    if matches!(chars.peek(), Some((_, '\''))) {
                        chars.next();
                        text.push('\'');
                        continue;
                    }
                    self.position += 1 + index + 1;
                    return Ok(Value::Text(text));
                }
                text.push(c);
            }
            return Err(error(start, "unterminated string"));
        }
        let length = self
            .rest()
            .find(|c: char| !(c.is_ascii_digit() || ".-+eE".contains(c)))
            .unwrap_or(self.rest().len());
        let number = &self.rest()[..length];
        match number.parse::<f64>() {
            Ok(value) if length > 0 && value.is_finite() => {
                self.position += length;
                Ok(Value::Number(value))
            }
            _ => Err(error(start, "expected a number or a 'quoted string'")),
        }
    }
}

fn key(position: usize, word: &str) -> Result<Key> {
    let unquote = |s: &str| s.trim_matches('`').to_owned();
    if let Some(tag) = word.strip_prefix("tags.") {
        return Ok(Key::Tag(unquote(tag)));
    }
    if let Some(metric) = word.strip_prefix("metrics.") {
        return Ok(Key::Metric(unquote(metric)));
    }
    Ok(match word {
        "name" => Key::Text("m.name"),
        "version" => Key::Int("v.version"),
        "format" => Key::Text("v.format"),
        "status" => Key::Text("upper(v.status)"),
        "description" => Key::Text("v.description"),
        "dataset_version" => Key::Text("(v.lineage->>'dataset_version_id')"),
        "training_job_id" => Key::Text("(v.lineage->>'training_job_id')"),
        "architecture" => Key::Text("v.architecture"),
        "base_model" => Key::Text(
            "((v.lineage->'base_model'->>'name') || '/' || (v.lineage->'base_model'->>'version'))",
        ),
        other => return Err(error(position, format!("unknown key `{other}`"))),
    })
}

/// Parses a filter; empty means no clauses.
pub fn parse(filter: &str) -> Result<Vec<Clause>> {
    let mut lexer = Lexer {
        text: filter,
        position: 0,
    };
    let mut clauses = Vec::new();
    lexer.skip_space();
    if lexer.rest().is_empty() {
        return Ok(clauses);
    }
    loop {
        let (at, word) = lexer
            .word()
            .ok_or_else(|| error(lexer.position, "expected a key"))?;
        let key = key(at, word)?;
        let op = lexer.operator()?;
        lexer.skip_space();
        let value_at = lexer.position;
        let value = if op == Op::In {
            lexer.skip_space();
            if !lexer.rest().starts_with('(') {
                return Err(error(lexer.position, "IN needs a list: IN ('a', 'b')"));
            }
            lexer.position += 1;
            let mut items = vec![lexer.literal()?];
            loop {
                lexer.skip_space();
                if lexer.rest().starts_with(',') {
                    lexer.position += 1;
                    items.push(lexer.literal()?);
                } else if lexer.rest().starts_with(')') {
                    lexer.position += 1;
                    break;
                } else {
                    return Err(error(lexer.position, "expected `,` or `)`"));
                }
            }
            Value::List(items)
        } else {
            lexer.literal()?
        };
        check_types(value_at, &key, op, &value)?;
        clauses.push(Clause { key, op, value });
        lexer.skip_space();
        if lexer.rest().is_empty() {
            return Ok(clauses);
        }
        let at = lexer.position;
        match lexer.word() {
            Some((_, w)) if w.eq_ignore_ascii_case("and") => {}
            _ => return Err(error(at, "expected AND between clauses")),
        }
    }
}

fn check_types(position: usize, key: &Key, op: Op, value: &Value) -> Result<()> {
    let numeric_key = matches!(key, Key::Int(_) | Key::Metric(_));
    let items: Vec<&Value> = match value {
        Value::List(items) => items.iter().collect(),
        single => vec![single],
    };
    for item in items {
        match (numeric_key, item) {
            (true, Value::Number(_)) | (false, Value::Text(_)) => {}
            (true, _) => return Err(error(position, "this key compares numbers")),
            (false, _) => return Err(error(position, "this key compares 'quoted strings'")),
        }
    }
    if numeric_key && matches!(op, Op::Like | Op::ILike) {
        return Err(error(position, "LIKE applies to strings only"));
    }
    Ok(())
}

/// Checks that a parsed filter only uses keys that models have (`name`, `description`,
/// `tags.<key>`), for `ListModels`.
pub fn check_model_keys(clauses: &[Clause]) -> Result<()> {
    for clause in clauses {
        match &clause.key {
            Key::Text("m.name") | Key::Text("v.description") | Key::Tag(_) => {}
            other => {
                return Err(RegistryError::invalid(
                    "filter",
                    format!(
                        "{other:?} does not apply to models: use name, description or tags.<key>"
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Sort orders of a search.
#[derive(Debug, Clone, PartialEq)]
pub enum Order {
    /// Creation time.
    CreatedAt(bool),
    /// Version number.
    Version(bool),
    /// Model name, then version.
    Name(bool),
    /// A metric; versions without it sort last.
    Metric(String, bool),
}

/// Parses `order_by` (`created_at DESC` by default).
pub fn parse_order(order_by: &str) -> Result<Order> {
    let mut parts = order_by.split_whitespace();
    let key = parts.next().unwrap_or("created_at");
    let descending = match parts.next().map(str::to_ascii_uppercase).as_deref() {
        None => key == "created_at",
        Some("ASC") => false,
        Some("DESC") => true,
        Some(other) => {
            return Err(RegistryError::invalid(
                "order_by",
                format!("`{other}`: expected ASC or DESC"),
            ));
        }
    };
    if parts.next().is_some() {
        return Err(RegistryError::invalid(
            "order_by",
            "one key, then ASC or DESC",
        ));
    }
    Ok(match key {
        "created_at" => Order::CreatedAt(descending),
        "version" => Order::Version(descending),
        "name" => Order::Name(descending),
        other => match other.strip_prefix("metrics.") {
            Some(metric) if !metric.is_empty() => Order::Metric(metric.to_owned(), descending),
            _ => {
                return Err(RegistryError::invalid(
                    "order_by",
                    format!("`{other}`: use created_at, version, name or metrics.<key>"),
                ));
            }
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_example() {
        let clauses = parse("metrics.eval_loss < 2.1 AND tags.domain = 'bank'").expect("valid");
        assert_eq!(
            clauses,
            vec![
                Clause {
                    key: Key::Metric("eval_loss".into()),
                    op: Op::Lt,
                    value: Value::Number(2.1)
                },
                Clause {
                    key: Key::Tag("domain".into()),
                    op: Op::Eq,
                    value: Value::Text("bank".into())
                },
            ]
        );
        let clauses =
            parse("name LIKE 'acme/%' and format IN ('q8_0', 'gguf') AND tags.`my key` != 'it''s'")
                .expect("valid");
        assert_eq!(clauses.len(), 3);
        assert_eq!(clauses[2].value, Value::Text("it's".into()));
        assert!(parse("").expect("empty").is_empty());
    }

    #[test]
    fn errors_name_the_position() {
        for (bad, position) in [
            ("colour = 'red'", "character 1"),
            ("metrics.loss < 'low'", "character 16"),
            ("name = 3", "character 8"),
            ("name = 'x' OR version = 1", "character 12"),
            ("name = 'unterminated", "character 8"),
            ("version LIKE 3", "character 14"),
        ] {
            let message = parse(bad).expect_err(bad).to_string();
            assert!(message.starts_with("filter: "), "{message}");
            assert!(message.contains(position), "{bad}: {message}");
        }
    }

    #[test]
    fn orders() {
        assert_eq!(parse_order("").ok(), Some(Order::CreatedAt(true)));
        assert_eq!(
            parse_order("metrics.eval_loss ASC").ok(),
            Some(Order::Metric("eval_loss".into(), false))
        );
        assert!(parse_order("size DESC").is_err());
        assert!(parse_order("version sideways").is_err());
    }
}
